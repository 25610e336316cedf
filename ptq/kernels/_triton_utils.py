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
  widens bf16 by a shift;
- ``div_exact`` is fl(a / d) for many ``a`` over one divisor ``d`` (a block's scale): a multiply and four fused
  multiply-adds against a correctly rounded reciprocal computed once per divisor by ``divisor_consts``, instead of
  one ``div_rn`` per element (a reciprocal, FCHK and a branch to a slow path, ~12 instructions that the compiler
  cannot interleave across elements). ``fma_rn`` is the fused multiply-add it needs: ``tl.fma`` on the GPU; the
  interpreter's ``tl.fma`` rounds the product first, so there it is emulated exactly in fp64.

All of them are cheap integer / fp32 operations: the kernels are meant to run at memory speed, where the budget
is a few dozen instructions per element.

Rounding-mode ids (``ROUNDING`` constexpr): 0 even, 1 nearest (half away from zero), 2 floor (truncate the
magnitude), 3 stochastic (``floor(a + u)`` with ``u`` in [0, 1) read from a noise tensor).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton import knobs

# ``triton.jit`` picks the interpreter at decoration time (import) from this knob, so this is how every kernel here
# runs: the one place the kernel modules read it (as a Python bool for launch decisions, a constexpr in kernels).
INTERPRETED: bool = bool(knobs.runtime.interpret)
_INTERPRET = tl.constexpr(INTERPRETED)

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
def round_even_signed(t):
    """Round fp32 ``t`` with |t| <= 2^22 to an integer, ties to even, both signs at once (t + 1.5 * 2^23 stays in
    the binade whose ulp is 1, and 1.5 * 2^23 is even). A zero result is +0, like an integer code."""
    return (t + 12582912.0) - 12582912.0


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
def minifloat_round_even(a, MAN_BITS: tl.constexpr, EMIN: tl.constexpr, EMAX: tl.constexpr,
                         MAX_NORMAL: tl.constexpr):
    """``minifloat_round(a, 0.0, ..., ROUNDING=0)`` in about half the instructions, for grids with
    EMAX - MAN_BITS <= 103 (E2M1, E4M3, ...): with E the clamped exponent as there, (a + C) - C and
    C = 1.5 * 2^(23 + E - MAN_BITS) round ``a`` to a multiple of the step 2^(E - MAN_BITS), ties to even (C's ulp
    is the step and C / step is even), exactly while a < 2^(E + 1); above that E is EMAX + 1 and the sum only grows,
    so the result saturates as it should. ``a >= 0``; NaN stays NaN (a / 0 for a = 0 is NaN in the reference too;
    the GPU's plain min would return MAX_NORMAL)."""
    eb = tl.minimum(tl.maximum(a.to(tl.int32, bitcast=True) >> 23, EMIN + 127), EMAX + 128)
    c = (((eb + (23 - MAN_BITS)) << 23) | 0x400000).to(tl.float32, bitcast=True)
    return tl.minimum((a + c) - c, MAX_NORMAL, propagate_nan=tl.PropagateNan.ALL)


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


@triton.jit
def fma_rn(x, y, z):
    """x * y + z (fp32) rounded once to nearest even, on the GPU and in the interpreter."""
    if _INTERPRET:
        return _fma_emulated(x, y, z)
    else:
        return tl.fma(x, y, z)


@triton.jit
def _fma_emulated(x, y, z):
    """Interpreter-only exact fma. The fp32 product is exact in fp64 (48 bits); TwoSum gives the fp64 sum ``s`` and
    its exact error; stepping ``s`` one fp64 ulp towards the error when its last bit is even rounds the exact sum to
    odd, and rounding a 53-bit round-to-odd value to 24 bits is the same as rounding the exact value (>= 2 extra
    bits; Boldo & Melquiond). Non-finite sums are left to fp64."""
    p = x.to(tl.float64) * y.to(tl.float64)
    z64 = z.to(tl.float64)
    s = p + z64
    pv = s - z64
    err = (p - pv) + (z64 - (s - pv))
    b = s.to(tl.int64, bitcast=True)
    step = tl.where((err > 0) == (s > 0), b + 1, b - 1)  # one ulp larger / smaller in magnitude
    fix = (err != 0) & ((b & 1) == 0) & (tl.abs(s) < float("inf"))
    return tl.where(fix, step, b).to(tl.float64, bitcast=True).to(tl.float32)


@triton.jit
def divisor_consts(d):
    """Per-divisor constants ``(p, nds, r)`` of `div_exact` for divisors ``d >= 0`` (fp32, e.g. [BPP, 1] block
    scales): p = 2^k with ds = d * p in [2^-22, 4) (exact: ds is normal), nds = -ds (negated here, once, because a
    negation in the kernel costs an instruction per element), r = RN(1 / ds). ``d == 0`` gives ds = 0, r = inf.
    ``d == inf`` (an overflowed scale) gives p = 0, ds = r = 1: quotients of finite a are then zeros, as a / inf."""
    k = tl.maximum(127 - (d.to(tl.int32, bitcast=True) >> 23), -126)
    finite = d < float("inf")
    p = tl.where(finite, exp2i_normal(k), 0.0)
    ds = tl.where(finite, d * p, 1.0)
    return p, -ds, tl.math.div_rn(1.0, ds)


@triton.jit
def div_exact(a, p, nds, r, ZERO_DIVISOR: tl.constexpr = False):
    """fl(a / d), the correctly rounded fp32 quotient, for d = ds / p with nds = -ds and r = RN(1 / ds).

    With ``divisor_consts(d)`` (any d > 0; ds in [2^-22, 4)): exact wherever |q| >= 2^-80, and below that a value
    under 2^-26 in magnitude (indistinguishable after any element rounding here: they all work in units >= 2^-1,
    stochastic rounding adds u < 1 - 2^-24 first). Callers may also pass p = 1, ds = d directly when d lies in
    [2^-75, 2^126): then r is a normal number, the quotient is exact wherever |q| >= 2^-28 and below that under
    2^-26. Both need |q| < 2^100. ``ZERO_DIVISOR``: d may be 0 (ds = 0, r = inf), where a / 0 (+-inf, NaN for
    a = 0) is returned, as a true division would. Finite ``a`` give finite results; non-finite ``a`` give garbage.

    Why it is exact (q = a / d = a' / ds with a' = a p, exact unless a' underflows, and then q < 2^-126; m in [1, 2)
    the mantissa of ds, 2^g <= ds < 2^(g+1); 2^e <= q < 2^(e+1), ulp = 2^(e-23)):
    1. r = RN(1/ds) has ds r = 1 + eps, |eps| <= m 2^-25 (half an ulp of 1/ds, whose binade is 2^(-g-1)..2^-g).
    2. y0 = RN(a' r) is within ~2 ulp of q; y1 = RN(y0 + e0 r) with e0 = RN(a' - y0 ds) is within ~2^-21 ulp of
       q + (q - y0) eps, so y1 is a faithful rounding of q (RD(q) or RU(q)).
    3. e1 = a' - y1 ds is computed exactly: it is ds (q - y1), |q - y1| < ulp, and both a' and y1 ds are multiples of
       2^(e + g - 46), so e1 is that quantum times an integer below 2^24; the quantum is >= 2^-149 (no underflow)
       when e + g >= -103, which the ranges above guarantee.
    4. y2 = RN(y1 + e1 r) = RN(v), v = q + (q - y1) eps (Markstein's correction). If q is an fp32 number, y1 = q and
       e1 = 0. Otherwise let mu be the midpoint of RD(q), RU(q): q != mu (a 24-bit a' is never ds times a 25-bit
       mu), and a' - mu ds is a nonzero multiple of 2^(e + g - 47), so |q - mu| >= 2^(e-47) / m. For v to reach mu,
       |q - mu| <= |q - y1| |eps| <= (2^(e-24) + |q - mu|) m 2^-25, i.e. 4 (1 - m 2^-25) <= m^2, false for
       m <= 2 - 2^-23. So v rounds like q.
    Where e + g < -103 (q < 2^-102 / ds), every step stays within a few ulp of q plus 2^-150 r absolute, which
    bounds the result as stated. ``tests/test_kernels_division.py`` checks all this against torch's division on
    random quotients and on adversarial ones within a few 2^(e-47) of fp32 midpoints (next to the integer and E2M1
    rounding boundaries too), the cases where only an exact last step rounds right.
    """
    ap = a * p
    y = ap * r
    y1 = fma_rn(fma_rn(y, nds, ap), r, y)
    q = fma_rn(fma_rn(y1, nds, ap), r, y1)
    if ZERO_DIVISOR:
        q = tl.where(nds < 0.0, q, y)  # y = a' * inf: a / 0 as a division gives it
    return q
