"""GPTQ for fused MoE experts (`ptq.modules.experts.ExpertsMX`): one Hessian per expert and projection.

Each expert's gate_up (``up_proj`` without a gate) and down matrices get their own Hessian
``H = 2/n sum x x^T`` over the ``n`` calibration tokens ROUTED to that expert, from exactly what the expert matmul
reads (``data_in``-quantized gathered tokens for gate_up, the quantized gated activation for down), collected through
`ExpertsMX.collector`. True sequential inside the module: every expert's gate_up is quantized first, then the
calibration data is run again, so the down Hessians see the quantized gate_up outputs.

Rarely routed experts (the policy): an expert that received fewer than ``min_tokens`` tokens for a projection
(default: that projection's in_features, below which its Hessian is singular before dampening; zero tokens always
counts as too few) is quantized with the POOLED Hessian of that projection in that layer, ``2/N sum`` over the tokens
of all experts. It is still quantized (never left at RTN or skipped), and the pass reports which experts used the
pooled Hessian (`ExpertsReport.pooled`).

Memory: the per-expert sums are ``E x in x in`` fp32 for the projection being collected (Mixtral's down:
8 x 14336^2 x 4 B = 6.6 GB), freed before the next projection.

The pass (``ptq.passes.gptq``) sees the two projections of an experts module as `ExpertsProjection` entries named
``<module>.gate_up_proj`` / ``<module>.down_proj`` (the Parameters' own state-dict keys), whose `effective_weight`
and `set_quantized_weight` carry all experts stacked as [E, out, in] for its per-layer checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ptq.errors import ModelError
from ptq.gptq.core import HessianError, gram, gptq_quantize, proxy_loss
from ptq.modules.experts import PROJECTIONS, ExpertsMX


@dataclass(frozen=True)
class ExpertsProjection:
    """One projection ("gate_up" / "down") of an `ExpertsMX`, as a GPTQ target of the pass."""

    module: ExpertsMX
    which: str

    @property
    def num_experts(self) -> int:
        return self.module.num_experts

    def effective_weight(self) -> torch.Tensor:
        """Every expert's effective [out, in] matrix, stacked: [E, out, in]."""
        return torch.stack([self.module.quantized_expert_weight(self.which, e) for e in range(self.num_experts)])

    def set_quantized_weight(self, stacked: torch.Tensor) -> None:
        """Set every expert from an [E, out, in] stack (a checkpoint written from `effective_weight`)."""
        if stacked.dim() != 3 or stacked.shape[0] != self.num_experts:
            raise ModelError(f"expected [{self.num_experts}, out, in] expert weights for {self.which}, got "
                             f"{tuple(stacked.shape)}")
        for e in range(self.num_experts):
            self.module.set_quantized_weight(self.which, e, stacked[e])


def experts_targets(name: str, module: ExpertsMX) -> list[tuple[str, ExpertsProjection]]:
    """The pass's targets for one experts module (``name`` relative to its decoder layer)."""
    return [(f"{name}.{module.param_name(p)}", ExpertsProjection(module, p)) for p in PROJECTIONS]


class HessianSums:
    """Per-expert running sums of x^T x and token counts for one projection."""

    def __init__(self, num_experts: int) -> None:
        self.sums: list[torch.Tensor | None] = [None] * num_experts
        self.counts = [0] * num_experts

    def add(self, expert_idx: int, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        if self.sums[expert_idx] is None:
            self.sums[expert_idx] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
        self.sums[expert_idx] += gram(x)
        self.counts[expert_idx] += x.shape[0]

    def hessian(self, expert_idx: int) -> torch.Tensor:
        return self.sums[expert_idx] * (2.0 / self.counts[expert_idx])

    def pooled(self) -> torch.Tensor:
        total = sum(self.counts)
        if total == 0:
            raise ModelError("no calibration token reached any expert of this layer, so there is no Hessian for "
                             "GPTQ; use more calibration data or set gptq = false for these experts")
        acc = None
        for s in self.sums:
            if s is not None:
                acc = s.clone() if acc is None else acc.add_(s)
        return acc * (2.0 / total)


def collect_hessians(module: ExpertsMX, which: str, run_calibration: Callable[[], None]) -> HessianSums:
    """Run the calibration data once (``run_calibration``) with a collector on ``module``; the ``which`` inputs of
    each expert are summed."""
    sums = HessianSums(module.num_experts)

    def collector(expert_idx: int, proj: str, x: torch.Tensor) -> None:
        if proj == which:
            sums.add(expert_idx, x)

    module.collector = collector
    try:
        run_calibration()
    finally:
        module.collector = None
    return sums


@dataclass
class ExpertsReport:
    """What GPTQ did to one experts module, per projection: routed token counts per expert, the token threshold,
    the experts quantized with the pooled Hessian, and the proxy loss per expert (with the Hessian used)."""

    tokens: dict[str, list[int]] = field(default_factory=dict)
    min_tokens: dict[str, int] = field(default_factory=dict)
    pooled: dict[str, list[int]] = field(default_factory=dict)
    proxy_loss: dict[str, list[float]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "min_tokens": self.min_tokens, "pooled_hessian": self.pooled,
                "proxy_loss": self.proxy_loss}


@torch.no_grad()
def gptq_experts(module: ExpertsMX, run_calibration: Callable[[], None], *, percdamp: float = 0.01,
                 act_order: bool = False, clip: str | None = None, min_tokens: int | None = None,
                 where: str = "experts") -> ExpertsReport:
    """GPTQ every expert of ``module``: gate_up of all experts, then (after a fresh calibration run) down.

    ``run_calibration()`` runs the calibration data through the model far enough that ``module`` completes its
    forward on every batch. ``min_tokens``: see the module docstring (None: the projection's in_features).
    ``where`` names the module in errors. The quantized matrices are installed with `set_quantized_weight`.
    """
    spec = module.cfg.weight
    if spec is None:
        raise ModelError(f"{where}: GPTQ needs a weight spec on the experts (weight_width ...)")
    report = ExpertsReport()
    for which in PROJECTIONS:
        sums = collect_hessians(module, which, run_calibration)
        threshold = int(min_tokens) if min_tokens is not None else module.in_features(which)
        pooled_h = sums.pooled()
        report.tokens[which] = list(sums.counts)
        report.min_tokens[which] = threshold
        report.pooled[which] = []
        report.proxy_loss[which] = []
        for e in range(module.num_experts):
            n = sums.counts[e]
            use_pooled = n == 0 or n < threshold
            h = pooled_h if use_pooled else sums.hessian(e)
            if use_pooled:
                report.pooled[which].append(e)
            w = module.weight_to_quantize(which, e).to(h.device)
            try:
                res = gptq_quantize(w, h, spec, percdamp=percdamp, act_order=act_order, clip=clip)
            except HessianError as err:
                raise HessianError(f"{where} expert {e} {which} ({n} tokens"
                                   f"{', pooled Hessian' if use_pooled else ''}): {err}") from None
            module.set_quantized_weight(which, e, res.weight)
            report.proxy_loss[which].append(proxy_loss(w, res.weight, h))
        del sums, pooled_h
    return report
