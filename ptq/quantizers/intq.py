"""Per-group integer quantization with fp32 scales (family ``int``).

Symmetric: scale = amax / (2^(w-1) - 1), q = clamp(round(x / scale), -(2^(w-1) - 1), 2^(w-1) - 1), value q * scale.
Asymmetric: the range is [min(block min, 0), max(block max, 0)] -- it always contains 0, so 0 is exact and the zero
point fits the w-bit code range -- scale = (max - min) / (2^w - 1), zero = round_even(-min / scale),
q = clamp(round(x / scale) + zero, 0, 2^w - 1), value (q - zero) * scale.
Statistics use the block's finite elements; a scale of 0 (all-zero block) gives zeros; zeros are
+0 (integer codes carry no sign of zero). x / scale is a true
division (kernels use div_rn), never a multiplication by a reciprocal.
"""

from __future__ import annotations

import torch

from ptq.formats import QuantSpec
from ptq.quantizers.common import finite_abs, round_signed, true_div


def int_block_scales(xb: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale, zero_point | None), each fp32 of shape ``[..., 1]`` for ``xb`` of shape ``[..., group]``."""
    if spec.symmetric:
        amax = finite_abs(xb).amax(dim=-1, keepdim=True)
        return true_div(amax, float(spec.int_levels)), None
    finite = torch.isfinite(xb)
    zero = torch.zeros((), dtype=xb.dtype, device=xb.device)
    lo = torch.where(finite, xb, zero).amin(dim=-1, keepdim=True).clamp(max=0.0)
    hi = torch.where(finite, xb, zero).amax(dim=-1, keepdim=True).clamp(min=0.0)
    scale = true_div(hi - lo, float(spec.int_levels))
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    zp = torch.where(scale > 0, torch.round(-lo / safe), torch.zeros_like(scale))
    return scale, zp


def int_codes(x: torch.Tensor, scale: torch.Tensor, spec: QuantSpec, zero_point: torch.Tensor | None = None,
              noise: torch.Tensor | None = None) -> torch.Tensor:
    """Integer codes (as fp32) of ``x`` for a broadcastable ``scale`` (and ``zero_point`` when asymmetric)."""
    scale = scale.to(torch.float32)
    positive = scale > 0
    safe = torch.where(positive, scale, torch.ones_like(scale))
    n = round_signed(x / safe, spec.rounding, noise)
    if spec.symmetric:
        lim = float(spec.int_levels)
        # Two's-complement codes have no -0: a zero code is +0 (and so is every element of a zero-scale group).
        return torch.where(positive & (n != 0), n.clamp(-lim, lim), torch.zeros_like(n))
    zp = zero_point.to(torch.float32)
    return torch.where(positive, (n + zp).clamp(0.0, float(spec.int_levels)), zp.expand_as(n))


def int_dequant(q: torch.Tensor, scale: torch.Tensor, spec: QuantSpec,
                zero_point: torch.Tensor | None = None) -> torch.Tensor:
    scale = scale.to(torch.float32)
    if spec.symmetric:
        return q * scale
    return (q - zero_point.to(torch.float32)) * scale


def int_quantize_with_scale(x: torch.Tensor, scale: torch.Tensor, spec: QuantSpec,
                            zero_point: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    return int_dequant(int_codes(x, scale, spec, zero_point, noise), scale, spec, zero_point)


def int_fake_blocks(xb: torch.Tensor, spec: QuantSpec, noise: torch.Tensor | None = None) -> torch.Tensor:
    scale, zp = int_block_scales(xb, spec)
    return int_quantize_with_scale(xb, scale, spec, zp, noise)
