"""Triton Hadamard transform (FWHT) and the fused rotate + fake-quantize kernel of the activation path.

Both follow the exact operation order of the torch reference (``ptq.hadamard``, module docstring): the +-1 mixing
of the known order ``m`` summed left to right, butterfly stages ``h = 1, 2, ..., p/2`` of ``(a + b, a - b)``, one
multiply by the fp32 ``1/sqrt(n)``, then the cast to the input dtype (round to nearest even: on the bits under
``TRITON_INTERPRET=1``, whose cast truncates; by the GPU's own round-to-nearest-even cvt on CUDA). IEEE additions
are deterministic, so the results are bit-identical to the reference. The mixing uses explicit fma(+-1, x, acc):
the product is exact, so its single rounding is the addition's; elsewhere FMA contraction is disabled.

Kernels:
- ``_rows_kernel`` (m == 1, the block-diagonal rotations of the activation path, p <= 256): ``lanes`` threads share
  one transform row, each holding ``p / lanes`` of its elements in 16-byte vectors (one run of consecutive vectors,
  or with ``interleave`` every lanes-th vector), so all stages but log2(lanes) are register additions and those
  fetch their partner across lanes; a quantization block is then reduced within its few threads. Then scale,
  dtype rounding and, when ``QUANT``, the MX fake quantization on the same registers before the single store.
- ``_rotate_kernel``: one program owns ``T`` consecutive rows of the flat ``[rows * m, p]`` view of the output
  (``p <= MAX_TILE``): mixing from global memory (rows four at a time, each input chunk loaded once per four
  outputs), butterflies in registers, scale, dtype rounding and the optional fake quantization as above.
  Where the data sit in L2 (dim 576: 19 MB in, 19 MB out) both run near instruction speed, so the SASS they
  compile to guides the formulation, but H100 timings decide it (the layout of the memory accesses mattered as
  much): see ``TileConfig`` / ``default_config`` and ``bench/hadamard.py``, which counts (``--sass``) and times
  them.
- Longer rows (``p > MAX_TILE``): ``_mix_kernel`` (m > 1) then two ``_butterfly_pass_kernel`` passes over fp32
  scratch (stages ``h < L1`` inside contiguous chunks of ``L1``, then the strided stages ``h >= L1`` with the scale),
  then a torch cast; quantization then runs as a separate kernel.

MXINT with round-half-even and the floor scale rule (the shipped recipes) is quantized by ``_mxint_even_tile``, a
shorter form of ``mx_quant.fake_quant_tile`` with the same bits (its docstring says why); other specs use
``fake_quant_tile`` itself.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from ptq.errors import PtqError
from ptq.formats import QuantSpec
from ptq.kernels._triton_utils import INTERPRETED, bf16_bits_to_f32, exp2i, f32_to_bf16_bits
from ptq.kernels.mx_quant import (FAM_MXINT, bf16_exact, fake_quant_tile, format_constants, mx_block_exponent,
                                  tile_stats)

MAX_TILE = 8192  # elements of one transform row held in registers by one program
_TILE_TARGET = 4096  # elements per program of the unfused long-row passes
# How the fp32 rotation result is rounded to a bf16 value inside the kernels (constexpr OUT_KIND):
# native ``.to()`` for fp32 / fp16, round-to-nearest-even on the bit pattern (exact everywhere, ~7 instructions
# per element), the GPU's cvt.rn.bf16.f32 (the same rounding in ~1 instruction, plus a shift back to fp32), or
# cvt.rn.bf16x2.f32 on pairs (one cvt per two elements; inline PTX). The hardware kinds never run under the
# interpreter, whose fp32 -> bf16 cast truncates and which cannot run PTX.
OUT_NATIVE, OUT_BF16_BITS, OUT_BF16_HW, OUT_BF16_HW2 = 0, 1, 2, 3
# Butterfly formulations (constexpr MODE), all doing the same additions in the same order (identical bits):
# radix-2 / radix-4 register shuffles (reshape / permute / split / join: the compiler moves data between layouts,
# often through shared memory), or "xor" (partner fetch): each element fetches its partner's bit pattern with a
# 2-element reduction (an in-register op, or one warp shuffle, where the pair lies in a thread or a warp; no layout
# change) for the first XOR_LOG stages, radix-4 for the rest. MODE_ROWS (m == 1 only) is ``_rows_kernel``: rows
# laid out so that the early stages are register additions. ``TileConfig`` / ``default_config`` choose.
MODE_RADIX2, MODE_RADIX4, MODE_XOR, MODE_ROWS = 0, 1, 2, 3


@triton.jit
def _stage2(x, T: tl.constexpr, P: tl.constexpr, H: tl.constexpr):
    """One butterfly stage of stride H along the last dim of the [T, P] tile."""
    v = tl.permute(tl.reshape(x, (T * P // (2 * H), 2, H)), (0, 2, 1))
    a, b = tl.split(v)
    return tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 2, 1)), (T, P))


@triton.jit
def _stage4(x, T: tl.constexpr, P: tl.constexpr, H: tl.constexpr):
    """Stages H and 2H in registers at once (the same additions, in the same order, as two ``_stage2``)."""
    # index = g * 4H + j * 2H + k * H + h; stage H pairs k = 0/1, stage 2H then pairs j = 0/1
    v = tl.permute(tl.reshape(x, (T * P // (4 * H), 2, 2, H)), (0, 3, 1, 2))  # [G, H, j, k]
    a, b = tl.split(v)  # k = 0 / 1: [G, H, j]
    s0, s1 = tl.split(a + b)
    d0, d1 = tl.split(a - b)
    lo = tl.join(s0 + s1, d0 + d1)  # j = 0, k = 0 / 1
    hi = tl.join(s0 - s1, d0 - d1)  # j = 1
    return tl.reshape(tl.permute(tl.join(lo, hi), (0, 3, 2, 1)), (T, P))  # [G, H, k, j] -> [G, j, k, H]


@triton.jit
def _stage_xor(x, T: tl.constexpr, P: tl.constexpr, H: tl.constexpr):
    """One stage of stride H that keeps every element where it is: (v + partner) - v in wrapping integer
    arithmetic on the bit patterns is the partner's pattern (exact for any value, NaN included); the first of a
    pair then holds a + b, the second a - b. (An integer sum rather than an xor reduction: the same one shuffle or
    register op on the GPU, and a native reduction, not a Python-level one, under the interpreter.)"""
    v = tl.reshape(x, (T * P // (2 * H), 2, H))
    bits = v.to(tl.int32, bitcast=True)
    partner = (tl.sum(bits, 1, keep_dims=True) - bits).to(tl.float32, bitcast=True)
    # first: partner + v = b + a; second: partner - v = a - b. The product by +-1 is exact, so the fma rounds once,
    # like the reference's add / subtract: one instruction where two and a select would do
    sign = tl.where(tl.arange(0, 2) == 0, 1.0, -1.0)[None, :, None]
    return tl.reshape(tl.fma(sign, v, partner), (T, P))


@triton.jit
def _butterflies(x, T: tl.constexpr, P: tl.constexpr, LOG_P: tl.constexpr, MODE: tl.constexpr,
                 XOR_LOG: tl.constexpr):
    """Stages h = 1, 2, ..., P/2 of (a + b, a - b) along the last dim of the [T, P] tile ``x``."""
    if MODE == 0:
        for s in tl.static_range(LOG_P):
            x = _stage2(x, T, P, 1 << s)
    else:
        NX: tl.constexpr = XOR_LOG  # leading stages done by partner fetch (0 unless MODE_XOR; <= LOG_P)
        for s in tl.static_range(NX):
            x = _stage_xor(x, T, P, 1 << s)
        for s in tl.static_range((LOG_P - NX) // 2):
            x = _stage4(x, T, P, 1 << (NX + 2 * s))
        if (LOG_P - NX) % 2 == 1:
            x = _stage2(x, T, P, 1 << (LOG_P - 1))
    return x


@triton.jit
def _row_butterflies(x, T: tl.constexpr, P: tl.constexpr, LOG_P: tl.constexpr, LANE_LO: tl.constexpr,
                     LANE_HI: tl.constexpr):
    """Stages h = 1 .. P/2 of a [T, P] tile whose strides LANE_LO <= h < LANE_HI pair elements of different threads
    (partner fetch) and all others elements of one thread (``_stage2`` compiles to plain additions there)."""
    for s in tl.static_range(LOG_P):
        if (1 << s) >= LANE_LO and (1 << s) < LANE_HI:
            x = _stage_xor(x, T, P, 1 << s)
        else:
            x = _stage2(x, T, P, 1 << s)
    return x


@triton.jit
def _bf16_round_pairs(y):
    """fp32 -> bf16 (nearest even) -> fp32 of two elements per cvt.rn.bf16x2.f32 (GPU only)."""
    r = tl.inline_asm_elementwise(
        "{ .reg .b32 t; cvt.rn.bf16x2.f32 t, $3, $2; shl.b32 $0, t, 16; and.b32 $1, t, 0xffff0000; }",
        "=r,=r,r,r", [y.to(tl.int32, bitcast=True)], dtype=tl.int32, is_pure=True, pack=2)
    return r.to(tl.float32, bitcast=True)


@triton.jit
def _round_to_out(y, OUT_KIND: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """fp32 -> output dtype -> fp32 (the value the reference holds after its cast)."""
    if OUT_KIND == 1:
        return (f32_to_bf16_bits(y, False).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    elif OUT_KIND == 2:
        return y.to(tl.bfloat16).to(tl.float32)
    elif OUT_KIND == 3:
        return _bf16_round_pairs(y)
    else:
        return y.to(OUT_DTYPE).to(tl.float32)


@triton.jit
def _mxint_even_tile(xb, EMAX: tl.constexpr, MAX_NORMAL: tl.constexpr, LEVELS: tl.constexpr,
                     FRAC_BITS: tl.constexpr):
    """``fake_quant_tile`` for MXINT with round-half-even and the floor scale rule on [NQB, QB] (one block per row),
    bit for bit in fewer instructions. Why it may skip steps: |x| / 2^e * 2^FRAC_BITS < 2^(EMAX + 1 + FRAC_BITS)
    (EMAX >= 0, so e is never clamped from above) is far below 2^22, so the half-even rounding needs no cap; and
    m * 2^(e - FRAC_BITS) is exact, so one fma of m with the step carrying x's sign, plus +0, gives the signed value
    and turns the -0 of a negative x rounded to zero into the reference's +0 (the reference: compare, multiply,
    two bit operations, select). Non-finite x are left out of the block maximum and returned unchanged."""
    bits = xb.to(tl.int32, bitcast=True)
    # amax of the finite |x| in 2 instructions per element, not 3 (compare, select, max): 2 |x|_bits + 2^24 wraps
    # to below 2^24 for inf / NaN and keeps the order of every finite |x| above it, so an unsigned max skips them
    key = ((bits << 1) + 16777216).to(tl.uint32, bitcast=True)
    kmax = tl.maximum(tl.max(key, axis=1), 16777216)[:, None]  # all non-finite: amax 0, like the reference
    amax = ((kmax - 16777216) >> 1).to(tl.float32, bitcast=True)
    e = mx_block_exponent(amax, EMAX, MAX_NORMAL, False)
    ax = tl.abs(xb)
    m = tl.minimum((((ax * exp2i(-e)) * (1 << FRAC_BITS)) + 12582912.0) - 12582912.0, LEVELS)
    step = ((bits & -2147483648) | exp2i(e - FRAC_BITS).to(tl.int32, bitcast=True)).to(tl.float32, bitcast=True)
    # m is meaningless where x is inf / NaN: x itself is kept there
    return tl.where(ax < float("inf"), tl.fma(m, step, 0.0), xb)


@triton.jit
def _quantize(x, u, T: tl.constexpr, P: tl.constexpr, QB: tl.constexpr, LEAN: tl.constexpr,
              FAMILY: tl.constexpr, WIDTH: tl.constexpr, MAN_BITS: tl.constexpr, EMAX: tl.constexpr,
              EMIN: tl.constexpr, MAX_NORMAL: tl.constexpr, LEVELS: tl.constexpr, FRAC_BITS: tl.constexpr,
              ROUNDING: tl.constexpr, SCALE_CEIL: tl.constexpr):
    """MX fake quantization of the [T, P] tile ``x`` in blocks of QB consecutive elements (``u``: the [T, P] noise
    of stochastic rounding, else 0.0)."""
    NQB: tl.constexpr = T * P // QB
    xb = tl.reshape(x, (NQB, QB))
    if LEAN:
        xq = _mxint_even_tile(xb, EMAX, MAX_NORMAL, LEVELS, FRAC_BITS)
    else:
        if ROUNDING == 3:
            u = tl.reshape(u, (NQB, QB))
        ax, amax = tile_stats(xb, True, False)
        xq = fake_quant_tile(xb, ax, amax, u, 1.0, FAMILY, WIDTH, MAN_BITS, EMAX, EMIN, MAX_NORMAL, LEVELS,
                             FRAC_BITS, ROUNDING, SCALE_CEIL, NQB, QB)
    return tl.reshape(xq, (T, P))


@triton.jit
def _store_out(ptrs, x, mask, OUT_KIND: tl.constexpr, STORE_EXACT: tl.constexpr):
    """Store fp32 ``x`` in the output dtype. STORE_EXACT: x is a value of the output dtype already (the rounded
    rotation, or an MX grid value that ``mx_quant.bf16_exact`` guarantees is a bf16 number), so dropping the low
    half is the cast."""
    if OUT_KIND == 0:
        tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=mask)
    elif STORE_EXACT or OUT_KIND == 1:
        tl.store(ptrs, f32_to_bf16_bits(x, STORE_EXACT), mask=mask)
    else:
        tl.store(ptrs, x.to(tl.bfloat16).to(tl.int16, bitcast=True), mask=mask)


@triton.jit
def _load_f32(ptr, rows, cols, ROWS: tl.constexpr, P: tl.constexpr, IN_KIND: tl.constexpr):
    """fp32 [ROWS, P] tile of ``ptr[rows[:, None] * cols + c]`` (element offsets; ``ptr`` typed per IN_KIND).

    IN_KIND 0: native load and ``.to(float32)``. 1: bf16 as int16 bit patterns widened by a shift (the
    interpreter's bf16 -> fp32 ``.to()`` flushes subnormals). 2: bf16 pairs read as int32 words, the low element
    widened by one shift and the high one by one mask (the native cast spends ~2 instructions per element), then
    interleaved in registers; ``ptr`` is the int32 view and P even."""
    if IN_KIND == 2:
        w = tl.load(ptr + (rows[:, None] * (cols // 2) + tl.arange(0, P // 2)[None, :]))
        lo = (w << 16).to(tl.float32, bitcast=True)
        hi = (w & -65536).to(tl.float32, bitcast=True)
        return tl.reshape(tl.join(lo, hi), (ROWS, P))
    else:
        v = tl.load(ptr + (rows[:, None] * cols + tl.arange(0, P)[None, :]))
        if IN_KIND == 1:
            return bf16_bits_to_f32(v)
        else:
            return v.to(tl.float32)


@triton.jit
def _mix4_term(x_ptr, s0, r, j, a0, a1, a2, a3, M: tl.constexpr, P: tl.constexpr, TG: tl.constexpr,
               IN_KIND: tl.constexpr):
    """acc_k += s[i0 + k, j] * x_j for the four mixing rows of a group (one load of x_j for all four)."""
    xj = _load_f32(x_ptr, r * M + j, P, TG, P, IN_KIND)
    a0 = tl.fma(tl.load(s0 + j)[:, None], xj, a0)
    a1 = tl.fma(tl.load(s0 + (M + j))[:, None], xj, a1)
    a2 = tl.fma(tl.load(s0 + (2 * M + j))[:, None], xj, a2)
    a3 = tl.fma(tl.load(s0 + (3 * M + j))[:, None], xj, a3)
    return a0, a1, a2, a3


@triton.jit
def _rotate_kernel(x_ptr, s_ptr, y_ptr, noise_ptr, n_flat, scale,
                   M: tl.constexpr, P: tl.constexpr, LOG_P: tl.constexpr, T: tl.constexpr,
                   IN_KIND: tl.constexpr, OUT_KIND: tl.constexpr, STORE_EXACT: tl.constexpr,
                   QUANT: tl.constexpr, QB: tl.constexpr,
                   FAMILY: tl.constexpr, WIDTH: tl.constexpr, MAN_BITS: tl.constexpr, EMAX: tl.constexpr,
                   EMIN: tl.constexpr, MAX_NORMAL: tl.constexpr, LEVELS: tl.constexpr, FRAC_BITS: tl.constexpr,
                   ROUNDING: tl.constexpr, SCALE_CEIL: tl.constexpr, LEAN: tl.constexpr, MODE: tl.constexpr,
                   XOR_LOG: tl.constexpr, UNROLL: tl.constexpr, G: tl.constexpr, USE_I64: tl.constexpr):
    """One program: ``T`` consecutive length-P rows of the flat [rows * M, P] view of the output (row t is
    mixing row i = t % M of transform row t // M; no padding of M to a power of two)."""
    t = tl.program_id(0) * T + tl.arange(0, T)
    if USE_I64:
        t = t.to(tl.int64)
    c = tl.arange(0, P)
    # the mask is constant along a row, so loads and stores stay vectorised
    mask = tl.broadcast_to((t < n_flat)[:, None], (T, P))
    offs = t[:, None] * P + c[None, :]
    # loads read a clamped row instead of being masked: no per-load zero fill, and the rows past the end are
    # never stored
    if M == 1:
        x = _load_f32(x_ptr, tl.minimum(t, n_flat - 1), P, T, P, IN_KIND)
    else:
        # y_i = sum_j s[i, j] x_j, left to right; the first term initialises (keeps the sign of zeros exact).
        # fma(s, x_j, acc) == acc + s * x_j bit for bit: the product by +-1 is exact, so the fma's one rounding
        # is the addition's.
        if G == 4:
            # four consecutive mixing rows i0..i0+3 of one transform row (M is a multiple of 4) share each load
            # and widening of x_j; four accumulators in the layout of that load, so no data moves in the loop
            TG: tl.constexpr = T // 4
            row0 = tl.minimum(tl.program_id(0) * T + tl.arange(0, TG) * 4, n_flat - 4)  # first row of a group
            if USE_I64:
                row0 = row0.to(tl.int64)
            r = row0 // M
            s0 = s_ptr + (row0 - r * M) * M  # sign rows i0 .. i0 + 3 start at s0, s0 + M, s0 + 2M, s0 + 3M
            xj = _load_f32(x_ptr, r * M, P, TG, P, IN_KIND)
            a0 = tl.load(s0)[:, None] * xj
            a1 = tl.load(s0 + M)[:, None] * xj
            a2 = tl.load(s0 + 2 * M)[:, None] * xj
            a3 = tl.load(s0 + 3 * M)[:, None] * xj
            if UNROLL:
                for j in tl.static_range(1, M):
                    a0, a1, a2, a3 = _mix4_term(x_ptr, s0, r, j, a0, a1, a2, a3, M, P, TG, IN_KIND)
            else:
                for j in range(1, M):
                    a0, a1, a2, a3 = _mix4_term(x_ptr, s0, r, j, a0, a1, a2, a3, M, P, TG, IN_KIND)
            # [TG, P, k0, k1] -> [TG, k1, k0, P]: flat row tg * 4 + 2 * k1 + k0
            x = tl.permute(tl.join(tl.join(a0, a1), tl.join(a2, a3)), (0, 3, 2, 1))
            x = tl.reshape(x, (T, P))
        else:
            tc = tl.minimum(t, n_flat - 1)
            r = tc // M
            srow = s_ptr + (tc - r * M) * M  # i = t % M < M: always in bounds
            x = tl.load(srow)[:, None] * _load_f32(x_ptr, r * M, P, T, P, IN_KIND)
            if UNROLL:
                for j in tl.static_range(1, M):
                    x = tl.fma(tl.load(srow + j)[:, None], _load_f32(x_ptr, r * M + j, P, T, P, IN_KIND), x)
            else:
                for j in range(1, M):
                    x = tl.fma(tl.load(srow + j)[:, None], _load_f32(x_ptr, r * M + j, P, T, P, IN_KIND), x)
    x = _butterflies(x, T, P, LOG_P, MODE, XOR_LOG)
    x = _round_to_out(x * scale, OUT_KIND, y_ptr.dtype.element_ty)
    if QUANT:
        u = 0.0
        if ROUNDING == 3:
            u = tl.load(noise_ptr + offs, mask=mask, other=0.0)
        x = _quantize(x, u, T, P, QB, LEAN, FAMILY, WIDTH, MAN_BITS, EMAX, EMIN, MAX_NORMAL, LEVELS, FRAC_BITS,
                      ROUNDING, SCALE_CEIL)
    _store_out(y_ptr + offs, x, mask, OUT_KIND, STORE_EXACT)


@triton.jit
def _row_offsets(rows, L: tl.constexpr, C: tl.constexpr, V: tl.constexpr, ROW: tl.constexpr, ILV: tl.constexpr):
    """[L, T, C, V] offsets of rows ``rows`` (length ROW) cut into L * C vectors of V elements, vector
    (l * C + c) (ILV: c * L + l) at rows[t] * ROW + vector * V + v. The order of the dims makes each thread own one
    (l, t) and all its C vectors: the compiler gives threads to the dims in order of contiguity (v), then by index
    (l, then t), and what is left (c) stays in registers. ILV interleaves the threads' vectors, so that adjacent
    threads read and write adjacent 16 bytes (whole 32-byte sectors per instruction)."""
    l = tl.arange(0, L)[:, None, None, None]
    c = tl.arange(0, C)[None, None, :, None]
    vec = c * L + l if ILV else l * C + c
    return rows[None, :, None, None] * ROW + vec * V + tl.arange(0, V)[None, None, None, :]


@triton.jit
def _load_rows(ptr, rows, L: tl.constexpr, T: tl.constexpr, C: tl.constexpr, V: tl.constexpr, P: tl.constexpr,
               ILV: tl.constexpr, IN_KIND: tl.constexpr):
    """fp32 [L, T, C, V] tile of rows ``rows`` (see ``_row_offsets``; IN_KIND as for ``_load_f32``)."""
    if IN_KIND == 2:
        w = tl.load(ptr + _row_offsets(rows, L, C, V // 2, P // 2, ILV))
        lo = (w << 16).to(tl.float32, bitcast=True)
        hi = (w & -65536).to(tl.float32, bitcast=True)
        return tl.reshape(tl.join(lo, hi), (L, T, C, V))
    v = tl.load(ptr + _row_offsets(rows, L, C, V, P, ILV))
    return bf16_bits_to_f32(v) if IN_KIND == 1 else v.to(tl.float32)


@triton.jit
def _to_rows(xc, T: tl.constexpr, P: tl.constexpr, ILV: tl.constexpr):
    """[L, T, C, V] (``_row_offsets``) -> [T, P] in row order."""
    if ILV:
        return tl.reshape(tl.permute(xc, (1, 2, 0, 3)), (T, P))
    return tl.reshape(tl.permute(xc, (1, 0, 2, 3)), (T, P))


@triton.jit
def _from_rows(x, L: tl.constexpr, T: tl.constexpr, C: tl.constexpr, V: tl.constexpr, ILV: tl.constexpr):
    """[T, P] in row order -> [L, T, C, V] (``_row_offsets``)."""
    if ILV:
        return tl.permute(tl.reshape(x, (T, C, L, V)), (2, 0, 1, 3))
    return tl.permute(tl.reshape(x, (T, L, C, V)), (1, 0, 2, 3))


@triton.jit
def _rows_kernel(x_ptr, y_ptr, noise_ptr, n_rows, scale,
                 P: tl.constexpr, LOG_P: tl.constexpr, T: tl.constexpr, L: tl.constexpr, V: tl.constexpr,
                 ILV: tl.constexpr, IN_KIND: tl.constexpr, OUT_KIND: tl.constexpr, STORE_EXACT: tl.constexpr,
                 QUANT: tl.constexpr, QB: tl.constexpr,
                 FAMILY: tl.constexpr, WIDTH: tl.constexpr, MAN_BITS: tl.constexpr, EMAX: tl.constexpr,
                 EMIN: tl.constexpr, MAX_NORMAL: tl.constexpr, LEVELS: tl.constexpr, FRAC_BITS: tl.constexpr,
                 ROUNDING: tl.constexpr, SCALE_CEIL: tl.constexpr, LEAN: tl.constexpr, USE_I64: tl.constexpr):
    """One program: ``T`` consecutive length-P transform rows (m == 1), each spread over L threads (MODE_ROWS)."""
    t = tl.program_id(0) * T + tl.arange(0, T)
    if USE_I64:
        t = t.to(tl.int64)
    C: tl.constexpr = P // (L * V)
    # rows past the end read the last row (never stored): no masked loads
    x = _to_rows(_load_rows(x_ptr, tl.minimum(t, n_rows - 1), L, T, C, V, P, ILV, IN_KIND), T, P, ILV)
    if ILV:
        x = _row_butterflies(x, T, P, LOG_P, V, V * L)
    else:
        x = _row_butterflies(x, T, P, LOG_P, C * V, P)
    x = _round_to_out(x * scale, OUT_KIND, y_ptr.dtype.element_ty)
    offs = _row_offsets(t, L, C, V, P, ILV)
    mask = tl.broadcast_to((t < n_rows)[None, :, None, None], (L, T, C, V))
    if QUANT:
        u = 0.0
        if ROUNDING == 3:
            u = _to_rows(tl.load(noise_ptr + offs, mask=mask, other=0.0), T, P, ILV)
        x = _quantize(x, u, T, P, QB, LEAN, FAMILY, WIDTH, MAN_BITS, EMAX, EMIN, MAX_NORMAL, LEVELS, FRAC_BITS,
                      ROUNDING, SCALE_CEIL)
    _store_out(y_ptr + offs, _from_rows(x, L, T, C, V, ILV), mask, OUT_KIND, STORE_EXACT)


@triton.jit
def _mix_kernel(x_ptr, s_ptr, y_ptr, n_rows, M: tl.constexpr, MP2: tl.constexpr, P, PB: tl.constexpr):
    """fp32 y[r, i, :] = sum_j s[i, j] x[r, j, :] (left to right) for one row and one chunk of columns."""
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * PB + tl.arange(0, PB)
    i = tl.arange(0, MP2)
    c_ok = (c < P)[None, :]
    base = r * M * P + c[None, :]
    s_ok = i < M
    acc = tl.load(s_ptr + i * M, mask=s_ok, other=0.0)[:, None] * tl.load(x_ptr + base, mask=c_ok).to(tl.float32)
    for j in range(1, M):
        xj = tl.load(x_ptr + base + j * P, mask=c_ok).to(tl.float32)
        acc = acc + tl.load(s_ptr + i * M + j, mask=s_ok, other=0.0)[:, None] * xj
    tl.store(y_ptr + base + i[:, None] * P, acc, mask=c_ok & s_ok[:, None])


@triton.jit
def _butterfly_pass_kernel(x_ptr, y_ptr, n_rows, C, scale, L: tl.constexpr, LOG_L: tl.constexpr,
                           RB: tl.constexpr, APPLY_SCALE: tl.constexpr, MODE: tl.constexpr):
    """All stages along a strided axis: logical row t holds x[(t // C) * L * C + (t % C) + l * C], l < L (fp32)."""
    t = (tl.program_id(0) * RB + tl.arange(0, RB)).to(tl.int64)
    base = (t // C) * (L * C) + (t % C)
    offs = base[:, None] + tl.arange(0, L)[None, :] * C
    mask = (t < n_rows)[:, None] & (tl.arange(0, L) < L)[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    x = _butterflies(x, RB, L, LOG_L, MODE, 0)
    if APPLY_SCALE:
        x = x * scale
    tl.store(y_ptr + offs, x, mask=mask)


# ------------------------------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------------------------------
def _log2(n: int) -> int:
    return n.bit_length() - 1


def _signs(rot, inverse: bool, device) -> torch.Tensor:
    s = rot.pm1.to(device=device, dtype=torch.float32)
    return (s.T if inverse else s).contiguous()


def _on_gpu(x: torch.Tensor) -> bool:
    """Compiled for the CUDA device rather than interpreted (hardware bf16 rounding allowed)."""
    return x.is_cuda and not INTERPRETED


def _check(x: torch.Tensor, rot) -> None:
    from ptq.hadamard import check_input

    check_input(x, rot.size)
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise PtqError(f"the Triton Hadamard kernel handles float32 / bfloat16 / float16, not {x.dtype}")


@dataclass(frozen=True)
class TileConfig:
    """How the tile kernels are launched: ``elems`` elements per program (whole transform rows, at least one),
    ``warps``, butterfly ``mode`` (``MODE_*``; MODE_ROWS needs m == 1 and p / lanes <= 256), ``xor_stages``
    (MODE_XOR: how many leading stages fetch their partner, the rest run radix-4; -1 = all), ``unroll`` (mixing
    loop over the m known-order rows unrolled at compile time; by default for m <= 64), ``mix_group`` (4: mixing
    rows handled four at a time, sharing each load of the input; 1: one at a time), ``lanes`` (MODE_ROWS: threads
    sharing one transform row), ``interleave`` (MODE_ROWS: those threads hold alternate 16-byte vectors rather than
    one run each), ``lean`` (``_mxint_even_tile`` where the spec allows it) and ``pair_cvt`` (bf16 rounding two
    elements per instruction on the GPU). All configurations give identical bits; they differ in speed only. The
    unfused long-row passes take their butterflies one stage at a time under MODE_RADIX2, else two."""

    elems: int = 4096
    warps: int = 4
    mode: int = MODE_XOR
    xor_stages: int = -1
    unroll: bool = True
    mix_group: int = 4
    lanes: int = 1
    lean: bool = True
    pair_cvt: bool = False
    interleave: bool = False


_MODES = {"r2": (MODE_RADIX2, 0), "r4": (MODE_RADIX4, 0), "xor": (MODE_XOR, -1), "rows": (MODE_ROWS, 0)}
_FLAGS = {"u": "unroll", "q": "lean", "c": "pair_cvt", "i": "interleave"}


def _variant_token(cfg: TileConfig, tok: str) -> TileConfig | None:
    if tok in _MODES:
        mode, k = _MODES[tok]
        return replace(cfg, mode=mode, xor_stages=k)
    if tok.startswith("xor") and tok[3:].isdigit():
        return replace(cfg, mode=MODE_XOR, xor_stages=int(tok[3:]))
    if tok[:1] in _FLAGS and tok[1:] in ("0", "1"):
        return replace(cfg, **{_FLAGS[tok[0]]: tok[1] == "1"})
    if tok in ("g1", "g4"):
        return replace(cfg, mix_group=int(tok[1]))
    if tok[:1] == "l" and tok[1:].isdigit() and _pow2(int(tok[1:])):
        return replace(cfg, lanes=int(tok[1:]))
    elems, _, warps = tok.partition("x")
    if elems.isdigit() and warps.isdigit() and _pow2(int(elems)) and int(warps) in (1, 2, 4, 8, 16, 32):
        return replace(cfg, elems=int(elems), warps=int(warps))
    return None


def _pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def parse_variant(variant: str, base: TileConfig) -> TileConfig:
    """``base`` changed by a variant string (benchmarks, tests): '/'-joined tokens, each one of a butterfly mode
    ``r2`` | ``r4`` | ``xor`` | ``xorK`` (K leading partner-fetch stages, then radix-4) | ``rows``, a tile
    ``ELEMSxWARPS`` (powers of two), ``lN`` (lanes), ``g1`` | ``g4`` (mix_group), ``u0`` | ``u1`` (unroll),
    ``q0`` | ``q1`` (lean), ``c0`` | ``c1`` (pair_cvt), ``i0`` | ``i1`` (interleave); ``default`` is ``base``."""
    cfg = base
    for tok in [] if variant == "default" else variant.split("/"):
        nxt = _variant_token(cfg, tok)
        if nxt is None:
            raise PtqError(f"Hadamard kernel variant {variant!r}: unknown token {tok!r} (use r2, r4, xor, xorK, "
                           "rows, ELEMSxWARPS with powers of two, lN, g1/g4, u0/u1, q0/q1, c0/c1, i0/i1)")
        cfg = nxt
    return cfg


@functools.lru_cache(maxsize=256)
def _default_config(m: int, p: int) -> TileConfig:
    # ~32 fp32 values per thread: a row of 8192 (one program) in 8 warps (~44 instructions vs ~50 in 4)
    warps = 8 if p > 4096 else 4
    if m == 1 and p <= 256:
        lanes = min(p, max(2, p // 32))
        return TileConfig(elems=4096, warps=warps, mode=MODE_ROWS, lanes=lanes, interleave=p // lanes <= 16)
    # p <= 256 after a known-order mixing (576 = 36 x 16): partner fetch throughout measured 4.28x vs 4.48x radix-2.
    # Longer rows: partner fetch for 6 or 5 stages, whichever leaves an even number for the radix-4 pairs
    xor = -1 if p <= 256 else 6 - _log2(p) % 2
    return TileConfig(elems=4096, warps=warps, mode=MODE_XOR, xor_stages=xor, unroll=m <= 64, mix_group=4)


def default_config(rot) -> TileConfig:
    """The launch configuration of the tile kernels for a rotation.

    Chosen by H100 timings of ``bench/hadamard.py`` (8 x 2048 x dim bf16, MXINT4 blocks of 32, CUDA-graph GPU time
    over quantize alone in the same run), with the SASS counts of ``bench/hadamard.py --sass`` (instructions per
    element, sm_90, triton 3.6) as the guide where nothing was timed. Dim 576 is 19 MB in and 19 MB out, which stay
    in the 50 MB L2 across calls: there the former radix-2 tile took 1.40x (33.5 instructions per element against
    quantize alone's 22.5; 1.50x for blocks of 64, 36.2), where dim 4096, waiting on memory, took 1.00x.

    Block-diagonal rotations (m == 1, p <= 256) take MODE_ROWS with at least two threads per row (p / 32 for longer
    rows): 1 or 2 (p = 256: 3) stages fetch a partner across lanes, the rest are register additions, and a block of
    32 is reduced within its pair of threads (~24.5 instructions per element with ``lean``). Measured, blocks of 32:
    two threads holding alternate 16-byte vectors (``interleave``) 0.96x at dim 576 and at 4096; contiguous halves
    1.04x (576); one thread per row 1.45x (576) and 1.42x (4096), although its SASS was the shortest (22.0: no
    cross-lane stage at all; 1.15x with ``pair_cvt``): the instruction count stopped predicting the time there.
    Blocks of 64: two threads with 32 contiguous elements each 1.13x (576) / 0.99x (4096), interleaved 1.17x, one
    thread per row 2.25x (2 warps, 80 registers). Rows of 16, 128, 256 follow by analogy (not timed; SASS 24.8,
    27.0, 29.0 instructions per element against 30.0, 38.5, 62.0 for the former tile).

    Full power-of-two transforms (p >= 512): partner fetch in the first 6 stages (5 for odd log2 p), then radix-4
    pairs. Measured at 4096: 1.08x with 6 (37.5 instructions), 1.17x with 7 (37.8), 1.25x with 5 (39.5, the former
    default, 1.33x before ``lean`` and the one-fma partner fetch). The lengths not timed take the number that leaves
    an even count of stages to the radix-4 pairs, which also gave the shortest SASS at 512 .. 8192 (e.g. 1024: 40.0
    instructions with 6 against 54.2 with 5; 2048: 39.5 with 5 against 41.0 with 6).
    After a known-order mixing (576 = 36 x 16) partner fetch throughout: 4.27x, where the m = 36 mixing alone is
    35 fma per element kept in the reference's order (quantize alone runs ~22 instructions per element)."""
    return _default_config(rot.m, rot.p)


def _fmt_meta(spec: QuantSpec | None, bits: bool, lean_ok: bool) -> dict:
    if spec is None:
        return dict(QUANT=False, QB=1, FAMILY=0, WIDTH=0, MAN_BITS=0, EMAX=0, EMIN=0, MAX_NORMAL=0.0, LEVELS=0,
                    FRAC_BITS=0, ROUNDING=0, SCALE_CEIL=False, STORE_EXACT=bits, LEAN=False)
    c = format_constants(spec)
    # _mxint_even_tile's shortcuts hold for MXINT, round-half-even, floor scale rule, EMAX >= 0
    lean = lean_ok and c.family == FAM_MXINT and c.rounding == 0 and not c.scale_ceil and c.emax >= 0
    return dict(QUANT=True, QB=spec.block_size, **c.element_kwargs(), STORE_EXACT=bits and bf16_exact(spec),
                LEAN=lean)


@functools.lru_cache(maxsize=1024)
def _tile_meta(m: int, p: int, spec: QuantSpec | None, cfg: TileConfig, dtype: torch.dtype, gpu: bool,
               pairs: bool, rb_min: int):
    log_p = _log2(p)
    # whole quantization blocks per program: at least rb_min rows and QB / P rows (a block spanning rows)
    t_min = max(rb_min, (spec.block_size // p) if spec is not None else 1)
    bits = dtype == torch.bfloat16
    kind = OUT_NATIVE if not bits else (OUT_BF16_HW2 if cfg.pair_cvt else OUT_BF16_HW) if gpu else OUT_BF16_BITS
    common = dict(P=p, LOG_P=log_p, OUT_KIND=kind, enable_fp_fusion=False, **_fmt_meta(spec, bits, cfg.lean))
    if cfg.mode == MODE_ROWS:
        lanes = min(cfg.lanes, p)
        if m != 1 or p // lanes > 256:
            raise PtqError(f"MODE_ROWS handles rotations without a known-order factor (m = {m}; needs 1) and at most "
                           f"256 elements per thread (p / lanes = {p // lanes}); use more lanes or another mode")
        v = min(16 // dtype.itemsize, p // lanes)  # elements per 16-byte vector
        t = max(triton.next_power_of_2(t_min), cfg.elems // p)
        # bf16 input: int32 pairs where a vector holds whole pairs, else int16 patterns (a shift each)
        in_kind = 0 if not bits else 2 if v % 2 == 0 and pairs else 1
        # every thread must own a row part: more warps than T * lanes / 32 would split the parts themselves
        warps = max(1, min(cfg.warps, t * lanes // 32))
        return _rows_kernel, t, dict(T=t, L=lanes, V=v, ILV=cfg.interleave and lanes > 1, IN_KIND=in_kind,
                                     num_warps=warps, **common)
    g = 4 if m > 1 and cfg.mix_group == 4 and m % 4 == 0 else 1
    t = max(triton.next_power_of_2(t_min), cfg.elems // p, g)
    in_kind = 0 if not bits else 2 if p % 2 == 0 and pairs else 1
    xor_log = 0 if cfg.mode != MODE_XOR else log_p if cfg.xor_stages < 0 else min(cfg.xor_stages, log_p)
    return _rotate_kernel, t, dict(M=m, T=t, IN_KIND=in_kind, MODE=cfg.mode, XOR_LOG=xor_log, UNROLL=cfg.unroll,
                                   G=g, num_warps=cfg.warps, **common)


def tile_meta(rot, spec: QuantSpec | None, cfg: TileConfig, dtype: torch.dtype, gpu: bool,
              pairs: bool = True, rb_min: int = 1):
    """(kernel, rows per program ``T``, its constexprs and launch options) for one launch; the dict is shared
    (cached): do not modify it.

    ``gpu``: compiled for a CUDA device (hardware bf16 rounding) rather than interpreted; ``pairs``: the bf16 input
    may be read as int32 pairs (4-byte aligned). Separate from the launch so the exact kernel can also be compiled
    offline for inspection (e.g. ``triton.compile`` for sm_90 on a machine without a GPU)."""
    return _tile_meta(rot.m, rot.p, spec, cfg, dtype, gpu, pairs, rb_min)


def _launch_tile(x2: torch.Tensor, rot, inverse: bool, spec: QuantSpec | None, noise: torch.Tensor | None,
                 rb_min: int = 1, config: TileConfig | None = None) -> torch.Tensor:
    """One tile kernel over a contiguous [rows, n] view (n = the transform length)."""
    rows = x2.shape[0]
    y2 = torch.empty_like(x2)
    if rows == 0:
        return y2
    cfg = config or _default_config(rot.m, rot.p)
    kernel, t, meta = _tile_meta(rot.m, rot.p, spec, cfg, x2.dtype, _on_gpu(x2), x2.data_ptr() % 4 == 0, rb_min)
    in_kind = meta["IN_KIND"]
    x_arg = x2 if in_kind == 0 else x2.view(torch.int32) if in_kind == 2 else x2.view(torch.int16)
    y_arg = y2.view(torch.int16) if x2.dtype == torch.bfloat16 else y2
    n_flat = rows * rot.m
    u_arg = noise if noise is not None else x2
    use_i64 = (n_flat + t) * rot.p >= 2**31 - 1
    if kernel is _rows_kernel:
        kernel[(triton.cdiv(n_flat, t),)](x_arg, y_arg, u_arg, n_flat, rot.scale, USE_I64=use_i64, **meta)
    else:
        kernel[(triton.cdiv(n_flat, t),)](x_arg, _signs(rot, inverse, x2.device), y_arg, u_arg, n_flat, rot.scale,
                                          USE_I64=use_i64, **meta)
    return y2


def _warps(tile_elems: int) -> int:
    return 4 if tile_elems < 4096 else 8 if tile_elems <= 8192 else 16


def _rows_per_program(row_elems: int, at_least: int = 1) -> int:
    return max(at_least, triton.next_power_of_2(max(1, _TILE_TARGET // row_elems)))


def _launch_long(x2: torch.Tensor, rot, inverse: bool, radix2: bool) -> torch.Tensor:
    """Transform rows longer than one tile: mixing, then the butterflies in two passes over fp32 scratch
    (``radix2``: one stage at a time, else two)."""
    rows = x2.shape[0]
    m, p = rot.m, rot.p
    if m > 1:
        y = torch.empty(x2.shape, dtype=torch.float32, device=x2.device)
        pb = max(16, min(1024, _TILE_TARGET // triton.next_power_of_2(m)))
        _mix_kernel[(rows, triton.cdiv(p, pb))](x2, _signs(rot, inverse, x2.device), y, rows, M=m,
                                                 MP2=triton.next_power_of_2(m), P=p, PB=pb, enable_fp_fusion=False)
    else:
        y = x2.to(torch.float32).clone() if x2.dtype == torch.float32 else x2.to(torch.float32)
    if p > MAX_TILE * MAX_TILE:
        raise PtqError(f"Hadamard size {rot.n} is beyond what the Triton kernel handles (p <= {MAX_TILE}^2)")
    passes = [(p, 1)] if p <= MAX_TILE else [(MAX_TILE, 1), (p // MAX_TILE, MAX_TILE)]
    seg = rows * m  # independent length-p transforms
    for k, (L, C) in enumerate(passes):
        if L == 1:
            continue
        n_logical = seg * (p // L)
        rb = _rows_per_program(L)
        _butterfly_pass_kernel[(triton.cdiv(n_logical, rb),)](
            y, y, n_logical, C, rot.scale, L=L, LOG_L=_log2(L), RB=rb, APPLY_SCALE=k == len(passes) - 1,
            MODE=MODE_RADIX2 if radix2 else MODE_RADIX4, num_warps=_warps(rb * L), enable_fp_fusion=False)
    if p == 1:  # no butterflies ran: the single scale multiply happens here
        y = y * rot.scale
    return y.to(x2.dtype)


def _fits_tile(rot) -> bool:
    return rot.p <= MAX_TILE and triton.next_power_of_2(rot.m) * rot.p <= 4 * MAX_TILE


def triton_rotate(x: torch.Tensor, rot, *, inverse: bool = False,
                  config: TileConfig | None = None) -> torch.Tensor:
    """``rot(x)`` (or ``rot.inverse(x)``) with the Triton kernels; bit-identical to the torch reference.

    ``rot``: a ``ptq.modules.rotation.HadamardRotation`` (only ``size``, ``n``, ``m``, ``p``, ``scale`` and the
    ``pm1`` buffer are read). ``config``: the launch configuration (default: ``default_config(rot)``)."""
    _check(x, rot)
    x2 = x.contiguous().view(-1, rot.n)
    if _fits_tile(rot):
        y2 = _launch_tile(x2, rot, inverse, None, None, config=config)
    else:
        y2 = _launch_long(x2, rot, inverse, config is not None and config.mode == MODE_RADIX2)
    return y2.view(x.shape)


def fusable(x: torch.Tensor, rot, spec: QuantSpec) -> bool:
    """Whether ``rotate_fake_quantize`` runs as the single fused kernel (else: rotate, then quantize)."""
    qb = spec.block_size
    if spec.family == "nvfp4" or spec.axis % x.dim() != x.dim() - 1:
        return False  # NVFP4 needs the rotated tensor's global amax first; other axes are not the rotated one
    if qb & (qb - 1) or rot.size % qb or not _fits_tile(rot):
        return False
    if qb <= rot.p:
        return True
    # a quantization block spans several mixing rows (m > 1) or several transform blocks (m == 1)
    return rot.m == 1 or (rot.m * rot.p) % qb == 0


def rotate_fake_quantize(x: torch.Tensor, rotation, spec: QuantSpec, *, noise: torch.Tensor | None = None,
                         backend: str | None = None, config: TileConfig | None = None) -> torch.Tensor:
    """``fake_quantize(rotation(x), spec)`` (bit for bit), in one Triton kernel where ``fusable``.

    ``backend``: None/"auto" (Triton on CUDA, else torch), "torch" (the two reference steps), "triton".
    ``config``: the kernel's launch configuration (default: ``default_config(rotation)``)."""
    from ptq.quantizers import fake_quantize, resolve_backend
    from ptq.quantizers.reference import resolve_noise

    choice = backend or "auto"
    if choice == "auto":
        choice = "triton" if x.is_cuda else "torch"
    if choice == "torch":
        return fake_quantize(_torch_rotate(x, rotation), spec, backend="torch", noise=noise)
    if choice != "triton":
        raise PtqError(f"unknown backend {backend!r} for rotate_fake_quantize; use auto, torch or triton")
    _check(x, rotation)
    if not fusable(x, rotation, spec):
        return fake_quantize(triton_rotate(x, rotation, config=config), spec, backend=resolve_backend(x, spec, None),
                             noise=noise)
    noise = resolve_noise(x, spec, noise)  # validates a given noise tensor, draws the default one
    x2 = x.contiguous().view(-1, rotation.n)
    n2 = noise.contiguous().view(-1) if noise is not None else None
    rb_min = max(1, spec.block_size // (rotation.m * rotation.p)) if rotation.m == 1 else 1
    return _launch_tile(x2, rotation, False, spec, n2, rb_min, config).view(x.shape)


def _torch_rotate(x: torch.Tensor, rot) -> torch.Tensor:
    from ptq.hadamard import rotate_reference

    return rotate_reference(x, rot.size, kind=rot.kind, block_size=rot.block_size)
