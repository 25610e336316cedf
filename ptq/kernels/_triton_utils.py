"""In-kernel helpers shared by the MX kernels (and by other kernels that quantize tiles, e.g. Hadamard + quantize).

Every helper here is exact on the GPU *and* under ``TRITON_INTERPRET=1``. That rules out shortcuts that differ
between the two: ``libdevice.rint`` (does not run in the interpreter), an fp32 -> bf16 ``.to()`` (the interpreter
truncates, the GPU rounds to nearest even), a bf16 -> fp32 ``.to()`` (the interpreter flushes subnormals) and
``log2`` + ``floor`` (inexact near powers of two). Instead:

- ``floor_log2`` reads the exponent bits (subnormals are first scaled by 2^64, which is exact);
  ``floor_log2_normal`` skips that where the caller clamps the result to >= -126 anyway;
- ``exp2i`` builds 2^e from bits (including the fp32 subnormal range); ``exp2i_normal`` for e in [-126, 127];
- ``round_magnitude`` rounds a non-negative fp32 to an integer: half-even as (a + 1.5 * 2^23) - 1.5 * 2^23 on
  a <= 2^22 (exact; callers saturate far below 2^22), half-away with ``floor`` and an exact remainder (``a + 0.5``
  rounds just below a half), truncation with ``floor``, stochastic as floor(a + u);
- ``f32_to_bf16_bits`` rounds to nearest even with integer arithmetic on the bit pattern, and ``bf16_bits_to_f32``
  widens bf16 by a shift.

All of them are cheap integer / fp32 operations: the kernels are meant to run at memory speed, where the budget
is a few dozen instructions per element.

Rounding-mode ids (``ROUNDING`` constexpr): 0 even, 1 nearest (half away from zero), 2 floor (truncate the
magnitude), 3 stochastic (``floor(a + u)`` with ``u`` in [0, 1) read from a noise tensor).
"""

from __future__ import annotations

import triton
import triton.language as tl

ROUNDING_IDS: dict[str, int] = {"even": 0, "nearest": 1, "floor": 2, "stochastic": 3}


@triton.jit
def floor_log2(a):
    """Exact floor(log2(a)) as int32 for finite fp32 ``a > 0`` (subnormals included). ``a == 0`` gives -191."""
    ex = a.to(tl.int32, bitcast=True) >> 23
    # 2^64 lifts every fp32 subnormal into the normal range without rounding.
    ex_sub = (a * 18446744073709551616.0).to(tl.int32, bitcast=True) >> 23
    return tl.where(ex == 0, ex_sub - 64, ex) - 127


@triton.jit
def floor_log2_normal(a):
    """floor(log2(a)) for fp32 ``a >= 0`` (sign bit clear) that is exact for normal ``a``; subnormals and zero give
    -127, +inf / NaN 128. Use it only where the result is then clamped to >= -126."""
    return (a.to(tl.int32, bitcast=True) >> 23) - 127


@triton.jit
def exp2i(e):
    """Exact 2^e as fp32 for int32 ``e`` in [-149, 127] (below -126 the result is an fp32 subnormal)."""
    normal = ((e + 127) << 23).to(tl.float32, bitcast=True)
    shift = tl.minimum(tl.maximum(e + 149, 0), 22)
    sub = (tl.full(e.shape, 1, tl.int32) << shift).to(tl.float32, bitcast=True)
    return tl.where(e >= -126, normal, sub)


@triton.jit
def exp2i_normal(e):
    """Exact 2^e as fp32 for int32 ``e`` in [-126, 127]."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def round_magnitude(a, u, ROUNDING: tl.constexpr, BOUNDED: tl.constexpr = False):
    """Round ``a >= 0`` (fp32) to an integer-valued fp32 with rounding mode ``ROUNDING``.

    Half-even results are exact for a <= 2^22 and capped at 2^22 above (callers saturate far below that).
    ``BOUNDED``: the caller guarantees a <= 2^22, so the cap (one instruction per element) is left out.
    """
    if ROUNDING == 0:
        if BOUNDED:
            r = (a + 12582912.0) - 12582912.0
        else:
            r = (tl.minimum(a, 4194304.0) + 12582912.0) - 12582912.0
    elif ROUNDING == 1:
        r = tl.floor(a)
        r = tl.where(a - r >= 0.5, r + 1.0, r)  # a - floor(a) is exact
    elif ROUNDING == 2:
        r = tl.floor(a)
    else:
        r = tl.floor(a + u)
    return r


@triton.jit
def copysign_bits(mag, x):
    """``mag`` (fp32 with a clear sign bit) with the sign bit of ``x`` (fp32): keeps -0.0 for negative inputs."""
    sign = x.to(tl.int32, bitcast=True) & -2147483648
    return (mag.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def bf16_bits_to_f32(b):
    """fp32 value of bf16 bit patterns ``b`` (int16). Exact for subnormals, which the interpreter's bf16 -> fp32
    ``.to()`` flushes to zero."""
    return (b.to(tl.int32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def f32_to_bf16_bits(y, EXACT: tl.constexpr):
    """Round fp32 ``y`` to bf16 (nearest even) and return the 16-bit pattern as int16. NaN -> quiet NaN.
    ``EXACT``: the caller guarantees ``y`` is representable in bf16, so the low half is simply dropped."""
    b = y.to(tl.int32, bitcast=True)
    if EXACT:
        out = b >> 16
    else:
        rounded = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        out = tl.where(y != y, (b >> 16) | 0x0040, rounded)
    return out.to(tl.int16)


@triton.jit
def minifloat_round(a, u, MAN_BITS: tl.constexpr, EMIN: tl.constexpr, EMAX: tl.constexpr,
                    MAX_NORMAL: tl.constexpr, ROUNDING: tl.constexpr):
    """Round a magnitude ``a >= 0`` (element units) onto the minifloat grid ExMy, saturating at MAX_NORMAL.

    Exponent E = floor(log2 a) clamped to [EMIN, EMAX + 1] (subnormal elements below 2^EMIN are exact; anything at
    or above 2^(EMAX+1) saturates anyway), step 2^(E - MAN_BITS); a / step is formed by power-of-two products that
    round exactly like the division (at most one of them is inexact, and only by underflow).
    """
    e = tl.minimum(tl.maximum(floor_log2_normal(a), EMIN), EMAX + 1)  # EMIN >= -126 for <= 8 exponent bits
    if (MAN_BITS - EMIN <= 127) and (MAN_BITS - EMAX - 1 >= -126) and (EMIN - MAN_BITS >= -126):
        units = a * exp2i_normal(MAN_BITS - e)
        step = exp2i_normal(e - MAN_BITS)
    else:  # very wide exponents: 2^(MAN_BITS - e) alone can leave the fp32 range
        if EMIN > 0:  # no subnormal headroom: a is small, scaling it up first cannot overflow
            units = (a * (1 << MAN_BITS)) * exp2i(-e)
        else:  # a * 2^-e scales up or lands in [1, 2): exact
            units = (a * exp2i(-e)) * (1 << MAN_BITS)
        step = exp2i(e - MAN_BITS)
    return tl.minimum(round_magnitude(units, u, ROUNDING) * step, MAX_NORMAL)


@triton.jit
def minifloat_code(q, negative, W: tl.constexpr, MAN_BITS: tl.constexpr, EMIN: tl.constexpr, BIAS: tl.constexpr):
    """Bit pattern (int32) of a grid magnitude ``q`` (from ``minifloat_round``): sign | exponent | mantissa."""
    lg = floor_log2_normal(q)
    normal = lg >= EMIN
    e = tl.maximum(lg, EMIN)
    if EMIN > 0:
        mant_units = ((q * (1 << MAN_BITS)) * exp2i(-e)).to(tl.int32)
    else:
        mant_units = ((q * exp2i(-e)) * (1 << MAN_BITS)).to(tl.int32)  # exact integer in [0, 2^(MAN_BITS+1))
    exp_field = tl.where(normal, e + BIAS, 0)
    mant = tl.where(normal, mant_units - (1 << MAN_BITS), mant_units)
    return (negative.to(tl.int32) << (W - 1)) | (exp_field << MAN_BITS) | mant
