"""`ExpertsMX`: fused mixture-of-experts weights (transformers 5's ``@use_experts_implementation`` classes) with
fake-quantized weights and inputs.

transformers 5 stores the experts of Mixtral, Qwen2-MoE, Qwen3-MoE, GPT-OSS ... as two 3-D Parameters per layer
(``gate_up_proj`` [E, 2I, H] or ``up_proj`` [E, I, H] without a gate, and ``down_proj`` [E, H, I]; transposed layouts
store each expert as [in, out]). An `ExpertsMX` is a subclass of the model's own experts class
(``MixtralExpertsMX(ExpertsMX, MixtralExperts)``), built from an existing module without copying, so the
Parameters, their state-dict keys and ``isinstance`` checks are unchanged.

Quantization, per expert ``e`` and projection ``p`` in ("gate_up", "down"); "gate_up" names ``up_proj`` in experts
without a gate (``has_gate = False``):

- weight: ``Q_w(W_p[e])`` blocked along the expert matmul's REDUCTION axis (H for gate_up, I for down). Blocks are
  taken along the last dim of the [out, in] matrix, i.e. along the stored last dim, or along dim -2 of a transposed
  ([in, out]) layout. Computed once for all experts, cached (dropped when a Parameter's data changes), and GPTQ may
  replace any expert's matrix (`set_quantized_weight`), which is then used as is. Each expert's matrix is one
  tensor to the quantizer (NVFP4's per-tensor global scale is per expert).
- input: ``Q_in(x)`` along its last dim (the reduction axis), the same ``data_in`` spec for both projections. The
  blocks are per token, so quantizing ``hidden_states`` once before routing equals quantizing each expert's gathered
  rows after routing (tested), and that is what the forward does for gate_up. The down projection's input, the
  gated activation, exists only per expert and is quantized there. (Stochastic rounding draws noise by position in
  the quantized tensor, so with it "before routing" is a fixed but different draw than "after".)
- bias (experts with ``has_bias``): ``Q_b(b_p[e])`` along its last dim.

The router (``mlp.gate``, a ``TopKRouter`` or an ``nn.Linear`` in other families) is not part of this module; an
``nn.Linear`` router is quantized by a linear selector like any linear.

Forward: an explicit per-expert loop like transformers' eager experts forward (gather the routed tokens, up
projection, ``self._apply_gate`` (the class's own gating: concatenated or interleaved, clamped, ...) or ``act_fn``
without a gate, down projection, routing weight, ``index_add_``). It replaces the module's forward, so it runs
whatever ``config._experts_implementation`` says (grouped_mm, batched_mm, ...): those kernels cannot quantize the
gated activation. With every spec bypassed, no GPTQ weight and no collector, the forward is the ORIGINAL class
forward (dispatching as configured), so the model is bit-identical to the unquantized one; the loop itself with all
specs bypassed equals the class's eager forward bit for bit (tested).

GPTQ hook: ``collector`` (set by the GPTQ pass, see ``ptq.gptq.experts``) is called inside the loop as
``collector(expert_idx, "gate_up" | "down", prepared_input)`` with exactly what each expert matmul reads.
"""

from __future__ import annotations

import copy
import sys
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ptq.config import LinearQuantConfig
from ptq.errors import ModelError
from ptq.modules.linear import _along_last_dim, _fake_quantize, _tensor_key

PROJECTIONS: tuple[str, str] = ("gate_up", "down")
Collector = Callable[[int, str, torch.Tensor], None]

# attributes accelerate's add_hook_to_module sets on an instance (an instance forward would bypass ours)
_INSTANCE_FORWARD_KEYS = ("forward", "_old_forward", "_hf_hook")
# the layout flags `@use_experts_implementation` sets on an instance
_LAYOUT_FLAGS = ("has_gate", "has_bias", "is_transposed", "is_concatenated")


def is_experts_module(module: nn.Module) -> bool:
    """Whether ``module`` is a fused experts module this file can quantize (or already did): an instance of a class
    decorated with transformers' ``@use_experts_implementation`` (it carries the layout flags), with a 3-D
    ``down_proj`` Parameter."""
    if isinstance(module, ExpertsMX):
        return True
    down = getattr(module, "down_proj", None)
    return (all(hasattr(module, f) for f in _LAYOUT_FLAGS) and isinstance(down, nn.Parameter) and down.dim() == 3)


def check_experts_layout(module: nn.Module) -> None:
    """Refuse what the loop does not reproduce, naming the class."""
    name = f"{type(module).__module__}.{type(module).__name__}"
    if getattr(module, "has_post_expert_norm", False):
        raise ModelError(f"{name} applies a post-expert norm (has_post_expert_norm), which ExpertsMX does not "
                         f"implement; leave its experts unquantized (bypass) or select its linears only")
    if getattr(module, "_is_expert_parallel", False):
        raise ModelError(f"{name} is expert-parallel (sharded experts with sentinel indices); ExpertsMX quantizes "
                         f"unsharded experts only: load the model without expert parallelism")
    first = "gate_up_proj" if module.has_gate else "up_proj"
    for p in (first, "down_proj"):
        w = getattr(module, p, None)
        if not isinstance(w, nn.Parameter) or w.dim() != 3:
            raise ModelError(f"{name}: expected a 3-D Parameter {p} [num_experts, ...] (has_gate={module.has_gate}), "
                             f"got {type(w).__name__}; this experts layout is not supported by ExpertsMX")
        if module.has_bias and not isinstance(getattr(module, f"{p}_bias", None), nn.Parameter):
            raise ModelError(f"{name}: has_bias is set but {p}_bias is missing; layout not supported by ExpertsMX")
    if module.has_gate and not callable(getattr(module, "_apply_gate", None)):
        raise ModelError(f"{name} has a gate but no _apply_gate method; layout not supported by ExpertsMX")
    if not module.has_gate and not callable(getattr(module, "act_fn", None)):
        raise ModelError(f"{name} has no gate and no act_fn; layout not supported by ExpertsMX")


class ExpertsMX(nn.Module):
    """Mixin placed before the model's experts class; build instances with `ExpertsMX.from_experts`.

    Attributes: ``cfg`` (`LinearQuantConfig`, specs along ``axis=-1``: weight / data_in / bias apply to both
    projections), ``collector`` (None, or the GPTQ pass's callback), ``num_experts`` and the layout flags of the base
    class. Per projection: `param_name`, `in_features`, `out_features`.
    """

    @classmethod
    def from_experts(cls, experts: nn.Module, cfg: LinearQuantConfig | None = None) -> "ExpertsMX":
        """A quantized twin of ``experts`` sharing its Parameters, submodules and attributes (nothing is copied)."""
        if isinstance(experts, ExpertsMX):
            raise ModelError("from_experts got an ExpertsMX; call .set_config(cfg) on it to reconfigure it")
        if not is_experts_module(experts):
            raise ModelError(f"ExpertsMX.from_experts needs a fused experts module (a transformers class decorated "
                             f"with @use_experts_implementation), got {type(experts).__name__}")
        check_experts_layout(experts)
        mx_cls = experts_mx_class(type(experts))
        new = mx_cls.__new__(mx_cls)
        new.__dict__.update({k: copy.copy(v) if isinstance(v, (dict, set)) else v
                             for k, v in experts.__dict__.items() if k not in _INSTANCE_FORWARD_KEYS})
        new._gptq_weights = {p: {} for p in PROJECTIONS}
        new._gptq_epoch = 0
        new._weight_cache = {}
        new._bias_cache = {}
        new.collector = None
        new.cfg = LinearQuantConfig()
        new.set_config(cfg if cfg is not None else LinearQuantConfig())
        return new

    # ---- configuration -------------------------------------------------------------------------------------------
    def set_config(self, cfg: LinearQuantConfig) -> None:
        """Replace the quantization config (specs along the last dim of the [out, in] / input views). GPTQ weights
        are kept only while the weight spec is unchanged and ``cfg.gptq`` is set."""
        if not isinstance(cfg, LinearQuantConfig):
            raise ModelError(f"ExpertsMX needs a LinearQuantConfig, got {type(cfg).__name__}")
        cfg = LinearQuantConfig(weight=_along_last_dim(cfg.weight), data_in=_along_last_dim(cfg.data_in),
                                bias=_along_last_dim(cfg.bias), gptq=cfg.gptq)
        if self.has_gptq_weight and (cfg.weight != self.cfg.weight or not cfg.gptq):
            warnings.warn(f"{type(self).__name__}: the config changed, dropping the GPTQ-quantized expert weights",
                          stacklevel=2)
            self.clear_quantized_weights()
        self.cfg = cfg
        self._weight_cache = {}
        self._bias_cache = {}

    # ---- layout ----------------------------------------------------------------------------------------------------
    def param_name(self, which: str) -> str:
        """The Parameter holding projection ``which`` ("gate_up" -> ``gate_up_proj``, or ``up_proj`` without gate)."""
        if which == "gate_up":
            return "gate_up_proj" if self.has_gate else "up_proj"
        if which == "down":
            return "down_proj"
        raise ModelError(f"unknown experts projection {which!r}; use one of {', '.join(PROJECTIONS)}")

    def _param(self, which: str) -> nn.Parameter:
        return getattr(self, self.param_name(which))

    def _bias(self, which: str) -> nn.Parameter | None:
        return getattr(self, self.param_name(which) + "_bias") if self.has_bias else None

    def _matmul_view(self, w: torch.Tensor) -> torch.Tensor:
        """[E, out, in] view of a stored [E, out, in] or (transposed) [E, in, out] tensor."""
        return w.transpose(-1, -2) if self.is_transposed else w

    def in_features(self, which: str) -> int:
        return self._matmul_view(self._param(which)).shape[-1]

    def out_features(self, which: str) -> int:
        return self._matmul_view(self._param(which)).shape[-2]

    # ---- weights: RTN, GPTQ ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def weight_to_quantize(self, which: str, expert_idx: int) -> torch.Tensor:
        """Expert ``expert_idx``'s fp32 [out, in] matrix of projection ``which`` (a fresh contiguous copy)."""
        self._check_expert(expert_idx)
        w = self._matmul_view(self._param(which).detach()[expert_idx])
        return w.to(torch.float32).clone(memory_format=torch.contiguous_format)

    @torch.no_grad()
    def set_quantized_weight(self, which: str, expert_idx: int, wq: torch.Tensor) -> None:
        """Store GPTQ's [out, in] result for one expert; the forward uses it as is (never re-quantized)."""
        self._check_expert(expert_idx)
        shape = (self.out_features(which), self.in_features(which))
        if tuple(wq.shape) != shape:
            raise ModelError(f"set_quantized_weight({which!r}, {expert_idx}): shape {tuple(wq.shape)} != [out, in] "
                             f"{shape}")
        p = self._param(which)
        self._gptq_weights[which][int(expert_idx)] = wq.detach().to(device=p.device, dtype=p.dtype).clone()
        self._gptq_epoch += 1

    def clear_quantized_weights(self) -> None:
        """Forget every GPTQ weight: all experts are fake-quantized by RTN again."""
        self._gptq_weights = {p: {} for p in PROJECTIONS}
        self._gptq_epoch += 1

    @property
    def has_gptq_weight(self) -> bool:
        return any(self._gptq_weights[p] for p in PROJECTIONS)

    def gptq_experts(self, which: str) -> list[int]:
        """The experts whose ``which`` matrix was set by GPTQ."""
        self.param_name(which)
        return sorted(self._gptq_weights[which])

    def effective_weight(self, which: str) -> torch.Tensor:
        """All experts' ``which`` weights as the forward multiplies them, in the stored layout ([E, out, in], or
        [E, in, out] when transposed): GPTQ weights where set, else ``Q_w`` (RTN); the Parameter itself when the
        weight is not quantized. Cached."""
        p = self._param(which)
        gptq = self._gptq_weights[which]
        if self.cfg.weight is None and not gptq:
            return p
        key = (_tensor_key(p), self._gptq_epoch)
        hit = self._weight_cache.get(which)
        if hit is None or hit[0] != key:
            with torch.inference_mode(False), torch.no_grad():
                w = self._matmul_view(p.detach())
                if self.cfg.weight is None:  # GPTQ weights over unquantized ones: never write into the Parameter
                    wq = w.clone()
                else:
                    # one call per expert: each expert's matrix is its own tensor (nvfp4's per-tensor global
                    # scale is per expert, as GPTQ computes it); for the MX families this equals one call on [E, ...]
                    wq = torch.stack([_fake_quantize(w[e].to(torch.float32), self.cfg.weight).to(p.dtype)
                                      for e in range(w.shape[0])])
                for e, q in gptq.items():
                    wq[e] = q
                # stored layout, contiguous: the matmul reads it like the original Parameter
                wq = self._matmul_view(wq).contiguous()
            self._weight_cache[which] = (key, wq)
            hit = self._weight_cache[which]
        return hit[1]

    def quantized_expert_weight(self, which: str, expert_idx: int) -> torch.Tensor:
        """Expert ``expert_idx``'s effective [out, in] ``which`` matrix (GPTQ or RTN), on the grid of
        ``cfg.weight`` blocked along in; what an exporter packs per expert (e.g. ``PackedLinear.from_weight``)."""
        self._check_expert(expert_idx)
        return self._matmul_view(self.effective_weight(which)[expert_idx])

    def effective_bias(self, which: str) -> torch.Tensor | None:
        b = self._bias(which)
        if b is None or self.cfg.bias is None:
            return b
        key = _tensor_key(b)
        hit = self._bias_cache.get(which)
        if hit is None or hit[0] != key:
            with torch.inference_mode(False), torch.no_grad():
                self._bias_cache[which] = (key, _fake_quantize(b.detach(), self.cfg.bias))
        return self._bias_cache[which][1]

    def _check_expert(self, expert_idx: int) -> None:
        if not 0 <= int(expert_idx) < self.num_experts:
            raise ModelError(f"expert index {expert_idx} out of range for {self.num_experts} experts")

    # ---- forward -------------------------------------------------------------------------------------------------
    @property
    def quantizes(self) -> bool:
        """Whether the forward differs from the original one (a spec, a GPTQ weight or a collector is set)."""
        return not self.cfg.bypassed or self.has_gptq_weight or self.collector is not None

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                *args, **kwargs) -> torch.Tensor:
        if not self.quantizes:
            return super().forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
        if args or kwargs:
            raise ModelError(f"{type(self).__name__}: unexpected extra arguments to the experts forward")
        return self._quantized_forward(hidden_states, top_k_index, top_k_weights)

    def _project(self, x: torch.Tensor, which: str, expert_idx: torch.Tensor) -> torch.Tensor:
        """One expert's matmul, op for op as the eager forwards of the two layouts do it."""
        w = self.effective_weight(which)[expert_idx]
        b = self.effective_bias(which)
        b = None if b is None else b[expert_idx]
        if self.is_transposed:
            out = x @ w
            return out if b is None else out + b
        return F.linear(x, w, b)

    def _quantized_forward(self, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        spec_in = self.cfg.data_in
        collect = self.collector
        # per-token blocks: quantizing every token once here equals quantizing each expert's gathered rows
        x_all = _fake_quantize(hidden_states, spec_in)
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit:
            expert_idx = expert_idx[0]
            if expert_idx == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
            x = x_all[token_idx]
            if collect is not None:
                collect(int(expert_idx), "gate_up", x)
            h = self._project(x, "gate_up", expert_idx)
            h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
            h = _fake_quantize(h, spec_in)
            if collect is not None:
                collect(int(expert_idx), "down", h)
            out = self._project(h, "down", expert_idx)
            out = out * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._gptq_weights = {p: {e: fn(w) for e, w in d.items()} for p, d in self._gptq_weights.items()}
        self._weight_cache = {}
        self._bias_cache = {}
        return out

    def extra_repr(self) -> str:
        c = self.cfg
        parts = [f"num_experts={self.num_experts}",
                 *(f"{p}=[{self.out_features(p)}, {self.in_features(p)}]" for p in PROJECTIONS),
                 f"layout={'[in, out]' if self.is_transposed else '[out, in]'}",
                 f"weight={c.weight or 'bypass'}", f"data_in={c.data_in or 'bypass'}"]
        if self.has_bias:
            parts.append(f"bias_q={c.bias or 'bypass'}")
        if c.gptq or self.has_gptq_weight:
            parts.append("gptq=" + ("done" if self.has_gptq_weight else "pending"))
        return ", ".join(parts)


# model experts class -> its ExpertsMX subclass. A memo of classes made on demand (any decorated experts class is
# supported, so they cannot all be listed up front like the attention classes): one class per base keeps
# isinstance / type checks and pickling stable across swaps.
_MX_CLASSES: dict[type, type] = {}


def experts_mx_class(experts_cls: type) -> type:
    """The `ExpertsMX` subclass of a model's experts class, made once per class and importable by name from this
    module (pickling, repr)."""
    mx = _MX_CLASSES.get(experts_cls)
    if mx is None:
        name = f"{experts_cls.__name__}MX"
        mx = type(name, (ExpertsMX, experts_cls), {"__module__": __name__, "__qualname__": name})
        existing = getattr(sys.modules[__name__], name, None)
        if existing is not None:  # two model classes of one name (should not happen in transformers)
            raise ModelError(f"two experts classes named {experts_cls.__name__}: {existing} and {experts_cls}")
        setattr(sys.modules[__name__], name, mx)
        _MX_CLASSES[experts_cls] = mx
    return mx
