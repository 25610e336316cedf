"""Per-block scale (clip) search for weight quantization.

A block's scale is normally what the format's own rule gives (``block_scales``). A smaller scale clips the block's
largest elements but gives the rest a finer grid; a larger one avoids clipping. The search tries a few candidate
scales per (row, block) and keeps the one with the least error, vectorised over rows and candidates.

Candidates are produced by scaling the block by a multiplier ``m`` before asking the format for its scale, so every
candidate is a scale the format can really encode (E8M0 powers of two, E4M3 block scales, fp32 int scales):

- MX families (mxint, mxfp, mx6, mx9): scales are powers of two, so only a handful differ. ``m`` in
  ``(1, 2, 1/2, 1/4)`` gives exactly the rule's scale times 2^k for k in {0, +1, -1, -2} (multiplying by a power of
  two commutes with floor(log2)). k = +1 helps blocks whose largest element falls between the grid's top and the next
  power of two (the floor rule clips it); k = -1 / -2 trade the one outlier for a twice / four times finer grid for
  the rest. On synthetic outlier layers (tests/test_gptq_core.py's generator, 4 seeds, 128 x 256) k = -3 was never
  chosen for mxint4/8, mxfp4 or mx6, while each of -2..+1 was chosen for some blocks, so the set stops at -2.
- nvfp4 / int: clip ratios ``(1, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)`` of the block's range.

Each candidate is evaluated once for all rows; ties keep the earlier candidate, so ``m = 1`` (no search) wins unless
another candidate is strictly better. Hence the chosen error is never above the unsearched one.

Inside GPTQ (``ptq.gptq.core``) the search runs when a block is reached, on its current error-updated weights, and
the output objective uses the damped Hessian. For mx6 / mx9 the candidates move the shared block exponent; the pair
prime bits are then decided by ``quantize_with_scale`` as usual.

Objectives (per row of the block, ``e = w - q(w)``):
- ``"weight"`` (``quantile_search``): ``||e||^2``.
- ``"output"`` (``clip_search_y``): ``e H_b e^T`` with ``H_b`` the block's diagonal sub-block of the layer-input
  Hessian, i.e. the squared output error of this block on the calibration activations (no extra forward needed).
"""

from __future__ import annotations

from typing import Literal

import torch

from ptq.errors import QuantSpecError
from ptq.formats import QuantSpec

Objective = Literal["weight", "output"]
OBJECTIVES: tuple[str, ...] = ("weight", "output")

MX_MULTIPLIERS: tuple[float, ...] = (1.0, 2.0, 0.5, 0.25)
RATIO_MULTIPLIERS: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def scale_multipliers(spec: QuantSpec) -> tuple[float, ...]:
    """The candidate multipliers for ``spec``; the first one (1.0) is the format's own rule."""
    return MX_MULTIPLIERS if spec.family in ("mxint", "mxfp", "mx6", "mx9") else RATIO_MULTIPLIERS


def candidate_multipliers(spec: QuantSpec, device: torch.device | str) -> torch.Tensor:
    """`scale_multipliers` as an fp32 tensor on ``device``."""
    return torch.tensor(scale_multipliers(spec), dtype=torch.float32, device=device)


def element_group(spec: QuantSpec) -> int:
    """Columns quantized together: mx6 / mx9 share a prime bit between pairs of elements."""
    return 2 if spec.family in ("mx6", "mx9") else 1


def pad_block(w: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad the last dim to ``length`` (the reference pads tail blocks with zeros the same way)."""
    short = length - w.shape[-1]
    return torch.nn.functional.pad(w, (0, short)) if short > 0 else w


def quantize_block(
    w: torch.Tensor,
    scale: torch.Tensor,
    spec: QuantSpec,
    zero_point: torch.Tensor | None = None,
    global_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Element-quantize ``w [..., L]`` with a given per-row scale (as `rule_scale` returns it); pads an odd length
    for mx6/mx9 pairs. nvfp4: ``scale`` is the E4M3 block scale and ``global_scale`` is required."""
    from ptq.quantizers import quantize_with_scale

    n = w.shape[-1]
    g = element_group(spec)
    wp = pad_block(w, -(-n // g) * g)
    q = quantize_with_scale(wp, scale, spec, zero_point=zero_point, global_scale=global_scale)
    return q[..., :n].float()


def rule_scale(
    w: torch.Tensor, spec: QuantSpec, global_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The format's own scale (and zero point) for block ``w [..., L]`` (L <= block_size; shorter is zero-padded).

    nvfp4: the decoded E4M3 block scale alone (``global_scale`` required), so that `quantize_block` computes
    (q * s) * g exactly as the reference does."""
    from ptq.quantizers import block_scales, nvfp4_block_scales

    wp = pad_block(w.float(), spec.block_size)
    if spec.family == "nvfp4":
        if global_scale is None:
            raise QuantSpecError("nvfp4 block scales need the tensor's global scale (nvfp4_global_scale(weight))")
        return nvfp4_block_scales(wp, global_scale), None
    return block_scales(wp, spec)


def search_block_scale(
    w: torch.Tensor,
    spec: QuantSpec,
    objective: Objective,
    h_block: torch.Tensor | None = None,
    global_scale: torch.Tensor | None = None,
    multipliers: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pick, per row, the candidate scale of block ``w [rows, L]`` with the least ``objective``.

    Returns ``(scale [rows, 1], zero_point [rows, 1] | None)`` in the format ``quantize_with_scale`` takes.
    ``h_block [L, L]`` is required for ``objective="output"``. ``multipliers``: `candidate_multipliers` on ``w``'s
    device, for callers that search many blocks (building it per block is a host-to-device copy, which waits for the
    GPU).
    """
    if objective not in OBJECTIVES:
        raise QuantSpecError(f"unknown clip-search objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if objective == "output" and h_block is None:
        raise QuantSpecError("clip_search_y (objective 'output') needs the block's Hessian h_block")
    w = w.float()
    mult = candidate_multipliers(spec, w.device) if multipliers is None else multipliers
    cands = w.unsqueeze(0) * mult.view(-1, 1, 1)  # [C, rows, L]
    scales, zps = rule_scale(cands, spec, global_scale)  # [C, rows, 1]
    q = quantize_block(w.unsqueeze(0).expand_as(cands), scales, spec, zps, global_scale)
    err = w.unsqueeze(0) - q
    if objective == "weight":
        loss = err.square().sum(-1)
    else:
        loss = torch.einsum("cri,ij,crj->cr", err, h_block.float(), err)
    # A candidate that rounds the row exactly as an earlier one is a tie, but the batched GEMM may sum the two
    # candidates' equal errors in different orders: let it never win, so ties go to the earlier multiplier
    # whatever the GEMM does (as in the Triton kernel, which compares losses with a strict <).
    for c in range(1, q.shape[0]):
        repeat = (q[c].unsqueeze(0) == q[:c]).all(-1).any(0)
        loss[c] = loss[c].masked_fill(repeat, float("inf"))
    best = loss.argmin(0)  # first minimum: multiplier 1 on ties
    rows = torch.arange(w.shape[0], device=w.device)
    scale = scales[best, rows]
    zp = zps[best, rows] if zps is not None else None
    return scale, zp


def block_objective(
    w: torch.Tensor, q: torch.Tensor, objective: Objective, h_block: torch.Tensor | None = None
) -> torch.Tensor:
    """The per-row objective of a quantized block (for tests and reports)."""
    err = w.float() - q.float()
    if objective == "weight":
        return err.square().sum(-1)
    return torch.einsum("ri,ij,rj->r", err, h_block.float(), err)
