"""OCP MX integer and minifloat quantizers (mxint, mxfp) and their element grids, reused by nvfp4.

Shared scale (OCP MX v1.0): X = 2^e with e = floor(log2 amax) - emax, clamped to the E8M0 range [-127, 127];
amax is taken over the block's finite elements (zero padding included). ``scale_rule="ceil"`` picks the smallest e
with amax / 2^e <= max_normal instead. An all-zero block gets the smallest scale 2^-127 (E8M0 code 0), so its
elements stay zero.
"""

from __future__ import annotations

import torch

from ptq.formats import E8M0_MAX_EXP, E8M0_MIN_EXP, QuantSpec
from ptq.quantizers.common import exp2i, finite_abs, floor_log2, round_magnitude, surely_finite


def minifloat_elements(v: torch.Tensor, spec: QuantSpec, noise: torch.Tensor | None = None,
                       rounding: str | None = None) -> torch.Tensor:
    """Round fp32 ``v`` to the ExMy grid of ``spec`` (exponent / mantissa bits, emin, max_normal).

    Step 2^(E - man_bits) with E = max(floor(log2|v|), emin), so subnormal elements are exact; magnitudes above the
    grid saturate to +-max_normal. Non-finite ``v`` give meaningless values: callers restore them.
    """
    rounding = rounding or spec.rounding
    a = v.abs()
    emax = spec.emax
    # Anything at or above 2^(emax+1) saturates anyway; capping E keeps the step inside fp32.
    finite_a = a if surely_finite(a) else torch.where(torch.isfinite(a), a, torch.zeros_like(a))
    e = floor_log2(finite_a).clamp(min=spec.emin, max=emax + 1)
    step = exp2i(e - spec.man_bits)
    n = round_magnitude(a / step, rounding, noise)
    q = torch.clamp(n * step, max=spec.max_normal)
    return torch.copysign(q, v)


def mxint_elements(v: torch.Tensor, spec: QuantSpec, noise: torch.Tensor | None = None,
                   rounding: str | None = None) -> torch.Tensor:
    """Round fp32 ``v`` to the MXINT grid m / 2^(w-2), |m| <= 2^(w-1) - 1 (symmetric; zero is always +0)."""
    rounding = rounding or spec.rounding
    frac = float(1 << spec.mxint_frac_bits)
    m = torch.clamp(round_magnitude(v.abs() * frac, rounding, noise), max=float(spec.int_levels))
    # Two's-complement codes have no -0, so a zero element is +0 whatever the sign of v: adding +0 turns -0 into +0
    # and leaves every other value (and NaN, which callers restore from the input) as it is, in one pass.
    m = torch.copysign(m, v) + 0.0
    return m / frac


def element_grid(v: torch.Tensor, spec: QuantSpec, noise: torch.Tensor | None = None) -> torch.Tensor:
    if spec.family == "mxint":
        return mxint_elements(v, spec, noise)
    return minifloat_elements(v, spec, noise)


def mx_scale_exponent(amax: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """int32 shared exponent e of each block from its finite amax (see module docstring)."""
    amax = amax.to(torch.float32)
    k = floor_log2(amax)
    e = k - spec.emax
    if spec.scale_rule == "ceil":
        # amax / 2^e = m * 2^emax with m = amax / 2^k in [1, 2) exact, so compare m against max_normal / 2^emax.
        m = amax / exp2i(k.clamp(-149, 127))
        e = e + (m > spec.max_normal / 2.0 ** spec.emax).to(torch.int32)
    e = torch.where(amax > 0, e, torch.full_like(e, E8M0_MIN_EXP))
    return e.clamp(E8M0_MIN_EXP, E8M0_MAX_EXP)


def mx_block_scales(xb: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """fp32 scale 2^e per block, shape ``[..., 1]`` for ``xb`` of shape ``[..., block]``."""
    amax = finite_abs(xb).amax(dim=-1, keepdim=True)
    return exp2i(mx_scale_exponent(amax, spec))


def mx_quantize_with_scale(x: torch.Tensor, scale: torch.Tensor, spec: QuantSpec,
                           noise: torch.Tensor | None = None) -> torch.Tensor:
    """Element-quantize fp32 ``x`` against the power-of-two ``scale``; returns q * scale in fp32."""
    return element_grid(x / scale, spec, noise) * scale


def mx_fake_blocks(xb: torch.Tensor, spec: QuantSpec, noise: torch.Tensor | None = None) -> torch.Tensor:
    return mx_quantize_with_scale(xb, mx_block_scales(xb, spec), spec, noise)
