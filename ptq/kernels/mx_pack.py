"""A kernel that emits codes + scales (for export and packed matmuls): MXFP4, NVFP4, MXINT4, MXINT8, MXFP8, ...

Layout: exactly ``ptq.quantizers.quantize(x, spec)`` with 4-bit codes passed through ``pack_nibbles``. The blocked
axis is moved last and zero-padded to P = ceil(L / B) * B elements.

- ``codes``: 4-bit formats: uint8 of shape [..., P // 2], two codes per byte, element 2i in the LOW nibble.
  Other widths (<= 8 bits): one code per byte, shape [..., P]: mxint as int8 (two's complement of m), minifloats as
  uint8 bit patterns sign << (w-1) | exponent << man | mantissa (float8_e4m3fn / float8_e5m2 bits for 8 bits).
- ``scales``: [..., P // B]. MX: uint8 E8M0 (biased exponent, 127 = 2^0). NVFP4: float8_e4m3fn.
- ``global_scale``: fp32 0-d tensor for NVFP4, else None.

The element math is the same in-kernel helpers as ``fake_quant_tile``; NaN / Inf are encoded only where the format
has codes for them (E5M2-like: both, E4M3: NaN), anything else is refused with a ``QuantSpecError`` (as the
reference does).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ptq.errors import QuantSpecError
from ptq.formats import QuantSpec
from ptq.kernels._triton_utils import bf16_bits_to_f32, exp2i, minifloat_code, minifloat_round, round_magnitude
from ptq.kernels.mx_quant import (
    EXACT_FP_OPTIONS,
    NV_SCALE_FORMAT,
    check_input,
    format_constants,
    mx_block_exponent,
    nvfp4_block_scale,
    nvfp4_global_scale_fast,
    tile_config,
)


class PackedQuant(NamedTuple):
    """Packed quantized tensor. ``shape`` / ``dtype`` are the original tensor's; ``axis`` the blocked axis."""

    codes: torch.Tensor
    scales: torch.Tensor
    global_scale: torch.Tensor | None
    spec: QuantSpec
    shape: torch.Size
    dtype: torch.dtype


def packable(spec: QuantSpec) -> bool:
    """Formats with codes here: mxint / mxfp of at most 8 bits (4-bit: two per byte, even block size) and NVFP4."""
    if spec.family == "nvfp4":
        return True
    if spec.family in ("mxint", "mxfp"):
        return spec.width <= 8 and (spec.width != 4 or spec.block_size % 2 == 0)
    return False


@triton.jit
def _pack_kernel(x_ptr, codes_ptr, scales_ptr, g_ptr, noise_ptr, flags_ptr, total_blocks, L, NB,
                 FAMILY: tl.constexpr, WIDTH: tl.constexpr, MAN_BITS: tl.constexpr, EMAX: tl.constexpr,
                 EMIN: tl.constexpr, BIAS: tl.constexpr, MAX_NORMAL: tl.constexpr, LEVELS: tl.constexpr,
                 FRAC_BITS: tl.constexpr, ROUNDING: tl.constexpr, SCALE_CEIL: tl.constexpr,
                 IEEE_LIKE: tl.constexpr, IN_BF16: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P2: tl.constexpr,
                 BPP: tl.constexpr, USE_I64: tl.constexpr, S_WIDTH: tl.constexpr, S_MAN: tl.constexpr,
                 S_EMIN: tl.constexpr, S_EMAX: tl.constexpr, S_MAX: tl.constexpr, S_BIAS: tl.constexpr):
    pid = tl.program_id(0)
    blk = pid * BPP + tl.arange(0, BPP)
    if USE_I64:
        blk = blk.to(tl.int64)
    col = tl.arange(0, BLOCK_P2)
    in_block = (col < BLOCK)[None, :]
    row = blk // NB
    pos = (blk - row * NB)[:, None] * BLOCK + col[None, :]
    live = (blk < total_blocks)[:, None]
    mask = live & in_block & (pos < L)
    if IN_BF16:
        x = bf16_bits_to_f32(tl.load(x_ptr + row[:, None] * L + pos, mask=mask, other=0))
    else:
        x = tl.load(x_ptr + row[:, None] * L + pos, mask=mask, other=0.0).to(tl.float32)
    if ROUNDING == 3:
        u = tl.load(noise_ptr + blk[:, None] * BLOCK + col[None, :], mask=mask, other=0.0)
    else:
        u = 0.0
    ax = tl.abs(x)
    finite = ax < float("inf")
    isnan = x != x
    # bit 0: a NaN, bit 1: an Inf in this program's tile (the host refuses what the format cannot encode)
    flag = tl.max(tl.max(tl.where(isnan, 1, tl.where(finite, 0, 2)), axis=1), axis=0)
    tl.store(flags_ptr + pid, flag.to(tl.int8))
    negative = x.to(tl.int32, bitcast=True) < 0
    ax = tl.where(finite & in_block, ax, 0.0)
    amax = tl.max(ax, axis=1)[:, None]
    if FAMILY == 0 or FAMILY == 1:
        e = mx_block_exponent(amax, EMAX, MAX_NORMAL, SCALE_CEIL)
        scale_code = (e + 127).to(tl.uint8)
        a = ax * exp2i(-e)
    else:  # nvfp4
        g = tl.load(g_ptr)
        s = nvfp4_block_scale(amax, g, MAX_NORMAL, S_MAN, S_EMIN, S_EMAX, S_MAX)
        scale_code = minifloat_code(s, s < 0.0, S_WIDTH, S_MAN, S_EMIN, S_BIAS)
        scale_code = scale_code.to(tl.uint8)
        a = tl.math.div_rn(ax, s * g)
    if FAMILY == 0:
        m = tl.minimum(round_magnitude(a * (1 << FRAC_BITS), u, ROUNDING), LEVELS).to(tl.int32)
        code = tl.where(negative, -m, m) & (0xF if WIDTH == 4 else 0xFF)  # int8 two's complement of m
    else:
        q = minifloat_round(a, u, MAN_BITS, EMIN, EMAX, MAX_NORMAL, ROUNDING)
        if FAMILY == 3:
            q = tl.where(s > 0.0, q, 0.0)
        code = minifloat_code(q, negative, WIDTH, MAN_BITS, EMIN, BIAS)
        sign = negative.to(tl.int32) << (WIDTH - 1)
        top = (1 << (WIDTH - 1)) - 1  # every exponent and mantissa bit set: NaN in E4M3 / E5M2-like formats
        code = tl.where(isnan, sign | top, code)
        if IEEE_LIKE:
            code = tl.where(finite | isnan, code, sign | (top - ((1 << MAN_BITS) - 1)))
    if WIDTH == 4:
        lo, hi = tl.split(tl.reshape(code, (BPP, BLOCK_P2 // 2, 2)))
        half = tl.arange(0, BLOCK_P2 // 2)
        tl.store(codes_ptr + blk[:, None] * (BLOCK // 2) + half[None, :], (lo | (hi << 4)).to(tl.uint8),
                 mask=live & (half < BLOCK // 2)[None, :])
    else:
        tl.store(codes_ptr + blk[:, None] * BLOCK + col[None, :], code.to(tl.uint8), mask=live & in_block)
    tl.store(scales_ptr + blk[:, None], scale_code, mask=live)


def _refuse_unencodable(flags: torch.Tensor, spec: QuantSpec) -> None:
    """Mirror the reference: NaN / Inf are encoded only where the format has codes for them."""
    f = int(flags.max().item()) if flags.numel() else 0
    has_nan, has_inf = bool(f & 1), bool(f & 2)
    if not (has_nan or has_inf):
        return
    if spec.family == "mxfp" and spec.ieee_like:
        return
    if spec.family == "mxfp" and (spec.exp_bits, spec.man_bits) == (4, 3) and not has_inf:
        return
    what = " and ".join(w for w, b in (("NaN", has_nan), ("Inf", has_inf)) if b)
    raise QuantSpecError(f"{spec}: the tensor holds {what} values, which {spec.name} codes cannot encode; clean "
                         "the tensor or use fake_quantize")


def quantize_packed(x: torch.Tensor, spec: QuantSpec) -> PackedQuant:
    """Quantize ``x`` to packed codes + scales (layout in the module docstring) with one kernel launch.

    Dequantizing (``ptq.quantizers.dequantize`` after unpacking) equals ``fake_quantize(x, spec)`` bit for bit.
    """
    axis = check_input(x, spec)
    if not packable(spec):
        raise QuantSpecError(f"{spec}: codes are emitted here for mxint / mxfp of at most 8 bits (4-bit formats "
                             "need an even block size) and NVFP4; use ptq.quantizers.quantize for other formats")
    moved = x.movedim(axis, -1)
    L = moved.shape[-1]
    x2 = moved.reshape(-1, L).contiguous()
    rows = x2.shape[0]
    c = format_constants(spec)
    B = c.block
    nb = -(-L // B)
    P = nb * B
    total = rows * nb
    codes = torch.empty((rows, P // 2 if spec.width == 4 else P), dtype=torch.uint8, device=x.device)
    scales = torch.empty((rows, nb), dtype=torch.uint8, device=x.device)
    g = nvfp4_global_scale_fast(x2) if spec.family == "nvfp4" else None
    flags = torch.zeros(0, dtype=torch.int8, device=x.device)
    if total:
        from ptq.kernels import _noise_2d

        noise = _noise_2d(x, spec, None)
        block_p2, bpp, warps = tile_config(B)
        grid = triton.cdiv(total, bpp)
        flags = torch.empty(grid, dtype=torch.int8, device=x.device)
        use_i64 = max(rows * L, total * block_p2) >= 2**31 - 1
        bf16 = x2.dtype == torch.bfloat16  # read as int16 bit patterns (see bf16_bits_to_f32)
        _pack_kernel[(grid,)](
            x2.view(torch.int16) if bf16 else x2, codes, scales, g if g is not None else x2,
            noise if noise is not None else x2, flags, total, L, nb,
            **c.element_kwargs(), BIAS=spec.exp_bias, IEEE_LIKE=spec.ieee_like, IN_BF16=bf16, BLOCK=B,
            BLOCK_P2=block_p2, BPP=bpp, USE_I64=use_i64, S_WIDTH=NV_SCALE_FORMAT.width, S_MAN=c.s_man, S_EMIN=c.s_emin, S_EMAX=c.s_emax,
            S_MAX=c.s_max, S_BIAS=NV_SCALE_FORMAT.exp_bias, num_warps=warps, **EXACT_FP_OPTIONS,
        )
    # one host sync: NaN / Inf the format cannot encode are refused, as the reference does
    _refuse_unencodable(flags, spec)
    lead = tuple(moved.shape[:-1])
    codes = codes.reshape(*lead, codes.shape[-1])
    scales = scales.reshape(*lead, nb)
    if spec.family == "nvfp4":
        scales = scales.view(torch.float8_e4m3fn)
    elif spec.family == "mxint" and spec.width != 4:
        codes = codes.view(torch.int8)
    return PackedQuant(codes, scales, g.reshape(()) if g is not None else None, spec, x.shape, x.dtype)
