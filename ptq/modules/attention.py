"""`AttentionMX`: quantization points inside the attention module of any transformers decoder family.

An `AttentionMX` is a dynamic subclass of the model's own attention class (``LlamaAttentionMX(AttentionMX,
LlamaAttention)``, ``GPT2AttentionMX(AttentionMX, GPT2Attention)``, ...), built from an existing module without
copying: it holds the same projections (which may be `LinearMX`), norms, config and ``layer_idx``, so
``isinstance(m, LlamaAttention)`` still holds (transformers' output recording relies on that) and the state dict keys
do not change.

Its forward is the original class's forward, run unchanged; two points are intercepted through transformers' own
extension points, so no family's attention code is copied here:

(a) The KV-cache write. The forward's cache argument (found by type, whatever its name: ``past_key_values``,
    ``layer_past``, ``cache`` ...) gets an instance-level ``update`` for the duration of the call that transforms K and
    V BEFORE they are stored: the stored K / V are the quantized values, and attention in the same forward reads them.
    Without a cache (``use_cache=False``, perplexity) a pass-through cache is passed instead, whose ``update`` returns
    the transformed K / V and stores nothing, so every family that writes K / V through ``Cache.update`` (Falcon too)
    gets the same K / V quantization with and without a cache.
(b) The attention computation. For the duration of the call the module's ``config`` is a view whose
    ``_attn_implementation`` names ``"ptq_mx"``, a function registered in transformers' `AttentionInterface`; the
    family forward looks it up as it would look up ``"sdpa"``. That function puts the model's config back, applies the
    Q-side points and either delegates to the implementation the MODEL uses (sdpa / eager = the family's own
    ``eager_attention_forward`` / flash ...) or, for qk / softmax / av quantization, computes attention eagerly here.

Quantization points (``None`` spec = exact pass-through):

- ``qk_rotation`` / ``v_rotation`` (online rotations, see `set_rotations`): K at the cache write and Q in (b) along
  head_dim (Q K^T unchanged); V at the cache write along head_dim (the attention output is de-rotated per head).
- ``rope``: Q and K as attention reads them (after RoPE where the family has it), blocked along head_dim.
- ``kv_cache``: K and V, blocked along head_dim, quantized where they are written to the cache. head_dim is the axis
  for both: it is K's reduction axis in Q K^T, and blocking V per token lets a decode step quantize what it writes
  without a block of future tokens, so the cache holds exactly what a no-cache recompute quantizes. A head_dim
  smaller than the block (stories260k: 8) is one zero-padded block of head_dim elements (zeros never change a block's
  amax), i.e. effectively block = head_dim.
- ``qk_matmul``: both operands of Q K^T along head_dim (their reduction axis).
- ``softmax``: the probabilities (softmax output) along the key axis.
- ``av_matmul``: both operands of A V along their reduction axis, the key axis: A along its last dim, V along the
  sequence dim.

With nothing quantized and no rotation the original forward runs untouched (bit-identical). With only ``kv_cache``
quantized nothing but the cache write changes. qk / softmax / av quantization need the probabilities materialised
and run `quantized_eager_attention`, which accepts the masks transformers builds for ``eager`` and ``sdpa``.

What works for a class is decided from its forward before anything is swapped (`attention_support`): the cache
write needs a cache parameter that the forward writes through ``.update(``; the Q-side points, ``v_rotation`` and
qk / softmax / av need the forward to dispatch through ``AttentionInterface.get_interface`` (Falcon computes
attention itself up to transformers 5.24: kv_cache only there; from 5.25 it dispatches like the others).
"""

from __future__ import annotations

import copy
import functools
import inspect
import re
import sys
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ptq.config import AttentionQuantConfig
from ptq.errors import ModelError
from ptq.formats import QuantSpec
from ptq.modules.linear import _fake_quantize

# the name of our function in transformers' attention registry
PTQ_ATTENTION = "ptq_mx"

# attributes accelerate's add_hook_to_module sets on an instance
_INSTANCE_FORWARD_KEYS = ("forward", "_old_forward", "_hf_hook")

# names transformers versions give the forward's KV-cache parameter
_CACHE_PARAM_NAMES = ("cache", "past_key_values", "past_key_value", "layer_past")

# the parameters of the family eager functions that `quantized_eager_attention` reproduces
_EAGER_PARAMS = {"module", "query", "key", "value", "attention_mask", "dropout", "scaling", "softcap"}

# keyword arguments through which transformers' attention functions add terms to the math (attention sinks, position
# biases, head masks); `quantized_eager_attention` implements none of them. Every other extra keyword is bookkeeping
# that the family eager function (whose own parameters `attention_support` checks) ignores as well; the sliding window
# is already part of the masks transformers builds for eager and sdpa.
_MATH_KWARGS = frozenset({"s_aux", "sinks", "position_bias", "head_mask", "layer_head_mask", "alibi", "attn_bias",
                          "attention_bias", "logit_softcapping"})

# families AttentionMX is tested on (tests/families.py), named in refusals
TESTED_ATTENTION = ("LlamaAttention, MistralAttention, Qwen2/3Attention, Gemma2/3Attention, Phi3Attention, Olmo2Attention, "
                    "GraniteAttention, CohereAttention, GPTNeoXAttention, Starcoder2Attention, SmolLM3Attention, "
                    "MixtralAttention, Qwen2Moe/Qwen3MoeAttention, OPTAttention, GPT2Attention (all points); FalconAttention "
                    "(all points from transformers 5.25, kv_cache only before)")


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


# ---- what a class supports -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttentionSupport:
    """What `AttentionMX` can do with one attention class, read from its forward (see `attention_support`).

    ``refusal``: why the class cannot be swapped at all (None: the KV-cache write can be intercepted).
    ``dispatch_refusal``: why the Q-side points (rope, qk rotation), the v rotation and qk / softmax / av cannot be
    applied (None: the forward dispatches through transformers' attention registry).
    ``eager_refusal``: why `quantized_eager_attention` cannot stand in for the family's eager attention (extra
    terms such as a position bias or attention sinks).
    ``self_checked_impls``: attention implementations the forward compares ``config._attn_implementation`` with
    itself; while the model uses one of them, dispatching through the registry would change the forward's branch.
    """

    cls: type
    cache_param: str | None = None
    cache_index: int | None = None  # position of the cache parameter among the positional arguments (self excluded)
    interface: object = None  # the AttentionInterface instance the forward looks implementations up in
    eager_attention: Callable | None = None  # the family's eager function (get_interface's default)
    self_checked_impls: frozenset = frozenset()
    refusal: str | None = None
    dispatch_refusal: str | None = None
    eager_refusal: str | None = None

    @property
    def kv_cache(self) -> bool:
        return self.refusal is None

    @property
    def attention_points(self) -> bool:
        return self.refusal is None and self.dispatch_refusal is None

    @property
    def eager_points(self) -> bool:
        """Whether qk_matmul / softmax / av_matmul quantization is supported."""
        return self.attention_points and self.eager_refusal is None

    def describe(self) -> str:
        """One line: what works for the class and, where something does not, why."""
        name = self.cls.__name__
        if self.refusal:
            return f"{name}: not supported ({self.refusal})"
        if self.dispatch_refusal:
            return f"{name}: kv_cache only ({self.dispatch_refusal})"
        if self.eager_refusal:
            return f"{name}: kv_cache, rope, rotations; not qk_matmul / softmax / av_matmul ({self.eager_refusal})"
        return f"{name}: kv_cache, rope, rotations, qk_matmul, softmax, av_matmul"


def _base_attention_class(cls: type) -> type:
    return next(c for c in cls.__mro__ if not issubclass(c, AttentionMX)) if issubclass(cls, AttentionMX) else cls


@functools.lru_cache(maxsize=None)
def attention_support(cls: type) -> AttentionSupport:
    """What `AttentionMX` supports for the attention class ``cls`` (an `AttentionMX` subclass answers for its base).

    Read from the class's forward (source and signature), so it needs no model and no forward pass."""
    cls = _base_attention_class(cls)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        return AttentionSupport(cls, refusal="not an nn.Module class")
    forward = inspect.unwrap(cls.forward)
    try:
        source = inspect.getsource(forward)
        params = list(inspect.signature(cls.forward).parameters.values())[1:]
    except (OSError, TypeError, ValueError) as e:
        return AttentionSupport(cls, refusal=f"its forward cannot be inspected ({e})")
    cache = next((p for p in params if p.name in _CACHE_PARAM_NAMES), None)
    if cache is None:
        cache = next((p for p in params if "Cache" in str(p.annotation)), None)
    # the cache write: <cache or a cache taken from it>.update(key, value, self.layer_idx, ...)
    if cache is None or not re.search(r"\.update\(\s*\w+\s*,\s*\w+\s*,\s*self\.layer_idx\b", source):
        return AttentionSupport(cls, refusal="its forward takes no KV cache argument that it writes through "
                                             "Cache.update(...), so K and V cannot be intercepted")
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    cache_index = positional.index(cache) if cache in positional else None
    found = dict(cls=cls, cache_param=cache.name, cache_index=cache_index)

    lookup = re.search(r"(\w+)\.get_interface\(\s*self\.config\._attn_implementation\s*,\s*(\w+)\s*\)", source)
    interface = forward.__globals__.get(lookup.group(1)) if lookup else None
    from transformers.modeling_utils import AttentionInterface

    if not isinstance(interface, AttentionInterface):
        return AttentionSupport(**found, dispatch_refusal="its forward computes attention itself instead of through "
                                                          "transformers' AttentionInterface")
    if re.search(r"_attn_implementation\s+(not\s+)?in\b", source):
        return AttentionSupport(**found, dispatch_refusal="its forward tests config._attn_implementation against a "
                                                          "set of implementations itself")
    checked = frozenset(m.group(2) for m in re.finditer(r"_attn_implementation\s*(==|!=)\s*[\"']([\w|\-]+)[\"']",
                                                         source))
    eager = forward.__globals__.get(lookup.group(2))
    found.update(interface=interface, eager_attention=eager, self_checked_impls=checked)
    return AttentionSupport(**found, eager_refusal=_eager_refusal(eager))


def _eager_refusal(eager: Callable | None) -> str | None:
    """Why `quantized_eager_attention` cannot reproduce the family eager function ``eager`` (None: it can)."""
    if eager is None or not callable(eager):
        return "the family has no eager attention function to compare with"
    try:
        params = inspect.signature(eager).parameters.values()
        source = inspect.getsource(inspect.unwrap(eager))
    except (OSError, TypeError, ValueError) as e:
        return f"its eager attention function cannot be inspected ({e})"
    extra = [p.name for p in params if p.kind is not p.VAR_KEYWORD and p.name not in _EAGER_PARAMS]
    if extra:
        return f"its eager attention takes {', '.join(extra)}, which ptq's quantized attention does not implement"
    if re.search(r"module\.sinks|\bs_aux\b", source):
        return "its eager attention adds attention sinks, which ptq's quantized attention does not implement"
    return None


def is_attention_module(module: nn.Module) -> bool:
    """Whether ``module`` is an `AttentionMX` or an attention module `AttentionMX.from_attention` accepts."""
    return isinstance(module, AttentionMX) or attention_support(type(module)).kv_cache


def check_attention_config(module: nn.Module, cfg: AttentionQuantConfig, *, rotations: bool = False,
                           force_eager: bool = False) -> None:
    """Raise `ModelError` unless ``module`` (an attention module, swapped or not) can apply ``cfg`` (and, with
    ``rotations``, a qk / v rotation) with the attention implementation its model uses now."""
    support = attention_support(type(module))
    name = _base_attention_class(type(module)).__name__
    if not support.kv_cache:
        raise ModelError(f"attention class {name} cannot be quantized by AttentionMX: {support.refusal}. Leave it out "
                         f"of the recipe (or select it with bypass = true). Supported: {TESTED_ATTENTION}")
    if not isinstance(cfg, AttentionQuantConfig):
        raise ModelError(f"AttentionMX needs an AttentionQuantConfig, got {type(cfg).__name__}")
    wanted = [f for f in ("rope", "qk_matmul", "softmax", "av_matmul") if getattr(cfg, f) is not None]
    if rotations:
        wanted.append("qk / v rotations")
    if force_eager:
        wanted.append("force_eager")
    if not wanted:
        return
    if support.dispatch_refusal:
        raise ModelError(f"{name}: {', '.join(wanted)} cannot be applied because {support.dispatch_refusal}; on "
                         f"{name} only kv_cache quantization is supported: select kv_cache alone (bypass the other "
                         f"attention points) for this module")
    impl = getattr(module.config, "_attn_implementation", None)
    if impl in support.self_checked_impls:
        raise ModelError(f"{name}: its forward branches on attn_implementation == {impl!r} itself, so {', '.join(wanted)}"
                         f" cannot be routed through ptq's attention function under {impl!r}; load the model with "
                         f"another attn_implementation (e.g. 'sdpa'), or select kv_cache alone")
    needs_eager = force_eager or cfg.needs_eager
    if needs_eager and support.eager_refusal:
        raise ModelError(f"{name}: qk_matmul / softmax / av_matmul quantization is not supported because "
                         f"{support.eager_refusal}; select kv_cache / rope only for this module")
    if needs_eager and impl not in (None, "eager", "sdpa"):
        raise ModelError(f"{name}: qk_matmul / av_matmul / softmax quantization computes attention eagerly from the "
                         f"masks transformers builds for 'eager' or 'sdpa', but this model uses attn_implementation="
                         f"{impl!r}; load it with attn_implementation='sdpa' (or 'eager'), or quantize only kv_cache / "
                         f"rope")


# ---- the two interception points -----------------------------------------------------------------------------------
class _PassThroughCache:
    """Stands in for the KV cache when the caller passes none: ``update`` returns what it is given (after the
    instance-level patch transformed it) and stores nothing."""

    def update(self, key_states, value_states, *args, **kwargs):
        return key_states, value_states


class _DispatchView:
    """The module's config as its forward sees it while routed: ``_attn_implementation`` names ptq's attention
    function, every other attribute is the model config's (read live)."""

    _attn_implementation = PTQ_ATTENTION

    def __init__(self, base) -> None:
        object.__setattr__(self, "base", base)

    def __getattr__(self, name):
        return getattr(self.base, name)

    def __setattr__(self, name, value):
        setattr(self.base, name, value)


def _leaf_caches(cache) -> list:
    """The caches whose ``update`` stores K / V: an encoder-decoder cache holds one per attention kind."""
    from transformers.cache_utils import Cache

    nested = [v for v in vars(cache).values() if isinstance(v, Cache)]
    return nested or [cache]


def _seen_tokens(cache, layer_idx) -> int:
    try:
        return int(cache.get_seq_length(layer_idx))
    except (AttributeError, IndexError, TypeError):  # the pass-through stand-in; a layer not created yet
        return 0


def _patch_update(cache, module: "AttentionMX", undo: list) -> None:
    original = cache.update  # bound before patching: the class's update (or an outer patch)
    previous = cache.__dict__.get("update", _MISSING)

    def update(key_states, value_states, *args, **kwargs):
        key_states, value_states = module._write_kv(key_states, value_states)
        seen = _seen_tokens(cache, module.layer_idx) if module.eager else 0
        keys, values = original(key_states, value_states, *args, **kwargs)
        if module.eager:
            # absolute position of the first key attention reads: > 0 once a sliding-window cache dropped tokens
            module.__dict__["_key_offset"] = max(0, seen + key_states.shape[-2] - keys.shape[-2])
        return keys, values

    cache.update = update

    def restore():
        if previous is _MISSING:
            cache.__dict__.pop("update", None)
        else:
            cache.update = previous

    undo.append(restore)


_MISSING = object()


def _ptq_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask, **kwargs):
    """The attention function registered as ``"ptq_mx"``: only an `AttentionMX` routes here, for one call."""
    view = module.__dict__.get("config")
    if not isinstance(module, AttentionMX) or not isinstance(view, _DispatchView):
        raise ModelError(f"attn_implementation {PTQ_ATTENTION!r} is internal to ptq's AttentionMX; load the model "
                         f"with 'sdpa' or 'eager' and swap its attention modules with ptq.passes.swap")
    module.__dict__["config"] = view.base  # the rest of the call (flash reads it too) sees the model's config
    return module._attend(query, key, value, attention_mask, **kwargs)


def _register() -> None:
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(PTQ_ATTENTION, _ptq_attention)


_register()


# ---- quantized eager attention -------------------------------------------------------------------------------------
def _repeat_heads(t: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return t
    b, h, s, d = t.shape
    return t[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)


def _quantize_key_axis(probs: torch.Tensor, spec: QuantSpec | None, key_offset: int) -> torch.Tensor:
    """Probabilities [b, h, q, kv] quantized along the key axis in blocks aligned to absolute key positions: keys
    start at position ``key_offset`` (a sliding-window cache that dropped old keys), and the dropped positions are
    zeros (masked) in a full forward, so zero padding on the left gives the blocks a full forward sees."""
    if spec is None:
        return probs
    pad = key_offset % spec.block_size
    if pad == 0:
        return _fake_quantize(probs, spec)
    padded = nn.functional.pad(probs, (pad, 0))
    return _fake_quantize(padded, spec)[..., pad:]


def quantized_eager_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                              specs: _AxisSpecs, *, scaling: float | None = None, dropout: float = 0.0,
                              softcap: float | None = None, training: bool = False, is_causal: bool = True,
                              key_offset: int = 0, where: str = "attention",
                              **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention with qk / softmax / av quantization; with those bypassed it is transformers' eager attention
    (Gemma 2's softcap included) op for op. query [b, h, q, d], key / value [b, h_kv, kv, d] (GQA by shapes).
    ``attention_mask``: float (additive) or bool (True = attend) [b, 1|h, q, kv], or None (sdpa's convention:
    causal, upper-left aligned, when q_len > 1 and ``is_causal``). ``key_offset``: the absolute position of the first
    key (see `_quantize_key_axis`). Returns (output [b, q, h, d], probabilities)."""
    extra = sorted(k for k, v in kwargs.items() if v is not None and k in _MATH_KWARGS)
    if extra:
        raise ModelError(f"{where}: the model passes {', '.join(extra)} to attention, which ptq's quantized eager "
                         f"attention does not implement; bypass qk_matmul / softmax / av_matmul for this module")
    heads, kv_heads = query.shape[1], key.shape[1]
    if heads % kv_heads:
        raise ModelError(f"{where}: {heads} query heads are not a multiple of {kv_heads} key/value heads")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    # Quantize before repeating heads: the blocks lie within one head, so repeating copies quantized values.
    key = _fake_quantize(key, specs.qk)
    value = _fake_quantize(value, specs.av_value)
    query = _fake_quantize(query, specs.qk)
    key = _repeat_heads(key, heads // kv_heads)
    value = _repeat_heads(value, heads // kv_heads)

    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        weights = weights / softcap
        weights = torch.tanh(weights)
        weights = weights * softcap
    q_len, kv_len = query.shape[-2], key.shape[-2]
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4:
            raise ModelError(
                f"{where}: qk/softmax/av quantization runs eager attention, which needs a 4-D mask tensor, got "
                f"{type(attention_mask).__name__} {tuple(getattr(attention_mask, 'shape', ()))}; load the model "
                f"with attn_implementation='sdpa' or 'eager'")
        mask = attention_mask[:, :, :, :kv_len]
        if mask.dtype == torch.bool:
            weights = weights.masked_fill(~mask, torch.finfo(weights.dtype).min)
        else:
            weights = weights + mask
    elif q_len > 1 and is_causal:
        causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril()
        weights = weights.masked_fill(~causal, torch.finfo(weights.dtype).min)

    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = _quantize_key_axis(weights, specs.softmax, key_offset)
    weights = nn.functional.dropout(weights, p=dropout, training=training)
    probs = _quantize_key_axis(weights, specs.av_probs, key_offset)
    out = torch.matmul(probs, value)
    return out.transpose(1, 2).contiguous(), weights


# ---- the module ----------------------------------------------------------------------------------------------------
class AttentionMX(nn.Module):
    """Mixin placed before the model's attention class; build instances with `AttentionMX.from_attention`.

    Attributes: ``cfg`` (`AttentionQuantConfig`), ``qk_rotation`` / ``v_rotation`` (``nn.Module | None``),
    ``force_eager`` (run the quantized eager path even when ``cfg`` does not need it; for tests and debugging),
    ``eager`` (read-only: whether the eager path runs), ``head_dim``, ``layer_idx`` (the model's).
    """

    _support: AttentionSupport  # set on each dynamic subclass

    @classmethod
    def from_attention(cls, attn: nn.Module, cfg: AttentionQuantConfig | None = None) -> "AttentionMX":
        """A quantized twin of ``attn`` sharing its submodules, parameters and attributes (nothing is copied)."""
        if isinstance(attn, AttentionMX):
            raise ModelError("from_attention got an AttentionMX; call .set_config(cfg) on it to reconfigure it")
        cfg = cfg if cfg is not None else AttentionQuantConfig()
        mx_cls = attention_mx_class(type(attn))
        check_attention_config(attn, cfg)  # before any work
        new = mx_cls.__new__(mx_cls)
        # Shallow-copy the containers (parameters, buffers, modules, hooks) so later edits of one module's
        # containers do not leak into the other; the tensors and submodules themselves are shared. An instance-level
        # `forward` (accelerate's hook wrapper) is bound to the old module and would bypass ours: it is not copied
        # (the swap pass re-attaches accelerate hooks).
        new.__dict__.update({k: copy.copy(v) if isinstance(v, (dict, set)) else v for k, v in attn.__dict__.items()
                             if k not in _INSTANCE_FORWARD_KEYS})
        new.qk_rotation = None
        new.v_rotation = None
        new.__dict__["_force_eager"] = False
        new.set_config(cfg)
        return new

    # ---- configuration -------------------------------------------------------------------------------------------
    def set_config(self, cfg: AttentionQuantConfig) -> None:
        """Replace the quantization config (axes are fixed here, never in forward)."""
        if not isinstance(cfg, AttentionQuantConfig):
            raise ModelError(f"AttentionMX needs an AttentionQuantConfig, got {type(cfg).__name__}")
        check_attention_config(self, cfg, rotations=self._has_rotations, force_eager=self.force_eager)
        self.cfg = cfg
        self._specs = _AxisSpecs.from_config(cfg)

    @property
    def force_eager(self) -> bool:
        return self.__dict__.get("_force_eager", False)

    @force_eager.setter
    def force_eager(self, value: bool) -> None:
        if value:
            check_attention_config(self, self.cfg, rotations=self._has_rotations, force_eager=True)
        self.__dict__["_force_eager"] = bool(value)

    @property
    def eager(self) -> bool:
        return self.force_eager or self.cfg.needs_eager

    @property
    def _has_rotations(self) -> bool:
        return self.__dict__.get("_modules", {}).get("qk_rotation") is not None or \
            self.__dict__.get("_modules", {}).get("v_rotation") is not None

    def set_rotations(self, qk: nn.Module | None = None, v: nn.Module | None = None) -> None:
        """Online rotations along head_dim: ``qk`` on Q and K (Q K^T unchanged), ``v`` on V before the KV-cache
        quantizer (the attention output is de-rotated per head with ``v.inverse`` before the output projection)."""
        for name, rot in (("qk", qk), ("v", v)):
            if rot is not None and not isinstance(rot, nn.Module):
                raise ModelError(f"{name} rotation must be an nn.Module, got {type(rot).__name__}")
        if v is not None and not callable(getattr(v, "inverse", None)):
            raise ModelError(f"the v rotation needs v.inverse(t) to de-rotate the output; {type(v).__name__} has none")
        if qk is not None or v is not None:
            check_attention_config(self, self.cfg, rotations=True, force_eager=self.force_eager)
        self.qk_rotation = qk
        self.v_rotation = v

    def __getattr__(self, name: str):
        if name == "head_dim":  # GPT-NeoX names it head_size
            d = self.__dict__
            if "head_size" in d:
                return d["head_size"]
            cfg = d.get("config")
            if cfg is not None and getattr(cfg, "num_attention_heads", None):
                return cfg.hidden_size // cfg.num_attention_heads
        return super().__getattr__(name)

    # ---- forward -------------------------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        writes_kv = (self.cfg.kv_cache is not None or self.cfg.rope is not None or self.qk_rotation is not None
                     or self.v_rotation is not None)
        routes = (self.eager or self.cfg.rope is not None or self.qk_rotation is not None
                  or self.v_rotation is not None)
        if not (writes_kv or routes):
            return super().forward(*args, **kwargs)
        undo: list[Callable[[], None]] = [lambda: self.__dict__.pop("_key_offset", None)]
        try:
            if writes_kv:
                args, kwargs = self._intercept_cache_writes(args, kwargs, undo)
            if routes:
                self._route_attention(undo)
            return super().forward(*args, **kwargs)
        finally:
            for restore in reversed(undo):
                restore()

    def _intercept_cache_writes(self, args: tuple, kwargs: dict, undo: list) -> tuple[tuple, dict]:
        from transformers.cache_utils import Cache

        caches = [a for a in (*args, *kwargs.values()) if isinstance(a, Cache)]
        if not caches:
            stand_in = _PassThroughCache()
            args, kwargs = self._with_cache_argument(args, kwargs, stand_in)
            caches = [stand_in]
        seen: set[int] = set()
        for cache in caches:
            for leaf in (_leaf_caches(cache) if isinstance(cache, Cache) else [cache]):
                if id(leaf) not in seen:
                    seen.add(id(leaf))
                    _patch_update(leaf, self, undo)
        return args, kwargs

    def _with_cache_argument(self, args: tuple, kwargs: dict, cache) -> tuple[tuple, dict]:
        s = self._support
        if s.cache_index is not None and len(args) > s.cache_index:
            if args[s.cache_index] is not None:
                raise ModelError(f"{type(self).__name__} layer {self.layer_idx}: its {s.cache_param} argument is a "
                                 f"{type(args[s.cache_index]).__name__}, not a transformers Cache")
            return (*args[:s.cache_index], cache, *args[s.cache_index + 1:]), kwargs
        if kwargs.get(s.cache_param) is not None:
            raise ModelError(f"{type(self).__name__} layer {self.layer_idx}: its {s.cache_param} argument is a "
                             f"{type(kwargs[s.cache_param]).__name__}, not a transformers Cache")
        # a None under another name (a deprecated alias) must not compete with the stand-in
        kwargs = {k: v for k, v in kwargs.items() if not (k in _CACHE_PARAM_NAMES and v is None)}
        kwargs[s.cache_param] = cache
        return args, kwargs

    def _write_kv(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V as the cache stores them and attention reads them."""
        s = self._specs
        if self.qk_rotation is not None:
            key = self.qk_rotation(key)
        if self.v_rotation is not None:
            value = self.v_rotation(value)
        key = _fake_quantize(_fake_quantize(key, s.rope), s.kv)
        return key, _fake_quantize(value, s.kv)

    def _route_attention(self, undo: list) -> None:
        base = self.__dict__["config"]
        impl = getattr(base, "_attn_implementation", None)
        if impl in self._support.self_checked_impls:  # the model's implementation changed after the swap
            check_attention_config(self, self.cfg, rotations=self._has_rotations, force_eager=self.force_eager)
        self.__dict__["config"] = _DispatchView(base)
        undo.append(lambda: self.__dict__.__setitem__("config", base))

    def _attend(self, query, key, value, attention_mask, **kwargs):
        """Called by the registered function with the model's config back in place: the Q-side points, then the
        quantized eager attention or the model's own implementation, then the V de-rotation."""
        if self.qk_rotation is not None:
            query = self.qk_rotation(query)
        query = _fake_quantize(query, self._specs.rope)
        impl = self.config._attn_implementation
        if self.eager:
            if impl not in (None, "eager", "sdpa"):
                check_attention_config(self, self.cfg, rotations=self._has_rotations, force_eager=self.force_eager)
            out, weights = quantized_eager_attention(
                query, key, value, attention_mask, self._specs, training=self.training,
                is_causal=kwargs.pop("is_causal", None) is not False and getattr(self, "is_causal", True),
                key_offset=self.__dict__.pop("_key_offset", 0),
                where=f"{type(self).__name__} layer {self.layer_idx}", **kwargs)
        else:
            fn = self._support.interface.get_interface(impl, self._support.eager_attention)
            out, weights = fn(self, query, key, value, attention_mask, **kwargs)
        if self.v_rotation is not None:  # out is [batch, q_len, heads, head_dim]
            out = self.v_rotation.inverse(out)
        return out, weights

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


@functools.lru_cache(maxsize=None)
def _make_mx_class(attn_cls: type) -> type:
    name = f"{attn_cls.__name__}MX"
    mx = type(name, (AttentionMX, attn_cls), {"_support": attention_support(attn_cls), "__module__": __name__,
                                              "__qualname__": name})
    module = sys.modules[__name__]
    if getattr(module, name, None) is None:  # importable by name (pickling, repr); first class of a name wins
        setattr(module, name, mx)
    return mx


def attention_mx_class(attn_cls: type) -> type:
    """The `AttentionMX` subclass for a model attention class; `ModelError` naming the class and what to do
    otherwise."""
    attn_cls = _base_attention_class(attn_cls)
    support = attention_support(attn_cls)
    if not support.kv_cache:
        raise ModelError(f"attention class {attn_cls.__module__}.{attn_cls.__name__} is not supported by AttentionMX: "
                         f"{support.refusal}. Leave it out of the recipe (or select it with bypass = true). "
                         f"Supported: {TESTED_ATTENTION}")
    return _make_mx_class(attn_cls)
