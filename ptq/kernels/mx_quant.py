"""Fused fake quantize-dequantize: one Triton kernel template for every format family.

The template is specialised by ``tl.constexpr`` format parameters (family id, widths, emax/emin, max normal, block
size, rounding mode, dtype handling); ``format_constants(spec)`` derives them from the ``QuantSpec`` so no format
constant is written twice. Each program owns a 2-D tile of ``BPP`` blocks x ``BLOCK_P2`` columns (the block size
rounded up to a power of two), reads it once, computes in fp32 registers and writes it once in the input dtype.

Numerics follow the contract in ``ptq.formats`` / DESIGN.md exactly (see ``ptq.kernels._triton_utils`` for how the
rounding steps stay exact under the interpreter and on the GPU). Non-finite inputs are excluded from their block's
statistics and written back unchanged (bit for bit), so one bad value never erases its neighbours.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ptq.errors import QuantSpecError
from ptq.formats import QuantSpec
from ptq.kernels._triton_utils import (
    INTERPRETED,
    ROUNDING_IDS,
    bf16_bits_to_f32,
    copysign_bits,
    div_exact,
    divisor_consts,
    exp2i,
    f32_to_bf16_bits,
    floor_log2,
    minifloat_round,
    minifloat_round_even,
    round_even_signed,
    round_magnitude,
)

# Family ids of the template (constexpr FAMILY).
FAM_MXINT, FAM_MXFP, FAM_MX69, FAM_NVFP4, FAM_INT_SYM, FAM_INT_ASYM = 0, 1, 2, 3, 4, 5
# Output handling (constexpr OUT_KIND): plain store in the tensor's dtype; bf16 read and written as int16 bit
# patterns, rounded by bit manipulation (exact in the interpreter, ~7 instructions per element on the GPU) or, on
# the GPU only, by the hardware's round-to-nearest-even cvt (F2FP packs two values in one instruction; the
# interpreter's fp32 -> bf16 cast truncates, so it never gets this kind).
OUT_NATIVE, OUT_BF16_BITS, OUT_BF16_HW = 0, 1, 2

# Compile options that keep every fp32 step IEEE round-to-nearest like the reference's: no mul+add -> fma
# contraction, and no flush-to-zero inside libdevice (tl.floor would become cvt.rmi.ftz).
EXACT_FP_OPTIONS: dict[str, bool] = {"enable_fp_fusion": False, "enable_reflect_ftz": False}

# NVFP4 block scales are E4M3 numbers rounded to nearest even; their grid comes from a spec like any other.
NV_SCALE_FORMAT = QuantSpec.mxfp("e4m3")
# Global scales from here up take the fast element division (see `_nvfp4_tile`): all but tensors with amax < ~2^-54.6.
NV_FAST_G = tl.constexpr(2.0 ** -66)


@dataclass(frozen=True)
class FormatConstants:
    """The constexpr parameters of the kernel template for one ``QuantSpec``."""

    family: int
    width: int
    man_bits: int
    emax: int
    emin: int
    max_normal: float
    levels: int
    frac_bits: int
    block: int
    rounding: int
    scale_ceil: bool
    # nvfp4 block-scale grid (E4M3): mantissa bits, emin, emax, max normal; zeros for other families
    s_man: int = 0
    s_emin: int = 0
    s_emax: int = 0
    s_max: float = 0.0

    def element_kwargs(self) -> dict:
        """The element-grid constexprs every kernel that quantizes tiles with `fake_quant_tile` takes."""
        return dict(FAMILY=self.family, WIDTH=self.width, MAN_BITS=self.man_bits, EMAX=self.emax, EMIN=self.emin,
                    MAX_NORMAL=self.max_normal, LEVELS=self.levels, FRAC_BITS=self.frac_bits,
                    ROUNDING=self.rounding, SCALE_CEIL=self.scale_ceil)


@functools.lru_cache(maxsize=256)
def format_constants(spec: QuantSpec) -> FormatConstants:
    """Derive the template's constexpr parameters from ``spec`` (the single source of the numbers)."""
    f = spec.family
    fam = {"mxint": FAM_MXINT, "mxfp": FAM_MXFP, "mx6": FAM_MX69, "mx9": FAM_MX69, "nvfp4": FAM_NVFP4}.get(f)
    if f == "int":
        fam = FAM_INT_SYM if spec.symmetric else FAM_INT_ASYM
    emax = spec.emax if spec.family in ("mxint", "mxfp", "nvfp4") else 0
    emin = spec.emin if spec.is_minifloat else 0
    max_normal = spec.max_normal if f in ("mxint", "mxfp", "nvfp4", "int") else 0.0
    levels = spec.int_levels if f in ("mxint", "int") else (1 << (spec.width - 1)) - 1
    frac_bits = spec.mxint_frac_bits if f == "mxint" else 0
    scale_grid = {}
    if f == "nvfp4":
        sf = NV_SCALE_FORMAT
        scale_grid = dict(s_man=sf.man_bits, s_emin=sf.emin, s_emax=sf.emax, s_max=float(sf.max_normal))
    return FormatConstants(fam, spec.width, spec.man_bits, emax, emin, float(max_normal), levels, frac_bits,
                           spec.block_size, ROUNDING_IDS[spec.rounding], spec.scale_rule == "ceil", **scale_grid)


# ------------------------------------------------------------------------------------------------------------------
# In-kernel building blocks (also usable by other kernels that quantize a tile, e.g. a fused Hadamard + quantize)
# ------------------------------------------------------------------------------------------------------------------
@triton.jit
def mx_block_exponent(amax, EMAX: tl.constexpr, MAX_NORMAL: tl.constexpr, SCALE_CEIL: tl.constexpr):
    """E8M0 shared exponent of blocks with finite ``amax > 0``: floor(log2 amax) - EMAX (or the ceil rule),
    clamped to [-127, 127]."""
    e = floor_log2(amax) - EMAX
    if SCALE_CEIL:
        e = tl.where(amax * exp2i(-tl.minimum(tl.maximum(e, -127), 127)) > MAX_NORMAL, e + 1, e)
    return tl.minimum(tl.maximum(e, -127), 127)


@triton.jit
def nvfp4_block_scale(amax, g, MAX_ELEM: tl.constexpr, S_MAN: tl.constexpr, S_EMIN: tl.constexpr,
                      S_EMAX: tl.constexpr, S_MAX: tl.constexpr):
    """Decoded block scale s = E4M3_rne(amax / (MAX_ELEM * g)): MAX_ELEM = 6 (the E2M1 maximum), S_* the E4M3
    grid (``FormatConstants.s_*``), rounded to nearest even. The division by the tensor-wide MAX_ELEM * g uses
    `div_exact` with its constants computed once per call (g is a scalar) instead of a div_rn per block."""
    p, nd, r = divisor_consts(MAX_ELEM * g)
    return minifloat_round_even(div_exact(amax, p, nd, r), S_MAN, S_EMIN, S_EMAX, S_MAX)


@triton.jit
def tile_stats(x, in_block, PAD_COLS: tl.constexpr):
    """(|x| with non-finite and out-of-block elements zeroed, per-block amax [BPP, 1]) of a tile [BPP, BLOCK_P2].

    ``in_block`` (which columns belong to the block) is applied only when ``PAD_COLS`` (block size not a power of
    two). Non-finite values never enter a block's statistics."""
    ax = tl.abs(x)
    if PAD_COLS:
        ax = tl.where((ax < float("inf")) & in_block, ax, 0.0)
    else:
        ax = tl.where(ax < float("inf"), ax, 0.0)
    return ax, tl.max(ax, axis=1)[:, None]


@triton.jit
def _nvfp4_tile(x, ax, amax, u, g, MAN_BITS: tl.constexpr, EMIN: tl.constexpr, EMAX: tl.constexpr,
                MAX_NORMAL: tl.constexpr, ROUNDING: tl.constexpr, S_MAN: tl.constexpr, S_EMIN: tl.constexpr,
                S_EMAX: tl.constexpr, S_MAX: tl.constexpr):
    """NVFP4 fake quantization of a tile (see `fake_quant_tile`)."""
    s = nvfp4_block_scale(amax, g, MAX_NORMAL, S_MAN, S_EMIN, S_EMAX, S_MAX)
    return nvfp4_elements(x, ax, s, g, u, MAN_BITS, EMIN, EMAX, MAX_NORMAL, ROUNDING)


@triton.jit
def nvfp4_elements(x, ax, s, g, u, MAN_BITS: tl.constexpr, EMIN: tl.constexpr, EMAX: tl.constexpr,
                   MAX_NORMAL: tl.constexpr, ROUNDING: tl.constexpr):
    """E2M1 elements of ``x`` (``ax = |x|``) under the decoded E4M3 block scale ``s`` and global scale ``g``:
    (q * s) * g with q the E2M1 rounding of x / (s g) (``s`` broadcast against ``x``)."""
    d = s * g
    used = s > 0.0
    if g >= NV_FAST_G:
        # every used d = RN(s g) >= 2^-9 NV_FAST_G = 2^-75 and <= 448 * (fp32 max / 2688) < 2^126: div_exact is
        # exact on d itself (no power-of-two prescale: one multiply less per element) for quotients >= 2^-28, and
        # below that returns < 2^-26. Where s == 0, r = 0 makes the quotient +0 (the reference's signed zero comes from
        # the copysign below).
        a = div_exact(ax, 1.0, 0.0 - d, tl.where(used, tl.math.div_rn(1.0, d), 0.0))
        q = _e2m1_round(a, u, MAN_BITS, EMIN, EMAX, MAX_NORMAL, ROUNDING)
    else:
        # tiny tensors: s * g may underflow to 0 (x / 0 there, as in the reference); where s == 0, p = r = 0 make
        # the quotient 0 (a * p * r, not inf * 0 or 0 * inf)
        p, nds, r = divisor_consts(d)
        a = div_exact(ax, tl.where(used, p, 0.0), nds, tl.where(used, r, 0.0), True)
        # 0 / 0 is NaN in the reference; the GPU's min inside the rounding would saturate it to MAX_NORMAL
        q = tl.where(a == a, _e2m1_round(a, u, MAN_BITS, EMIN, EMAX, MAX_NORMAL, ROUNDING), a)
    return copysign_bits((q * s) * g, x)


@triton.jit
def _e2m1_round(a, u, MAN_BITS: tl.constexpr, EMIN: tl.constexpr, EMAX: tl.constexpr, MAX_NORMAL: tl.constexpr,
                ROUNDING: tl.constexpr):
    if ROUNDING == 0:
        q = minifloat_round_even(a, MAN_BITS, EMIN, EMAX, MAX_NORMAL)
    else:
        q = minifloat_round(a, u, MAN_BITS, EMIN, EMAX, MAX_NORMAL, ROUNDING)
    return q


@triton.jit
def _int_sym_tile(x, ax, amax, u, LEVELS: tl.constexpr, ROUNDING: tl.constexpr):
    """Symmetric per-group INT of a tile: scale = amax / LEVELS, codes round(x / scale) clamped to +-LEVELS."""
    scale = tl.math.div_rn(amax, LEVELS * 1.0)
    safe = tl.where(scale > 0.0, scale, 1.0)
    p, nds, r = divisor_consts(safe)
    # |x| / safe <= 2 LEVELS < 2^17 (|x| <= amax, and safe = 1 only where amax / LEVELS underflows to 0): the
    # half-even rounding needs no cap
    if ROUNDING == 0:
        # signed rounding gives +0 for zero codes and n * scale keeps it (scale == 0 only where every |x| is
        # below 2^-148, so n == 0 there too)
        n = round_even_signed(div_exact(x, p, nds, r))
        y = tl.minimum(tl.maximum(n, -LEVELS * 1.0), LEVELS * 1.0) * scale
    else:
        m = tl.minimum(round_magnitude(div_exact(ax, p, nds, r), u, ROUNDING, True), LEVELS)
        # m * scale is zero exactly when m == 0 or scale == 0 (else m >= 1 and scale >= 2^-149); adding +0.0 turns
        # the -0.0 a negative x gets there into the reference's +0 (integer zero has no sign) and changes nothing
        # else: one add instead of a compare and a select per element
        y = copysign_bits(m * scale, x) + 0.0
    return y


@triton.jit
def _int_asym_tile(x, finite, u, LEVELS: tl.constexpr, ROUNDING: tl.constexpr):
    """Asymmetric per-group INT of a tile: range [min(lo, 0), max(hi, 0)], scale = range / LEVELS,
    zero = round(-lo / scale), codes clamp(round(x / scale) + zero, 0, LEVELS), values (code - zero) * scale."""
    xf = tl.where(finite, x, 0.0)
    lo = tl.minimum(tl.min(xf, axis=1), 0.0)[:, None]
    hi = tl.maximum(tl.max(xf, axis=1), 0.0)[:, None]
    scale = tl.math.div_rn(hi - lo, LEVELS * 1.0)
    safe = tl.where(scale > 0.0, scale, 1.0)
    p, nds, r = divisor_consts(safe)
    zero = tl.where(scale > 0.0, round_magnitude(div_exact(0.0 - lo, p, nds, r), 0.0, 0), 0.0)
    t = div_exact(x, p, nds, r)
    if ROUNDING == 0:
        # clamp(n + zero, 0, L) - zero == clamp(n, -zero, L - zero): integers, exact. Where scale == 0 every |x| is
        # below 2^-148, so n == 0 == zero and the product is the reference's +0; 0 - zero is +0 for zero == 0.
        n = round_even_signed(t)
        y = tl.minimum(tl.maximum(n, 0.0 - zero), LEVELS - zero) * scale
    else:
        n = copysign_bits(round_magnitude(tl.abs(t), u, ROUNDING), t)
        qc = tl.where(scale > 0.0, tl.minimum(tl.maximum(n + zero, 0.0), LEVELS * 1.0), zero)
        y = (qc - zero) * scale
    return y


@triton.jit
def mx_elements(x, ax, e, u, FAMILY: tl.constexpr, MAN_BITS: tl.constexpr, EMAX: tl.constexpr, EMIN: tl.constexpr,
                MAX_NORMAL: tl.constexpr, LEVELS: tl.constexpr, FRAC_BITS: tl.constexpr, ROUNDING: tl.constexpr):
    """mxint (FAMILY 0) / mxfp (1) elements of ``x`` (``ax = |x|``) under the shared scale 2^e (int32 ``e``
    broadcast against ``x``)."""
    a = ax * exp2i(-e)  # |x| / 2^e, rounded like the reference's division
    if FAMILY == 0:
        m = tl.minimum(round_magnitude(a * (1 << FRAC_BITS), u, ROUNDING), LEVELS)
        # m * 2^(e - FRAC_BITS) is exact (<= 7 significant bits, >= 2^-133); zero elements are +0 (no -0 code)
        y = tl.where(m > 0.0, copysign_bits(m * exp2i(e - FRAC_BITS), x), 0.0)
    else:
        q = minifloat_round(a, u, MAN_BITS, EMIN, EMAX, MAX_NORMAL, ROUNDING)
        y = copysign_bits(q * exp2i(e), x)
    return y


@triton.jit
def fake_quant_tile(x, ax, amax, u, g,
                    FAMILY: tl.constexpr, WIDTH: tl.constexpr, MAN_BITS: tl.constexpr, EMAX: tl.constexpr,
                    EMIN: tl.constexpr, MAX_NORMAL: tl.constexpr, LEVELS: tl.constexpr, FRAC_BITS: tl.constexpr,
                    ROUNDING: tl.constexpr, SCALE_CEIL: tl.constexpr, BPP: tl.constexpr, BLOCK_P2: tl.constexpr,
                    S_MAN: tl.constexpr = 0, S_EMIN: tl.constexpr = 0, S_EMAX: tl.constexpr = 0,
                    S_MAX: tl.constexpr = 0.0):
    """Quantize-dequantize a tile ``x`` (fp32 [BPP, BLOCK_P2], one block per row, zero padded) in fp32.

    ``ax``, ``amax``: from ``tile_stats``. ``u``: U[0,1) noise (stochastic rounding only). ``g``: NVFP4 global
    scale. The constexprs are ``format_constants(spec)``'s fields; ``S_*`` (the E4M3 block-scale grid) matter for
    nvfp4 only and must then be passed. Values at non-finite positions are meaningless: callers restore the input there.
    """
    finite = tl.abs(x) < float("inf")
    if FAMILY == 0 or FAMILY == 1:  # mxint / mxfp: E8M0 scale 2^e (all-zero block: 2^-127)
        e = mx_block_exponent(amax, EMAX, MAX_NORMAL, SCALE_CEIL)
        y = mx_elements(x, ax, e, u, FAMILY, MAN_BITS, EMAX, EMIN, MAX_NORMAL, LEVELS, FRAC_BITS, ROUNDING)
    elif FAMILY == 2:  # mx6 / mx9: block exponent E, one prime bit per pair of elements
        max_exp = tl.maximum(floor_log2(amax), -127)
        below = ax < exp2i(max_exp)  # floor(log2|x|) <= E - 1; zeros and non-finite values count as below
        pair = tl.reshape(below.to(tl.int32), (BPP, BLOCK_P2 // 2, 2))
        prime = tl.min(pair, axis=2)
        prime = tl.reshape(tl.broadcast_to(prime[:, :, None], (BPP, BLOCK_P2 // 2, 2)), (BPP, BLOCK_P2)) == 1
        # |x| / 2^(E - prime - (WIDTH - 2)) as exact power-of-two products (2^-E alone may be 2^127)
        units = (ax * exp2i(-max_exp)) * tl.where(prime, 2.0 * (1 << (WIDTH - 2)), 1.0 * (1 << (WIDTH - 2)))
        m = tl.minimum(round_magnitude(units, u, ROUNDING), LEVELS)
        y = copysign_bits((m * exp2i(max_exp - (WIDTH - 2))) * tl.where(prime, 0.5, 1.0), x)  # exact products
    elif FAMILY == 3:  # nvfp4: E4M3 block scale s of amax / (max_elem g), E2M1 elements of x / (s g), (q s) g
        y = _nvfp4_tile(x, ax, amax, u, g, MAN_BITS, EMIN, EMAX, MAX_NORMAL, ROUNDING, S_MAN, S_EMIN, S_EMAX, S_MAX)
    elif FAMILY == 4:
        y = _int_sym_tile(x, ax, amax, u, LEVELS, ROUNDING)
    else:
        y = _int_asym_tile(x, finite, u, LEVELS, ROUNDING)
    return tl.where(finite, y, x)


@triton.jit
def _fake_quant_kernel(x_ptr, y_ptr, noise_ptr, g_ptr, total_blocks, L, NB,
                       FAMILY: tl.constexpr, WIDTH: tl.constexpr, MAN_BITS: tl.constexpr, EMAX: tl.constexpr,
                       EMIN: tl.constexpr, MAX_NORMAL: tl.constexpr, LEVELS: tl.constexpr,
                       FRAC_BITS: tl.constexpr, ROUNDING: tl.constexpr, SCALE_CEIL: tl.constexpr,
                       BLOCK: tl.constexpr, BLOCK_P2: tl.constexpr, BPP: tl.constexpr, EVEN: tl.constexpr,
                       FULL: tl.constexpr, OUT_KIND: tl.constexpr, BF16_EXACT: tl.constexpr,
                       USE_I64: tl.constexpr, S_MAN: tl.constexpr, S_EMIN: tl.constexpr,
                       S_EMAX: tl.constexpr, S_MAX: tl.constexpr):
    pid = tl.program_id(0)
    blk = pid * BPP + tl.arange(0, BPP)
    if USE_I64:
        blk = blk.to(tl.int64)
    col = tl.arange(0, BLOCK_P2)
    in_block = (col < BLOCK)[None, :]
    if EVEN:  # rows are whole blocks: the tile is contiguous memory
        offs = blk[:, None] * BLOCK + col[None, :]
        noffs = offs
        if FULL:
            mask = in_block
        else:
            mask = (blk < total_blocks)[:, None] & in_block
    else:
        row = blk // NB
        pos = (blk - row * NB)[:, None] * BLOCK + col[None, :]
        offs = row[:, None] * L + pos
        noffs = row[:, None] * (NB * BLOCK) + pos
        mask = (blk < total_blocks)[:, None] & in_block & (pos < L)
    if OUT_KIND != 0:  # bf16 travels as int16 bit patterns both ways
        x_raw = tl.load(x_ptr + offs, mask=mask, other=0)
        x = bf16_bits_to_f32(x_raw)
    else:
        x_raw = tl.load(x_ptr + offs, mask=mask, other=0.0)
        x = x_raw.to(tl.float32)
    if ROUNDING == 3:
        u = tl.load(noise_ptr + noffs, mask=mask, other=0.0)
    else:
        u = 0.0
    if FAMILY == 3:
        g = tl.load(g_ptr)
    else:
        g = 1.0
    ax, amax = tile_stats(x, in_block, BLOCK != BLOCK_P2)
    y = fake_quant_tile(x, ax, amax, u, g, FAMILY, WIDTH, MAN_BITS, EMAX, EMIN, MAX_NORMAL, LEVELS, FRAC_BITS,
                        ROUNDING, SCALE_CEIL, BPP, BLOCK_P2, S_MAN, S_EMIN, S_EMAX, S_MAX)
    finite = tl.abs(x) < float("inf")
    if OUT_KIND == 1:  # bf16: store the bit pattern rounded to nearest even (exact in the interpreter too)
        out = tl.where(finite, f32_to_bf16_bits(y, BF16_EXACT), x_raw)
    elif OUT_KIND == 2:  # GPU: cvt.rn.bf16.f32, the same round-to-nearest-even (y is finite where it is kept)
        out = tl.where(finite, y.to(tl.bfloat16).to(tl.int16, bitcast=True), x_raw)
    else:
        out = tl.where(finite, y.to(x_raw.dtype), x_raw)
    tl.store(y_ptr + offs, out, mask=mask)


@triton.jit
def _finite_amax_kernel(x_ptr, out_ptr, N, BLOCK: tl.constexpr, CHUNKS: tl.constexpr, IN_BF16: tl.constexpr,
                        USE_I64: tl.constexpr):
    """out[pid] = max |x| over the finite elements of this program's CHUNKS * BLOCK elements (0 when none). The
    chunks are unrolled so that all their loads are in flight before the first maximum."""
    pid = tl.program_id(0)
    if USE_I64:
        base = pid.to(tl.int64) * (BLOCK * CHUNKS)
    else:
        base = pid * (BLOCK * CHUNKS)
    acc = tl.zeros([BLOCK], tl.float32)
    for c in tl.static_range(CHUNKS):
        offs = base + c * BLOCK + tl.arange(0, BLOCK)
        if IN_BF16:
            x = bf16_bits_to_f32(tl.load(x_ptr + offs, mask=offs < N, other=0))
        else:
            x = tl.load(x_ptr + offs, mask=offs < N, other=0.0).to(tl.float32)
        a = tl.abs(x)
        acc = tl.maximum(acc, tl.where(a < float("inf"), a, 0.0))
    tl.store(out_ptr + pid, tl.max(acc, axis=0))


@triton.jit
def _global_scale_kernel(partial_ptr, g_ptr, P, DIVISOR: tl.constexpr, BLOCK: tl.constexpr, NITER: tl.constexpr):
    """g_ptr[0] = max(partial[:P]) / DIVISOR, correctly rounded (the reference's true division), or 1 where that
    is 0: ``ptq.quantizers.nvfp4_global_scale`` applied to the partial maxima, in one program.

    NITER * BLOCK >= P. The trip count is a constexpr because the interpreter cannot loop to a runtime bound;
    callers round it up to a power of two so that only a handful of variants are ever compiled."""
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(NITER):
        offs = i * BLOCK + tl.arange(0, BLOCK)
        acc = tl.maximum(acc, tl.load(partial_ptr + offs, mask=offs < P, other=0.0))
    g = tl.math.div_rn(tl.max(acc, axis=0), DIVISOR)
    tl.store(g_ptr, tl.where(g > 0.0, g, 1.0))


# The amax pass: each program reduces _AMAX_CHUNKS chunks of _AMAX_BLOCK elements in _AMAX_WARPS warps (a chunk
# of 8192 bf16 in 8 warps is four 16-byte loads per thread); the finalize reads the partial maxima _FINAL_TILE at a
# time in one program. On an H100 (256 MiB bf16) 4 chunks and a 4096 tile measured 0.094 ms against 0.097 ms for
# 1 chunk and a 1024 tile (a read at copy speed: 0.090 ms); bench/kernels.py times the two passes separately.
_AMAX_BLOCK, _AMAX_CHUNKS, _AMAX_WARPS = 8192, 4, 8
_FINAL_TILE, _FINAL_WARPS = 4096, 8


def nvfp4_global_scale_fast(x: torch.Tensor) -> torch.Tensor:
    """``ptq.quantizers.nvfp4_global_scale(x)`` in one read of ``x`` and two launches: a kernel takes the finite
    amax of each chunk, a one-program kernel reduces those partial maxima and divides (max of maxima = the amax, and
    the division is the same correctly rounded one, so the result is identical). 1-element fp32 tensor on x's device.

    No torch op touches the partials: the former torch tail on them (upcast, isfinite, abs, where, amax, full, div,
    where, ...) was ~10 tiny launches, whose host and launch latency is the likely cause of the measured 0.249 ms
    (H100, 256 MiB bf16) against ~0.09 ms for one read of x."""
    from ptq.quantizers.nvfp4 import E2M1_MAX, E4M3_MAX

    flat = x.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    n = flat.numel()
    if n == 0:  # no finite element: amax 0, g = 1 (and an empty CUDA tensor may have no pointer to pass)
        return torch.ones(1, dtype=torch.float32, device=x.device)
    per = _AMAX_BLOCK * _AMAX_CHUNKS
    grid = triton.cdiv(n, per)
    partial = torch.empty(grid, dtype=torch.float32, device=x.device)
    g = torch.empty(1, dtype=torch.float32, device=x.device)  # its own storage: callers keep and export it
    bits = flat.dtype == torch.bfloat16
    _finite_amax_kernel[(grid,)](flat.view(torch.int16) if bits else flat, partial, n, BLOCK=_AMAX_BLOCK,
                                 CHUNKS=_AMAX_CHUNKS, IN_BF16=bits, USE_I64=n + per >= 2**31 - 1,
                                 num_warps=_AMAX_WARPS, **EXACT_FP_OPTIONS)
    niter = 1 << (triton.cdiv(grid, _FINAL_TILE) - 1).bit_length()
    _global_scale_kernel[(1,)](partial, g, grid, DIVISOR=float(E4M3_MAX * E2M1_MAX), BLOCK=_FINAL_TILE, NITER=niter,
                               num_warps=_FINAL_WARPS, **EXACT_FP_OPTIONS)
    return g


# ------------------------------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------------------------------
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_input(x: torch.Tensor, spec: QuantSpec) -> int:
    """Validate ``x`` against ``spec``; return the blocked axis as a non-negative index."""
    if not isinstance(spec, QuantSpec):
        raise QuantSpecError(f"spec must be a ptq.formats.QuantSpec (e.g. QuantSpec.mxint(4)), got "
                             f"{type(spec).__name__}")
    if not isinstance(x, torch.Tensor):
        raise QuantSpecError(f"expected a torch.Tensor to quantize with {spec}, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise QuantSpecError(f"cannot quantize a {x.dtype} tensor of shape {tuple(x.shape)} with {spec}: "
                             "convert it to float32, bfloat16 or float16 first")
    if x.dim() == 0:
        raise QuantSpecError(f"cannot quantize a 0-d tensor with {spec}: give it at least one dimension")
    if not -x.dim() <= spec.axis < x.dim():
        raise QuantSpecError(f"{spec}: axis {spec.axis} is out of range for a tensor of shape {tuple(x.shape)}")
    if spec.family in ("mx6", "mx9") and spec.block_size % 2:
        raise QuantSpecError(f"{spec}: mx6/mx9 blocks hold pairs sharing a prime bit; block_size must be even")
    return spec.axis % x.dim()


# Elements per program and warps: 4096 elements in 8 warps is 16 per thread, i.e. two 16-byte loads of bf16 in
# flight per thread, and few enough programs that launch overhead vanishes. ``bench/kernels.py`` sweeps others.
DEFAULT_TILE: tuple[int, int] = (4096, 8)
# Families with more work per element or per block run faster with fewer elements per thread (more warps in flight
# to cover the latency of their longer dependency chains): on an H100 (8x2048x8192 bf16) int4 g128 at (2048, 4) ran
# 2-3% and nvfp4 at (2048, 8) 18% faster than at DEFAULT_TILE (0.216 against 0.263 ms for the quantize pass).
FAMILY_TILES: dict[str, tuple[int, int]] = {"int": (2048, 4), "nvfp4": (2048, 8)}


@functools.lru_cache(maxsize=256)
def tile_config(block: int, tile: tuple[int, int] | None = None) -> tuple[int, int, int]:
    """(BLOCK_P2, blocks per program, num_warps) for a block size, from ``tile`` = (elements per program, warps)."""
    elems, warps = tile or DEFAULT_TILE
    block_p2 = 1 << (block - 1).bit_length()  # triton.next_power_of_2 without its per-call host overhead
    bpp = max(1, elems // block_p2)
    return block_p2, bpp, warps if bpp * block_p2 >= 1024 else 4


def bf16_exact(spec: QuantSpec) -> bool:
    """For bf16 inputs, every dequantized value is a bf16 number, so the fp32 -> bf16 cast needs no rounding.

    True for mxint, mx6 / mx9 and mxfp with <= 7 mantissa bits. Why: a grid value has <= 8 significant bits, so it
    is a bf16 number unless its lowest bit is below 2^-133 (the bf16 subnormal step). Where the grid step is that
    fine, it is also at most the input's own ulp (every bf16 number is a multiple of 2^-133), so the input already
    lies on the grid and is returned unchanged (any rounding mode); saturated values (max_normal * 2^e, e >= -127)
    have their lowest bit far above 2^-133. nvfp4 and int scales are arbitrary fp32: those outputs are rounded.
    ``tests/test_kernels.py::test_bf16_outputs_are_bf16_numbers`` checks this on the reference.
    """
    return spec.family in ("mxint", "mx6", "mx9") or (spec.family == "mxfp" and spec.man_bits <= 7)


def fake_quantize_2d(x2: torch.Tensor, spec: QuantSpec, noise: torch.Tensor | None,
                     global_scale: torch.Tensor | None, tile: tuple[int, int] | None = None) -> torch.Tensor:
    """Run the template on a contiguous [rows, L] tensor blocked along its last dim.

    ``noise``: [rows, padded L] fp32 (stochastic rounding), ``global_scale``: 1-element fp32 (NVFP4),
    ``tile``: (elements per program, num_warps), default ``FAMILY_TILES`` or ``DEFAULT_TILE``."""
    rows, L = x2.shape
    y2 = torch.empty_like(x2)
    launch_fake_quantize(x2, y2, rows, L, spec, noise, global_scale, tile)
    return y2


@dataclass(frozen=True)
class _LaunchConstants:
    """What a launch for one (spec, tile) needs besides the shape: computed once per spec, not per call."""

    block: int
    block_p2: int
    bpp: int
    kwargs: dict  # the shape-independent constexprs and num_warps / compile options


@functools.lru_cache(maxsize=256)
def _launch_constants(spec: QuantSpec, tile: tuple[int, int] | None) -> _LaunchConstants:
    c = format_constants(spec)
    if tile is None and c.block <= FAMILY_TILES.get(spec.family, (0, 0))[0]:  # not for blocks above the tile
        tile = FAMILY_TILES[spec.family]
    block_p2, bpp, warps = tile_config(c.block, tile)
    kwargs = dict(
        **c.element_kwargs(), BLOCK=c.block, BLOCK_P2=block_p2, BPP=bpp, BF16_EXACT=bf16_exact(spec), S_MAN=c.s_man, S_EMIN=c.s_emin,
        S_EMAX=c.s_emax, S_MAX=c.s_max, num_warps=warps, **EXACT_FP_OPTIONS,
    )
    return _LaunchConstants(c.block, block_p2, bpp, kwargs)


def _out_kind(x: torch.Tensor, bits: bool, k: _LaunchConstants) -> int:
    """OUT_BF16_HW for bf16 outputs that need rounding on a real GPU; the bit-manipulation path where the value is
    already a bf16 number (a shift) or under the interpreter (whose cast truncates)."""
    if not bits:
        return OUT_NATIVE
    if k.kwargs["BF16_EXACT"] or not x.is_cuda or INTERPRETED:
        return OUT_BF16_BITS
    return OUT_BF16_HW


def launch_fake_quantize(x: torch.Tensor, y: torch.Tensor, rows: int, L: int, spec: QuantSpec,
                         noise: torch.Tensor | None, global_scale: torch.Tensor | None,
                         tile: tuple[int, int] | None = None) -> None:
    """Fake-quantize ``x`` into ``y``, both float tensors of one dtype whose memory (from ``data_ptr()``) is a
    row-major [rows, L] array blocked along L, whatever their logical shapes (e.g. a permuted dense tensor whose
    blocked axis has stride 1). ``noise`` / ``global_scale`` / ``tile``: as for `fake_quantize_2d`. No host sync,
    no copy: this is the per-call hot path of ``fake_quantize``."""
    k = _launch_constants(spec, tile)
    B = k.block
    nb = -(-L // B)
    total = rows * nb
    if total == 0:
        return
    bpp = k.bpp
    even = (L % B == 0) and k.block_p2 == B
    bits = x.dtype == torch.bfloat16
    if bits:  # bf16 travels as int16 bit patterns both ways
        x, y = x.view(torch.int16), y.view(torch.int16)
    use_i64 = max(rows * L, total * k.block_p2, rows * nb * B) >= 2**31 - 1
    dummy = x  # never read: the loads are behind constexpr branches
    _fake_quant_kernel[(-(-total // bpp),)](
        x, y, noise if noise is not None else dummy, global_scale if global_scale is not None else dummy,
        total, L, nb, **_constexprs(spec, tile, even, even and total % bpp == 0, _out_kind(x, bits, k), use_i64),
    )


@functools.lru_cache(maxsize=1024)
def _constexprs(spec: QuantSpec, tile, even: bool, full: bool, out_kind: int, use_i64: bool) -> dict:
    # built once per variant: a fresh two-dozen-key dict per call is measurable host time at decode sizes
    return dict(EVEN=even, FULL=full, OUT_KIND=out_kind, USE_I64=use_i64, **_launch_constants(spec, tile).kwargs)
