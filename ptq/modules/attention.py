"""`AttentionMX`: Llama-family attention (Llama, Mistral, Qwen2, Qwen3 in transformers 5.x) with quantization points.

An `AttentionMX` is a subclass of the model's own attention class (``LlamaAttentionMX(AttentionMX, LlamaAttention)``
etc.), built from an existing module without copying: it holds the same q/k/v/o projections (which may be
`LinearMX`), norms, config and ``layer_idx``, so ``isinstance(m, LlamaAttention)`` still holds (transformers' output
recording relies on that) and the state dict keys do not change.

Quantization points (``None`` spec = exact pass-through), in forward order:

- ``qk_rotation`` / ``v_rotation`` (online rotations, see `set_rotations`): Q and K after RoPE along head_dim
  (Q K^T unchanged), V along head_dim (the output is de-rotated per head before o_proj).
- ``rope``: Q and K after RoPE, blocked along head_dim (emulates a low-precision RoPE output).
- ``kv_cache``: K (after RoPE) and V, blocked along head_dim, quantized BEFORE ``past_key_values.update``: the cache
  holds the quantized values and attention in the same forward reads them, so one perplexity pass measures KV
  quantization and decoding with a cache sees exactly what a no-cache recompute sees. head_dim is the axis for both:
  it is K's reduction axis in Q K^T, and blocking V per token lets a decode step quantize what it writes without a
  block of future tokens. A head_dim smaller than the block (stories260k: 8) is quantized as one zero-padded block of
  head_dim elements (zeros never change a block's amax), i.e. effectively block = head_dim.
- ``qk_matmul``: both operands of Q K^T along head_dim (their reduction axis).
- ``softmax``: the probabilities (softmax output) along the key axis.
- ``av_matmul``: both operands of A V along their reduction axis, the key axis: A along its last dim, V along the
  sequence dim.

With only ``kv_cache`` / ``rope`` quantized (``cfg.needs_eager`` False) the model's configured attention kernel
(sdpa, flash, ...) is called exactly as the original forward does; qk / softmax / av quantization need the
probabilities materialised and run the eager path below, which accepts the masks transformers builds for ``eager``
and ``sdpa`` (float or bool 4-D, or None meaning causal).
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ptq.config import AttentionQuantConfig
from ptq.errors import ModelError
from ptq.formats import QuantSpec
from ptq.modules.linear import _fake_quantize


# attributes accelerate's add_hook_to_module sets on an instance
_INSTANCE_FORWARD_KEYS = ("forward", "_old_forward", "_hf_hook")


def _along(spec: QuantSpec | None, axis: int) -> QuantSpec | None:
    return spec if spec is None or spec.axis == axis else spec.with_(axis=axis)


@dataclass(frozen=True)
class _AxisSpecs:
    """The config's specs, each bound to the axis it is applied along (tensors are [batch, heads, seq, head_dim])."""

    rope: QuantSpec | None
    kv: QuantSpec | None
    qk: QuantSpec | None
    softmax: QuantSpec | None
    av_probs: QuantSpec | None
    av_value: QuantSpec | None

    @classmethod
    def from_config(cls, cfg: AttentionQuantConfig) -> "_AxisSpecs":
        return cls(
            rope=_along(cfg.rope, -1),
            kv=_along(cfg.kv_cache, -1),
            qk=_along(cfg.qk_matmul, -1),
            softmax=_along(cfg.softmax, -1),
            av_probs=_along(cfg.av_matmul, -1),
            av_value=_along(cfg.av_matmul, -2),
        )


def _spec_str(spec: QuantSpec | None) -> str:
    return "bypass" if spec is None else str(spec)


class AttentionMX(nn.Module):
    """Mixin placed before the model's attention class; build instances with `AttentionMX.from_attention`.

    Attributes: ``cfg`` (`AttentionQuantConfig`), ``qk_rotation`` / ``v_rotation`` (``nn.Module | None``),
    ``force_eager`` (run the eager path even when ``cfg`` does not need it; for tests and debugging), ``eager``
    (read-only: whether the eager path runs).
    """

    # how the base class passes sliding_window to the attention kernel: None (not at all), "config", "attr"
    _SLIDING_WINDOW_FROM: str | None = None

    @classmethod
    def from_attention(cls, attn: nn.Module, cfg: AttentionQuantConfig | None = None) -> "AttentionMX":
        """A quantized twin of ``attn`` sharing its submodules, parameters and attributes (nothing is copied)."""
        if isinstance(attn, AttentionMX):
            raise ModelError("from_attention got an AttentionMX; call .set_config(cfg) on it to reconfigure it")
        mx_cls = attention_mx_class(type(attn))
        new = mx_cls.__new__(mx_cls)
        # Shallow-copy the containers (parameters, buffers, modules, hooks) so later edits of one module's
        # containers do not leak into the other; the tensors and submodules themselves are shared. An instance-level
        # `forward` (accelerate's hook wrapper) is bound to the old module and would bypass ours: it is not copied
        # (the swap pass re-attaches accelerate hooks).
        new.__dict__.update({k: copy.copy(v) if isinstance(v, (dict, set)) else v for k, v in attn.__dict__.items()
                             if k not in _INSTANCE_FORWARD_KEYS})
        new._init_quant(cfg if cfg is not None else AttentionQuantConfig())
        return new

    def _init_quant(self, cfg: AttentionQuantConfig) -> None:
        base = next(c for c in type(self).__mro__[1:] if c in SUPPORTED_ATTENTION)
        mod = sys.modules[base.__module__]
        # the base class's own helpers, so the unquantized path is the original computation op for op
        self._apply_rotary = mod.apply_rotary_pos_emb
        self._eager_fallback = mod.eager_attention_forward
        self._repeat_kv = mod.repeat_kv
        self.qk_rotation = None
        self.v_rotation = None
        self.force_eager = False
        self.set_config(cfg)

    # ---- configuration -------------------------------------------------------------------------------------------
    def set_config(self, cfg: AttentionQuantConfig) -> None:
        """Replace the quantization config (axes are fixed here, never in forward)."""
        if not isinstance(cfg, AttentionQuantConfig):
            raise ModelError(f"AttentionMX needs an AttentionQuantConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self._specs = _AxisSpecs.from_config(cfg)

    @property
    def eager(self) -> bool:
        return self.force_eager or self.cfg.needs_eager

    def set_rotations(self, qk: nn.Module | None = None, v: nn.Module | None = None) -> None:
        """Online rotations along head_dim: ``qk`` on Q and K after RoPE (Q K^T unchanged), ``v`` on V before the
        KV-cache quantizer (the attention output is de-rotated per head with ``v.inverse`` before o_proj)."""
        for name, rot in (("qk", qk), ("v", v)):
            if rot is not None and not isinstance(rot, nn.Module):
                raise ModelError(f"{name} rotation must be an nn.Module, got {type(rot).__name__}")
        if v is not None and not callable(getattr(v, "inverse", None)):
            raise ModelError(f"the v rotation needs v.inverse(t) to de-rotate the output; {type(v).__name__} has none")
        self.qk_rotation = qk
        self.v_rotation = v

    def _sliding_window_kwargs(self) -> dict:
        if self._SLIDING_WINDOW_FROM == "config":
            return {"sliding_window": getattr(self.config, "sliding_window", None)}
        if self._SLIDING_WINDOW_FROM == "attr":
            return {"sliding_window": self.sliding_window}
        return {}

    # ---- forward -------------------------------------------------------------------------------------------------
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        specs = self._specs
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        query_states = self.q_proj(hidden_states).view(hidden_shape)
        key_states = self.k_proj(hidden_states).view(hidden_shape)
        if "q_norm" in self._modules:  # Qwen3: RMSNorm over head_dim before RoPE (a dict lookup, not hasattr)
            query_states = self.q_norm(query_states)
            key_states = self.k_norm(key_states)
        query_states = query_states.transpose(1, 2)
        key_states = key_states.transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = self._apply_rotary(query_states, key_states, cos, sin)

        if self.qk_rotation is not None:
            query_states = self.qk_rotation(query_states)
            key_states = self.qk_rotation(key_states)
        if self.v_rotation is not None:
            value_states = self.v_rotation(value_states)

        query_states = _fake_quantize(query_states, specs.rope)
        key_states = _fake_quantize(key_states, specs.rope)
        key_states = _fake_quantize(key_states, specs.kv)
        value_states = _fake_quantize(value_states, specs.kv)

        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)

        dropout = 0.0 if not self.training else self.attention_dropout
        if self.eager:
            attn_output, attn_weights = self._quantized_eager_attention(
                query_states, key_states, value_states, attention_mask, dropout)
        else:
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, self._eager_fallback)
            attn_output, attn_weights = attention_interface(
                self,
                query_states,
                key_states,
                value_states,
                attention_mask,
                dropout=dropout,
                scaling=self.scaling,
                **self._sliding_window_kwargs(),
                **kwargs,
            )

        if self.v_rotation is not None:  # attn_output is [batch, q_len, heads, head_dim]
            attn_output = self.v_rotation.inverse(attn_output)
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        attn_output = self.o_proj(attn_output)
        return attn_output, attn_weights

    def _quantized_eager_attention(self, query, key, value, attention_mask, dropout):
        """Eager attention with qk / softmax / av quantization; with those bypassed it is transformers' eager
        attention op for op. ``attention_mask``: float (additive) or bool (True = attend) [b, 1|h, q, kv], or None
        (sdpa's convention: causal, upper-left aligned, when q_len > 1; no mask for a single query)."""
        s = self._specs
        # Quantize before repeat_kv: the blocks lie within one head, so repeating copies quantized values.
        key = _fake_quantize(key, s.qk)
        value = _fake_quantize(value, s.av_value)
        query = _fake_quantize(query, s.qk)
        key_states = self._repeat_kv(key, self.num_key_value_groups)
        value_states = self._repeat_kv(value, self.num_key_value_groups)

        attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * self.scaling
        q_len, kv_len = query.shape[-2], key_states.shape[-2]
        if attention_mask is not None:
            if attention_mask.dim() != 4:
                raise ModelError(
                    f"layer {self.layer_idx}: qk/softmax/av quantization runs eager attention, which needs a 4-D "
                    f"mask, got shape {tuple(attention_mask.shape)} (attn_implementation="
                    f"{self.config._attn_implementation!r}); load the model with attn_implementation='sdpa' or 'eager'")
            mask = attention_mask[:, :, :, :kv_len]
            if mask.dtype == torch.bool:
                attn_weights = attn_weights.masked_fill(~mask, torch.finfo(attn_weights.dtype).min)
            else:
                attn_weights = attn_weights + mask
        elif q_len > 1:
            causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril()
            attn_weights = attn_weights.masked_fill(~causal, torch.finfo(attn_weights.dtype).min)

        attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
        attn_weights = _fake_quantize(attn_weights, s.softmax)
        attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=self.training)
        probs = _fake_quantize(attn_weights, s.av_probs)
        attn_output = torch.matmul(probs, value_states)
        attn_output = attn_output.transpose(1, 2).contiguous()
        return attn_output, attn_weights

    def extra_repr(self) -> str:
        c = self.cfg
        parts = [
            f"layer_idx={self.layer_idx}",
            f"kv_cache={_spec_str(c.kv_cache)}",
            f"qk_matmul={_spec_str(c.qk_matmul)}",
            f"av_matmul={_spec_str(c.av_matmul)}",
            f"softmax={_spec_str(c.softmax)}",
            f"rope={_spec_str(c.rope)}",
            f"path={'eager' if self.eager else 'model kernel'}",
        ]
        return ", ".join(parts)


def _supported() -> dict[type, type]:
    from transformers.models.llama.modeling_llama import LlamaAttention
    from transformers.models.mistral.modeling_mistral import MistralAttention
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention
    from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention

    class LlamaAttentionMX(AttentionMX, LlamaAttention):
        _SLIDING_WINDOW_FROM = None

    class MistralAttentionMX(AttentionMX, MistralAttention):
        _SLIDING_WINDOW_FROM = "config"

    class Qwen2AttentionMX(AttentionMX, Qwen2Attention):
        _SLIDING_WINDOW_FROM = "attr"

    class Qwen3AttentionMX(AttentionMX, Qwen3Attention):
        _SLIDING_WINDOW_FROM = "attr"

    classes = {
        LlamaAttention: LlamaAttentionMX,
        MistralAttention: MistralAttentionMX,
        Qwen2Attention: Qwen2AttentionMX,
        Qwen3Attention: Qwen3AttentionMX,
    }
    for mx in classes.values():  # importable by name (pickling, repr)
        mx.__module__ = __name__
        mx.__qualname__ = mx.__name__
        setattr(sys.modules[__name__], mx.__name__, mx)
    return classes


# model attention class -> its AttentionMX subclass (exact types: a subclass may change forward)
SUPPORTED_ATTENTION: dict[type, type] = _supported()


def attention_mx_class(attn_cls: type) -> type:
    """The `AttentionMX` subclass for a model attention class; `ModelError` naming the supported ones otherwise."""
    try:
        return SUPPORTED_ATTENTION[attn_cls]
    except KeyError:
        names = ", ".join(c.__name__ for c in SUPPORTED_ATTENTION)
        raise ModelError(
            f"attention class {attn_cls.__module__}.{attn_cls.__name__} is not supported by AttentionMX; "
            f"supported: {names}") from None
