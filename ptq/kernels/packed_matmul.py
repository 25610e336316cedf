"""Triton GEMM with the weight dequantized inside the tiles: ``y = x @ dequant(W)^T``.

The weight stays packed in global memory (two 4-bit codes per byte plus one 8-bit scale per block, or one int8 code
per element for MXINT8); each program loads a ``[BN, BK]`` tile of codes and the matching scales, decodes them in
registers, multiplies by the scale and feeds ``tl.dot`` in the input's dtype with fp32 accumulation. At decode shapes
(M <= 16) the GEMM is bound by weight bytes, so moving ~4x fewer bytes than bf16 is where the speed comes from; the
H100 has no FP4 tensor cores, so the math itself runs in bf16.

Supported weight formats (``FMT``):
    0 MXFP4  : E2M1 codes (uint8 bits, 2 per byte, element 2i in the low nibble), E8M0 uint8 scale per 32
    1 NVFP4  : E2M1 codes, E4M3 scale bits (uint8) per 16, fp32 global scale applied to the accumulator
    2 MXINT4 : int4 two's complement codes of m (value m / 4), E8M0 scale per block
    3 MXINT8 : int8 codes of m (value m / 64), E8M0 scale per block

The interpreter's ``tl.dot`` gives garbage for bf16 / fp16 operands (numpy has no bf16), so off CUDA both
operands are upcast exactly to fp32 and multiplied with ``input_precision="ieee"``.

Exactness: every decoded weight value (code x power-of-two scale, or E2M1 x E4M3 for NVFP4) is exact in bf16, fp16
(within its range) and fp32, so the in-kernel cast loses nothing; NVFP4's fp32 global scale multiplies the fp32
accumulator instead of each weight. bf16 outputs are rounded to nearest-even by bit manipulation, because the
Triton interpreter's ``.to(bfloat16)`` truncates: results are then the same under TRITON_INTERPRET and on the GPU.

Split-K (decode shapes: too few output tiles to fill the GPU): each K-slice writes an fp32 partial tile to a
workspace and bumps a per-tile counter; the slice that arrives last sums the partials in slice order (so the result
is deterministic), writes the output and resets the counter to zero for the next call. The counters are one
workspace per device, so split-K launches on one device must not run concurrently on several streams.

On CUDA the tile shape and split are autotuned per (M bucket, N, K, format, block, output dtype, scale path): every
key component is a static property of the call's shapes, so a repeated call never re-tunes; after the first tuning of a
key the launcher keeps the chosen config itself and launches the kernel directly. Under the interpreter a fixed
large-tile configuration keeps the number of (slow) interpreted programs small.

The per-call path never synchronises with the device: everything data-dependent (the largest E8M0 scale code, which
picks MXFP4's one-multiply scale path) is computed once by whoever keeps the weight (`max_scale_code`, cached by
`PackedLinear` when it is built or loaded) and passed in as a Python int. Without it the kernel takes the general
scale path, which gives the same bits, so a sync is never needed for correctness.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ptq.errors import QuantSpecError
from ptq.formats import QuantSpec

FMT_MXFP4, FMT_NVFP4, FMT_MXINT4, FMT_MXINT8 = 0, 1, 2, 3
MAX_SPLIT_K = 8
SPLIT_K_MAX_M = 64  # split-K only for small M: the fp32 workspace is SPLIT_K x M x N
SMALL_SCALE_MAX_CODE = 128  # E8M0 code of 2^1: up to it MXFP4's 2^126 folds into the block scale


def _cdiv(a: int, b: int) -> int:
    # host-side helpers in plain Python: triton.cdiv / next_power_of_2 are constexpr-function objects whose call
    # costs microseconds, and the launcher runs on every decode step
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def weight_format(spec: QuantSpec) -> int | None:
    """The kernel's format id for a weight spec, or None when the kernel cannot run it."""
    if spec.axis not in (-1, 1) or spec.block_size not in (16, 32, 64, 128):
        return None
    if spec.family == "nvfp4":
        return FMT_NVFP4
    if spec.family == "mxfp" and (spec.exp_bits, spec.man_bits) == (2, 1):
        return FMT_MXFP4
    if spec.family == "mxint" and spec.width == 4:
        return FMT_MXINT4
    if spec.family == "mxint" and spec.width == 8:
        return FMT_MXINT8
    return None


def is_packed_nibbles(fmt: int) -> bool:
    return fmt != FMT_MXINT8


# ---- kernel -----------------------------------------------------------------------------------------------------
@triton.jit
def _decode_scale(s, FMT: tl.constexpr):
    """uint8 scale codes -> fp32: E4M3 bits (NVFP4) or E8M0 (2^(s-127), 0 -> 2^-127, 255 -> NaN)."""
    s = s.to(tl.int32)
    if FMT == 1:
        e = (s >> 3) & 15
        m = s & 7
        normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
        return tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)
    else:
        bits = tl.where(s == 0, 0x00400000, s << 23)
        bits = tl.where(s == 255, 0x7FC00000, bits)
        return bits.to(tl.float32, bitcast=True)


@triton.jit
def _decode_bytes(p, FMT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Loaded code bytes (int32) -> fp32 element values, up to a per-format constant folded into the block scale
    (see `_scale_factor`). Written for few instructions per element: the decode, not the memory, bounds the kernel
    at decode shapes unless it stays at a handful of integer ops.

    E2M1: the magnitude bits (e e m) go to fp32 bits 24..22 and the sign to bit 31, which reads as the element value
    times 2^-126 for every code, the subnormal 0.5 included (exponent field e, mantissa bit m); the 2^126 is folded
    into the block scale (see `_accumulate_chunk`). MXINT4: sign-extend the nibble with two shifts (value m, the 1/4
    is in the scale).
    """
    # (one return at the end: the compiler traces every branch of a constexpr `if` that returns early)
    if FMT == 3:
        vals = p.to(tl.float32)  # int8 codes, already sign-extended
    elif FMT == 2:
        lo = ((p << 28) >> 28).to(tl.float32)
        hi = ((p << 24) >> 28).to(tl.float32)
        vals = tl.reshape(tl.join(lo, hi), (BN, BK))  # element 2i = low nibble of byte i
    else:
        lo = (((p << 22) & 0x01C00000) | ((p << 28) & -2147483648)).to(tl.float32, bitcast=True)
        hi = (((p << 18) & 0x01C00000) | ((p << 24) & -2147483648)).to(tl.float32, bitcast=True)
        vals = tl.reshape(tl.join(lo, hi), (BN, BK))
    return vals


@triton.jit
def _scale_factor(FMT: tl.constexpr):
    """The constant `_decode_bytes` leaves out: MXINT4 elements are m / 4, MXINT8 m / 64."""
    if FMT == 2:
        return 0.25
    elif FMT == 3:
        return 0.015625
    else:
        return 1.0


@triton.jit
def _store_tile(y_ptr, acc, offs_m, offs_n, M, N, stride_ym, OUT_BF16: tl.constexpr):
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    _store_values(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc, mask, OUT_BF16)


@triton.jit
def _store_values(ptrs, acc, mask, OUT_BF16: tl.constexpr):
    if OUT_BF16:
        # fp32 -> bf16 round-to-nearest-even on the bits (exact on the GPU and under the interpreter)
        b = acc.to(tl.uint32, bitcast=True)
        r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        tl.store(ptrs, r.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    else:
        tl.store(ptrs, acc, mask=mask)


@triton.jit
def _split_k_reduce(acc, part_ptr, cnt_ptr, tile, offs, mask, pid_k, MN, SPLIT_K: tl.constexpr):
    """Split-K: write this slice's fp32 partial tile (``offs``: element offsets in one [M, N] slice) and bump the
    tile's counter; the slice that arrives last sums every partial in slice order (deterministic), resets the
    counter for the next call and gets ``(True, total)``; the others get ``(False, zeros)``."""
    tl.store(part_ptr + pid_k * MN + offs, acc, mask=mask)
    tl.debug_barrier()  # every thread's partial is written before the counter says so
    arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
    last = arrived == SPLIT_K - 1
    total = tl.zeros_like(acc)
    if last:
        for s_idx in range(SPLIT_K):  # fixed order: deterministic sum
            total += tl.load(part_ptr + s_idx * MN + offs, mask=mask, other=0.0, cache_modifier=".cg")
        tl.atomic_xchg(cnt_ptr + tile, 0)
    return last, total


@triton.jit
def _accumulate_chunk(acc, c, x_ptr, w_ptr, s_ptr, offs_m, offs_n, m_mask, n_mask, K, KP, stride_xm, stride_wn,
                      stride_sn, FMT: tl.constexpr, BLOCK: tl.constexpr, DOT_FP32: tl.constexpr,
                      SMALL_SCALES: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """acc += x[:, chunk c] @ dequant(W[:, chunk c])^T for one BK-wide chunk of the reduction axis."""
    offs_k = c * BK + tl.arange(0, BK)
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0)
    if FMT == 3:
        p = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
                    mask=n_mask[:, None] & (offs_k < KP)[None, :], other=0).to(tl.int32)
    else:
        offs_b = c * (BK // 2) + tl.arange(0, BK // 2)
        p = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_b[None, :],
                    mask=n_mask[:, None] & (offs_b < KP // 2)[None, :], other=0).to(tl.int32)
    offs_s = c * (BK // BLOCK) + tl.arange(0, BK // BLOCK)
    s = tl.load(s_ptr + offs_n[:, None] * stride_sn + offs_s[None, :],
                mask=n_mask[:, None] & (offs_s < KP // BLOCK)[None, :], other=127)
    vals = tl.reshape(_decode_bytes(p, FMT, BN, BK), (BN, BK // BLOCK, BLOCK))
    if FMT == 0:
        # E2M1 elements arrive as value * 2^-126: the block scale 2^(s-127) times 2^126 is 2^(s-1), an fp32 power
        # of two while every s <= 128 (scales <= 2: LLM weights); otherwise two exact multiplies per element
        if SMALL_SCALES:
            scale = (((s.to(tl.int32) + 126) << 23)).to(tl.float32, bitcast=True)
            w = tl.reshape(vals * scale[:, :, None], (BN, BK))
        else:
            scale = _decode_scale(s, FMT)
            w = tl.reshape((vals * 8.507059173023462e37) * scale[:, :, None], (BN, BK))
    elif FMT == 1:
        # NVFP4: E4M3 scale (<= 448) times 2^117 stays finite; the remaining 2^9 multiplies the global scale
        scale = _decode_scale(s, FMT) * 1.6615349947311448e35
        w = tl.reshape(vals * scale[:, :, None], (BN, BK))
    else:
        scale = _decode_scale(s, FMT) * _scale_factor(FMT)  # exact: powers of two, E8M0 has room below 2^-127
        w = tl.reshape(vals * scale[:, :, None], (BN, BK))
    if DOT_FP32:
        acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
    else:
        acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    return acc


@triton.jit
def _packed_matmul_kernel(
    x_ptr, w_ptr, s_ptr, g_ptr, y_ptr, part_ptr, cnt_ptr,
    M, N, K, KP, stride_xm, stride_wn, stride_sn, stride_ym,
    M_BUCKET,  # autotuning key only
    KP_CONST: tl.constexpr, FMT: tl.constexpr, BLOCK: tl.constexpr, OUT_BF16: tl.constexpr,
    DOT_FP32: tl.constexpr, SMALL_SCALES: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_mn = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_n = tl.cdiv(N, BN)
    pid_m = pid_mn // num_n
    pid_n = pid_mn % num_n
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    m_mask = offs_m < M
    n_mask = offs_n < N

    # Each K-slice takes per_split chunks of BK; the last may run past K, where loads are masked to zero.
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if KP_CONST > 0:
        # interpreter: a compile-time loop bound (it cannot iterate over a runtime scalar with numpy >= 2)
        per_split_c: tl.constexpr = ((KP_CONST + BK - 1) // BK + SPLIT_K - 1) // SPLIT_K
        for j in range(per_split_c):
            acc = _accumulate_chunk(acc, pid_k * per_split_c + j, x_ptr, w_ptr, s_ptr, offs_m, offs_n, m_mask,
                                    n_mask, K, KP, stride_xm, stride_wn, stride_sn, FMT, BLOCK, DOT_FP32,
                                    SMALL_SCALES, BN, BK)
    else:
        # GPU: a runtime bound, so one compiled kernel serves every in_features
        per_split = tl.cdiv(tl.cdiv(KP, BK), SPLIT_K)
        for j in range(0, per_split):
            acc = _accumulate_chunk(acc, pid_k * per_split + j, x_ptr, w_ptr, s_ptr, offs_m, offs_n, m_mask,
                                    n_mask, K, KP, stride_xm, stride_wn, stride_sn, FMT, BLOCK, DOT_FP32,
                                    SMALL_SCALES, BN, BK)
    if FMT == 1:
        acc = acc * (tl.load(g_ptr) * 512.0)  # the 2^9 left out of the block scales (exact power-of-two shifts)

    if SPLIT_K == 1:
        _store_tile(y_ptr, acc, offs_m, offs_n, M, N, stride_ym, OUT_BF16)
    else:
        tile_mask = m_mask[:, None] & n_mask[None, :]
        last, total = _split_k_reduce(acc, part_ptr, cnt_ptr, pid_mn, offs_m[:, None] * N + offs_n[None, :],
                                      tile_mask, pid_k, M * N, SPLIT_K)
        if last:
            _store_tile(y_ptr, total, offs_m, offs_n, M, N, stride_ym, OUT_BF16)


# ---- decode-shape kernel (M <= 16): weight streaming ---------------------------------------------------------------
# The tile kernel above feeds ``tl.dot(x, tl.trans(w))`` with a [BN, BK] weight decoded from single bytes and joined
# nibble pairs: the join / transpose of the big operand costs register shuffles or a shared-memory round trip per
# element. This kernel instead loads the codes as int32 words (8 nibbles, or 4 int8 codes) and never interleaves
# them: nibble j of word c is element 8c + j, so the 8 nibble positions give 8 [BN, BKW] tiles whose reduction
# indices are the K indices = j (mod 8) of the chunk. Summing over K in that permuted order changes nothing but the
# fp32 accumulation order, and every step stays elementwise on [BN, NB, WPB] tensors (NB blocks of WPB words), so
# the compiler decodes directly in the register layout the dot wants (checked in the sm_90 TTGIR: the pipelined
# int32 codes are read from shared memory straight into the wgmma A-operand layout; no decoded value goes through
# shared memory). The block scale is one [BN, NB] load broadcast along the words of its block; the activations of
# a chunk are one contiguous load split into the per-position tiles by register renaming.
#
# Two reductions (MODE):
#   0 dot: ``acc[BN, 16] = sum_j tl.dot(w_j[BN, BKW], x_j[BKW, 16])``: the decoded weight is the A operand in its
#     natural K-contiguous layout, the activation (M padded to 16) the small B operand; stored transposed.
#   1 fma (M == 1 only): ``acc[BN, BKW] += w_j * x_j[None, :]`` elementwise, one cross-thread sum at the end.
# Split-K: as in the tile kernel (fp32 partials, last-arriving slice sums them in slice order: deterministic).
@triton.jit
def _decode_word(p, J: tl.constexpr, FMT: tl.constexpr):
    """Element J of each int32 word (nibble J of 8, or byte J of 4) -> fp32, in the units `_word_scale` expects:
    E2M1 value * 2^-126 (as `_decode_bytes`), MXINT4 / MXINT8 the integer code m plus 2^23 (exactly removed by
    `_apply_scale`). Three integer-pipe operations per element:

    E2M1: shift the nibble's sign to bit 31, then an arithmetic shift right by 6 copies it down to bit 25 and puts
    the magnitude bits (e e m) at 24..22; one mask keeps the sign and the magnitude. MXINT: the code xor its sign
    bit, or'ed into the mantissa of 2^23 (one LOP3), reads as 2^23 + 8 + m (nibble) / 2^23 + 128 + m (byte).
    """
    if FMT == 3:
        v = ((((p >> (8 * J)) & 0xFF) ^ 0x80) | 0x4B000000).to(tl.float32, bitcast=True)
    elif FMT == 2:
        v = ((((p >> (4 * J)) & 0xF) ^ 0x8) | 0x4B000000).to(tl.float32, bitcast=True)
    else:
        if J == 7:
            t = p
        else:
            t = p << (28 - 4 * J)
        v = ((t >> 6) & -2118123520).to(tl.float32, bitcast=True)  # mask 0x81C00000: sign, e e m
    return v


@triton.jit
def _word_scale(s, FMT: tl.constexpr, SMALL_SCALES: tl.constexpr):
    """uint8 scale codes -> the fp32 factor that turns `_decode_word` values into weights (NVFP4: up to the 2^-9
    that multiplies the global scale, as in `_accumulate_chunk`)."""
    if FMT == 0:
        if SMALL_SCALES:
            f = ((s.to(tl.int32) + 126) << 23).to(tl.float32, bitcast=True)
        else:
            f = _decode_scale(s, FMT)
    elif FMT == 1:
        f = _decode_scale(s, FMT) * 1.6615349947311448e35
    else:
        f = _decode_scale(s, FMT) * _scale_factor(FMT)
    return f


@triton.jit
def _apply_scale(v, f, FMT: tl.constexpr, SMALL_SCALES: tl.constexpr):
    """`_decode_word` values times the `_word_scale` factor: the exact weight (NVFP4: times 2^-9)."""
    if FMT == 0 and not SMALL_SCALES:
        w = (v * 8.507059173023462e37) * f  # 2^126 first: both products exact (see `_accumulate_chunk`)
    elif FMT == 2:
        w = (v - 8388616.0) * f  # 2^23 + 8 + m - (2^23 + 8) = m: exact
    elif FMT == 3:
        w = (v - 8388736.0) * f  # 2^23 + 128 + m - (2^23 + 128)
    else:
        w = v * f
    return w


@triton.jit
def _split_even_odd(x, LAST: tl.constexpr):
    """x[..., LAST] -> (x[..., 0::2], x[..., 1::2]); the last axis is held within each thread, so this only renames
    registers. A size-2 result axis is dropped (its two halves are the two elements)."""
    if LAST == 2:
        a, b = tl.split(x)
    else:
        if len(x.shape) == 3:
            a, b = tl.split(tl.reshape(x, (x.shape[0], x.shape[1], LAST // 2, 2)))
        else:
            a, b = tl.split(tl.reshape(x, (x.shape[0], x.shape[1], x.shape[2], LAST // 2, 2)))
    return a, b


@triton.jit
def _word_step(acc, p, f, xj, J: tl.constexpr, FMT: tl.constexpr, DOT_FP32: tl.constexpr,
               SMALL_SCALES: tl.constexpr, MODE: tl.constexpr, BN: tl.constexpr, BKW: tl.constexpr):
    """acc += products of element J of every word (codes p [BN, NB, WPB], factors f [BN, NB, 1]) with the matching
    activations xj ([BKW, 16] for the dot, [NB, WPB] for the FMA reduction)."""
    w = _apply_scale(_decode_word(p, J, FMT), f, FMT, SMALL_SCALES)  # [BN, NB, WPB]
    if MODE == 0:
        w2 = tl.reshape(w, (BN, BKW))
        if DOT_FP32:
            acc += tl.dot(w2, xj.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(w2.to(xj.dtype), xj)
    else:
        acc += w * xj.to(tl.float32)[None, :, :]
    return acc


@triton.jit
def _decode_chunk(acc, c, x_ptr, w_ptr, s_ptr, offs_m, offs_n, m_mask, n_mask, K, KB, stride_xm, stride_wn,
                  stride_sn, FMT: tl.constexpr, BLOCK: tl.constexpr, DOT_FP32: tl.constexpr,
                  SMALL_SCALES: tl.constexpr, MODE: tl.constexpr, BN: tl.constexpr, BKW: tl.constexpr):
    """acc += the products of one chunk of BKW words (BKW * EPW reduction indices) of every row in the tile.

    The codes are loaded as a [BN, NB, WPB] tile (NB whole blocks of WPB words) and the scales as [BN, NB]: the
    scale then broadcasts along the last axis, the one each thread holds contiguously, so the codes and the
    scales keep one register layout and no decoded value moves between threads. The activations of the chunk are
    one contiguous load with the element-in-word index as the last axis, split into the EPW per-position tiles
    by register renaming."""
    EPW: tl.constexpr = 4 if FMT == 3 else 8  # elements per int32 word
    WPB: tl.constexpr = BLOCK // EPW  # words per scale block
    NB: tl.constexpr = BKW // WPB  # blocks per chunk
    offs_b = c * NB + tl.arange(0, NB)
    b_ok = offs_b < KB
    offs_w = offs_b[:, None] * WPB + tl.arange(0, WPB)[None, :]  # [NB, WPB] word index
    p = tl.load(w_ptr + offs_n[:, None, None] * stride_wn + offs_w[None, :, :],
                mask=n_mask[:, None, None] & b_ok[None, :, None], other=0)
    s = tl.load(s_ptr + offs_n[:, None] * stride_sn + offs_b[None, :], mask=n_mask[:, None] & b_ok[None, :],
                other=127)
    f = _word_scale(s, FMT, SMALL_SCALES)[:, :, None]
    offs_e = tl.arange(0, EPW)
    if MODE == 0:
        offs_k = tl.reshape(offs_w, (BKW,))[:, None, None] * EPW + offs_e[None, None, :]  # [BKW, 1, EPW]
        xa = tl.load(x_ptr + offs_m[None, :, None] * stride_xm + offs_k,
                     mask=(offs_k < K) & m_mask[None, :, None], other=0.0)  # [BKW, 16, EPW]
    else:
        offs_k = offs_w[:, :, None] * EPW + offs_e[None, None, :]  # [NB, WPB, EPW]
        xa = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0)
    x_e, x_o = _split_even_odd(xa, EPW)  # j = 0 2 4 6 / 1 3 5 7 (or 0 2 / 1 3)
    if EPW == 8:
        x_04, x_26 = _split_even_odd(x_e, 4)
        x_15, x_37 = _split_even_odd(x_o, 4)
        x0, x4 = _split_even_odd(x_04, 2)
        x2, x6 = _split_even_odd(x_26, 2)
        x1, x5 = _split_even_odd(x_15, 2)
        x3, x7 = _split_even_odd(x_37, 2)
        acc = _word_step(acc, p, f, x0, 0, FMT, DOT_FP32, SMALL_SCALES, MODE, BN, BKW)
        acc = _word_step(acc, p, f, x1, 1, FMT, DOT_FP32, SMALL_SCALES, MODE, BN, BKW)
        acc = _word_step(acc, p, f, x2, 2, FMT, DOT_FP32, SMALL_SCALES, MODE, BN, BKW)
        acc = _word_step(acc, p, f, x3, 3, FMT, DOT_FP32, SMALL_SCALES, MODE, BN, BKW)
        acc = _word_step(acc, p, f, x4, 4, FMT, DOT_FP32, SMALL_SCALES, MODE, BN, BKW)
        acc = _word_step(acc, p, f, x5, 5, FMT, DOT_FP32, SMALL_SCALES, MODE, BN, BKW)
        acc = _word_step(acc, p, f, x6, 6, FMT, DOT_FP32, SMALL_SCALES, MODE, BN, BKW)
        acc = _word_step(acc, p, f, x7, 7, FMT, DOT_FP32, SMALL_SCALES, MODE, BN, BKW)
    else:
        x0, x2 = _split_even_odd(x_e, 2)
        x1, x3 = _split_even_odd(x_o, 2)
        acc = _word_step(acc, p, f, x0, 0, FMT, DOT_FP32, SMALL_SCALES, MODE, BN, BKW)
        acc = _word_step(acc, p, f, x1, 1, FMT, DOT_FP32, SMALL_SCALES, MODE, BN, BKW)
        acc = _word_step(acc, p, f, x2, 2, FMT, DOT_FP32, SMALL_SCALES, MODE, BN, BKW)
        acc = _word_step(acc, p, f, x3, 3, FMT, DOT_FP32, SMALL_SCALES, MODE, BN, BKW)
    return acc


@triton.jit
def _packed_decode_kernel(
    x_ptr, w_ptr, s_ptr, g_ptr, y_ptr, part_ptr, cnt_ptr,
    M, N, K, KB, stride_xm, stride_wn, stride_sn, stride_ym,
    M_BUCKET,  # autotuning key only
    KB_CONST: tl.constexpr, FMT: tl.constexpr, BLOCK: tl.constexpr, OUT_BF16: tl.constexpr,
    DOT_FP32: tl.constexpr, SMALL_SCALES: tl.constexpr,
    MODE: tl.constexpr, BN: tl.constexpr, BKW: tl.constexpr, SPLIT_K: tl.constexpr,
):
    MP: tl.constexpr = 16 if MODE == 0 else 1  # output rows per program (M padded)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_m = tl.arange(0, MP)
    n_mask = offs_n < N
    m_mask = offs_m < M
    EPW: tl.constexpr = 4 if FMT == 3 else 8
    if MODE == 0:
        acc = tl.zeros((BN, MP), dtype=tl.float32)
    else:
        acc = tl.zeros((BN, BKW // (BLOCK // EPW), BLOCK // EPW), dtype=tl.float32)
    NB: tl.constexpr = BKW // (BLOCK // EPW)  # scale blocks per chunk
    if KB_CONST > 0:  # interpreter: compile-time loop bound (see the tile kernel)
        per_split_c: tl.constexpr = ((KB_CONST + NB - 1) // NB + SPLIT_K - 1) // SPLIT_K
        for i in range(per_split_c):
            acc = _decode_chunk(acc, pid_k * per_split_c + i, x_ptr, w_ptr, s_ptr, offs_m, offs_n, m_mask, n_mask,
                                K, KB, stride_xm, stride_wn, stride_sn, FMT, BLOCK, DOT_FP32, SMALL_SCALES, MODE, BN,
                                BKW)
    else:
        per_split = tl.cdiv(tl.cdiv(KB, NB), SPLIT_K)
        for i in range(0, per_split):
            acc = _decode_chunk(acc, pid_k * per_split + i, x_ptr, w_ptr, s_ptr, offs_m, offs_n, m_mask, n_mask,
                                K, KB, stride_xm, stride_wn, stride_sn, FMT, BLOCK, DOT_FP32, SMALL_SCALES, MODE, BN,
                                BKW)
    if MODE == 0:
        out = acc
    else:
        out = tl.reshape(tl.sum(tl.sum(acc, axis=2), axis=1), (BN, MP))
    if FMT == 1:
        out = out * (tl.load(g_ptr) * 512.0)
    tile_mask = n_mask[:, None] & m_mask[None, :]
    if SPLIT_K == 1:
        _store_tile_t(y_ptr, out, offs_m, offs_n, tile_mask, stride_ym, OUT_BF16)
    else:
        last, total = _split_k_reduce(out, part_ptr, cnt_ptr, pid_n, offs_m[None, :] * N + offs_n[:, None],
                                      tile_mask, pid_k, M * N, SPLIT_K)
        if last:
            _store_tile_t(y_ptr, total, offs_m, offs_n, tile_mask, stride_ym, OUT_BF16)


@triton.jit
def _store_tile_t(y_ptr, acc, offs_m, offs_n, mask, stride_ym, OUT_BF16: tl.constexpr):
    """Store an [BN, MP] (transposed) accumulator tile into the row-major [M, N] output."""
    _store_values(y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None], acc, mask, OUT_BF16)


# ---- configurations -----------------------------------------------------------------------------------------------
def _cfg(bm, bn, bk, split, warps=4, stages=3):
    return triton.Config({"BM": bm, "BN": bn, "BK": bk, "SPLIT_K": split}, num_warps=warps, num_stages=stages)


_GPU_CONFIGS = {
    # decode: memory bound; enough CTAs (small BN, split-K) that every SM streams weight bytes
    16: [_cfg(16, bn, bk, sk, 4, st) for bn, bk, sk, st in (
        (32, 256, 1, 4), (64, 256, 1, 3), (32, 256, 2, 4), (64, 256, 4, 3), (32, 512, 4, 3), (64, 128, 8, 4),
        (32, 64, 4, 4), (32, 128, 2, 4))],
    64: [_cfg(bm, bn, bk, sk, 4, 3) for bm, bn, bk, sk in (
        (32, 64, 128, 1), (64, 64, 128, 2), (64, 128, 128, 1), (32, 128, 256, 2))],
    2**31: [_cfg(bm, bn, bk, 1, w, st) for bm, bn, bk, w, st in (
        (64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 128, 8, 3))],
}


def _bucket(m: int) -> int:
    for b in _GPU_CONFIGS:
        if m <= b:
            return b
    return 2**31


def _prune(configs, named_args, **kwargs):
    kp = named_args["KP"]
    block = kwargs["BLOCK"]
    out = []
    for c in _GPU_CONFIGS[named_args["M_BUCKET"]]:
        bk = c.kwargs["BK"]
        if bk % block or (bk > kp and bk > 64):
            continue
        if c.kwargs["SPLIT_K"] > 1 and _cdiv(kp, bk) < 2 * c.kwargs["SPLIT_K"]:
            continue
        out.append(c)
    return out or [_cfg(16, 32, max(64, block), 1)]


_autotuned = None


def _tuned_kernel():
    global _autotuned  # built once, on the first CUDA call (the interpreter never autotunes)
    if _autotuned is None:
        all_cfgs = [c for cs in _GPU_CONFIGS.values() for c in cs]
        _autotuned = triton.autotune(
            configs=all_cfgs, key=["M_BUCKET", "N", "K", "FMT", "BLOCK", "OUT_BF16", "SMALL_SCALES"],
            prune_configs_by={"early_config_prune": _prune},
            do_bench=lambda fn, quantiles: triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles),
        )(_packed_matmul_kernel)
    return _autotuned


def _interpreter_config(m: int, n: int, kp: int, block: int) -> dict:
    """Few, large programs: each interpreted program instance costs ~10-20 ms."""
    bm = max(16, min(64, _next_pow2(m)))
    bn = max(16, min(128, _next_pow2(n)))
    bk = max(block, min(256, _next_pow2(kp)))
    return {"BM": bm, "BN": bn, "BK": bk, "SPLIT_K": 1}


# ---- decode-path configurations --------------------------------------------------------------------------------------
DECODE_MAX_M = 16  # the decode kernel pads M to 16 (dot) or takes M == 1 (FMA); larger M: the tile kernel


def _dcfg(mode, bn, bkw, split, warps=4, stages=3):
    return triton.Config({"MODE": mode, "BN": bn, "BKW": bkw, "SPLIT_K": split}, num_warps=warps,
                         num_stages=stages)


# Weight streaming wants roughly 1-8 CTAs per SM (132 on an H100) with several loads in flight each: small BN and
# split-K for N = 1024..4096, larger BN for N = 14336. The space is wide on purpose (pruned by shape below) so that
# one autotuning run per shape picks the tile, the split and, at M = 1, the reduction (tensor-core dot vs FMA), yet
# small enough to compile quickly (configs are shared across shapes: N and K are runtime arguments). BN 64 / 128
# with 4 / 8 warps use Hopper's wgmma, BN 32 the mma.sync path; the dot path's code, scale and activation loads are
# software-pipelined through shared memory (3 stages).
_DOT_CONFIGS = [_dcfg(0, bn, bkw, sk, w, 3) for bn, bkw, w in ((32, 32, 4), (64, 16, 4), (64, 32, 4), (128, 32, 8))
                for sk in (1, 2, 4, 8)]
_FMA_CONFIGS = [_dcfg(1, bn, bkw, sk, 4, 2) for bn, bkw in ((16, 32), (16, 64), (32, 16), (32, 32), (64, 16))
                for sk in (1, 2, 4, 8)]
# BN 16 rows with 32-64 words per chunk were added after a sweep (H100, CUDA graphs, MXFP4, M = 1): best at
# 4096 -> 14336 (28.2 vs 29.9 us) and 4096 -> 1024 (10.3 vs 10.5 us), tied elsewhere; num_stages did not matter
# (the FMA loop's loads are not software-pipelined).
# Measured on the H100 (bench/packed_matmul.py, CUDA graphs): at M = 1 the FMA reduction won every Llama-3-8B shape
# (MXFP4 1.19-1.92x bf16 vs 1.13-1.67x for the tile kernel), while at M = 16 the decode kernel's dot path lost to
# the tile kernel (1.06x vs 1.36x at 4096 x 4096). So "auto" sends only M = 1 here, and M = 1 tunes FMA configs only.
_DECODE_CONFIGS = {1: _FMA_CONFIGS, DECODE_MAX_M: _DOT_CONFIGS}
AUTO_DECODE_MAX_M = 1
DECODE_MIN_CTAS, DECODE_MAX_CTAS = 96, 1600  # pruning window for cdiv(N, BN) * SPLIT_K


def _elems_per_word(fmt: int) -> int:
    return 8 if is_packed_nibbles(fmt) else 4


def _decode_ok(cfg: dict, fmt: int, block: int, kb: int, m: int, tuning: bool = True) -> bool:
    """Whether a decode config can run this shape: whole scale blocks per chunk (a power of two of them), a dot
    reduction of >= 16, M == 1 for the FMA reduction; when tuning also >= 2 chunks per K-slice (fewer only wastes
    CTAs: a slice past K adds zeros)."""
    wpb = block // _elems_per_word(fmt)
    bkw = cfg["BKW"]
    if bkw % wpb or (cfg["MODE"] == 0 and bkw < 16) or (cfg["MODE"] == 1 and m != 1):
        return False
    nb = bkw // wpb
    if nb & (nb - 1):
        return False
    return not tuning or cfg["SPLIT_K"] == 1 or _cdiv(kb, nb) >= 2 * cfg["SPLIT_K"]


def _decode_prune(configs, named_args, **kwargs):
    n, kb, m = named_args["N"], named_args["KB"], named_args["M"]
    fmt, block = kwargs["FMT"], kwargs["BLOCK"]
    ok = [c for c in _DECODE_CONFIGS[named_args["M_BUCKET"]] if _decode_ok(c.kwargs, fmt, block, kb, m)]
    if not ok:  # e.g. BLOCK 128 MXINT8 (32 words per block): one block per chunk
        wpb = block // _elems_per_word(fmt)
        return [_dcfg(0, 64, max(16, wpb), 1)]
    inside = [c for c in ok if DECODE_MIN_CTAS <= _cdiv(n, c.kwargs["BN"]) * c.kwargs["SPLIT_K"] <= DECODE_MAX_CTAS]
    if inside:
        return inside
    most = max(_cdiv(n, c.kwargs["BN"]) * c.kwargs["SPLIT_K"] for c in ok)  # small N: as many CTAs as possible
    return [c for c in ok if _cdiv(n, c.kwargs["BN"]) * c.kwargs["SPLIT_K"] == most]


_decode_autotuned = None


def _tuned_decode_kernel():
    global _decode_autotuned  # built once, on the first CUDA call
    if _decode_autotuned is None:
        all_cfgs = _FMA_CONFIGS + _DOT_CONFIGS
        _decode_autotuned = triton.autotune(
            configs=all_cfgs, key=["M_BUCKET", "N", "K", "FMT", "BLOCK", "OUT_BF16", "SMALL_SCALES"],
            prune_configs_by={"early_config_prune": _decode_prune},
            do_bench=lambda fn, quantiles: triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles),
        )(_packed_decode_kernel)
    return _decode_autotuned


def _decode_interpreter_config(m: int, n: int, kb: int, fmt: int, block: int) -> dict:
    """Few, large programs (each interpreted program costs ~10-20 ms); FMA at M == 1."""
    wpb = block // _elems_per_word(fmt)
    bkw = max(16, wpb, min(64, _next_pow2(kb * wpb)))
    return {"MODE": 1 if m == 1 else 0, "BN": max(16, min(64, _next_pow2(n))), "BKW": bkw, "SPLIT_K": 1}


# ---- workspace ------------------------------------------------------------------------------------------------------
_COUNTERS: dict[torch.device, torch.Tensor] = {}  # per-device split-K tile counters (kept at zero between calls)


def _counters(device: torch.device, n: int) -> torch.Tensor:
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        # grown rarely (sized for M <= SPLIT_K_MAX_M); never on a steady decode loop, so CUDA graphs stay valid
        buf = torch.zeros(max(n, 8192), dtype=torch.int32, device=device)
        _COUNTERS[device] = buf
    return buf


_WORKSPACE: dict[torch.device, torch.Tensor] = {}  # split-K fp32 partials, per device
_RETIRED: list[torch.Tensor] = []  # outgrown workspaces: CUDA graphs captured earlier may still point into them
_PLANS: dict[tuple, tuple] = {}  # per kernel and static call key: (grid, constexprs) of the autotuner's choice


def _workspace(device: torch.device, numel: int) -> torch.Tensor:
    """A persistent fp32 buffer of >= numel elements (no allocation per call). Like the
    counters, it is shared by the split-K launches on one device, which must therefore not run concurrently on
    several streams. Never cached when allocated during a CUDA graph capture (that memory belongs to the graph)."""
    buf = _WORKSPACE.get(device)
    if buf is not None and buf.numel() >= numel:
        return buf
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.empty(numel, dtype=torch.float32, device=device)
    new = torch.empty(max(numel, 1 << 18), dtype=torch.float32, device=device)
    if buf is not None:
        _RETIRED.append(buf)
    _WORKSPACE[device] = new
    return new


def max_scale_code(scales: torch.Tensor) -> int | None:
    """The largest uint8 scale code in ``scales`` as a Python int (0 when empty), for `packed_matmul`'s
    ``max_scale_code``. Synchronises with the device: call it once when the weight is built or loaded, not per call.
    None for tensors without data (meta device)."""
    if scales.is_meta:
        return None
    return int(scales.max()) if scales.numel() else 0


# ---- entry point ----------------------------------------------------------------------------------------------------
def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def supports(spec: QuantSpec, x: torch.Tensor) -> bool:
    """Whether `packed_matmul` can run this weight spec on this input (device, dtype)."""
    if weight_format(spec) is None or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    return x.is_cuda or (x.device.type == "cpu" and interpreter_active())


def packed_matmul(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    spec: QuantSpec,
    out_features: int,
    global_scale: torch.Tensor | None = None,
    config: dict | None = None,
    max_scale_code: int | None = None,
    path: str = "auto",
) -> torch.Tensor:
    """``x @ dequantize(W)^T`` with W given as packed codes and uint8 scale codes, without materialising W.

    Args:
        x: ``[..., K]`` bf16 / fp16 / fp32 (K = in_features; the codes may be zero-padded beyond it).
        codes: uint8 ``[N, KP/2]`` (4-bit formats, element 2i in the low nibble) or int8 ``[N, KP]`` (MXINT8).
        scales: uint8 ``[N, KP/block]``: E8M0 codes, or E4M3 bits for NVFP4.
        spec: the weight's QuantSpec (picks the decoding).
        out_features: N.
        global_scale: NVFP4's fp32 global scale (a 1-element fp32 tensor on x's device).
        max_scale_code: the largest E8M0 code in ``scales`` as a Python int (see `max_scale_code`; callers that keep
            the weight compute it once and cache it). Codes <= 128 let MXFP4 use one multiply per element; None: the
            general two-multiply path (same bits), never a device sync. It must not understate the true maximum.
        config: force a configuration (benchmarks / tests): ``{"BM", "BN", "BK", "SPLIT_K"}`` for the tile kernel,
            ``{"MODE", "BN", "BKW", "SPLIT_K"}`` (plus optional ``num_warps`` / ``num_stages``) for the decode kernel;
            default: autotuned on CUDA, large tiles under the interpreter.
        path: ``"auto"`` (the decode kernel for a single row when the codes can be read as int32 words, else the
            tile kernel), ``"tile"`` or ``"decode"`` (forced, M <= 16; benchmarks / tests).
    Returns:
        ``[..., N]`` in x's dtype.
    """
    fmt = weight_format(spec)
    if fmt is None:
        raise QuantSpecError(f"packed_matmul supports MXFP4, NVFP4, MXINT4 and MXINT8 weights, not {spec}")
    if not supports(spec, x):
        raise QuantSpecError(
            f"packed_matmul cannot run on a {x.dtype} tensor on {x.device} (needs CUDA, or TRITON_INTERPRET=1 on CPU)")
    k = x.shape[-1]
    block = spec.block_size
    kp = scales.shape[-1] * block
    n = out_features
    expect_codes = (n, kp // 2) if is_packed_nibbles(fmt) else (n, kp)
    if tuple(codes.shape) != expect_codes or tuple(scales.shape) != (n, kp // block) or k > kp or kp - k >= block:
        raise QuantSpecError(
            f"packed_matmul: input [..., {k}] does not fit codes {tuple(codes.shape)} / scales {tuple(scales.shape)} "
            f"({spec}, out_features={n}); expected codes {expect_codes}")
    if fmt == FMT_NVFP4 and global_scale is None:
        raise QuantSpecError("packed_matmul: NVFP4 needs its fp32 global scale")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if max(m * x2.stride(0), n * codes.stride(0), m * n * (MAX_SPLIT_K if m <= SPLIT_K_MAX_M else 1)) >= 2**31:
        raise QuantSpecError(f"packed_matmul: {m} x {k} input / {n} outputs exceed the kernel's 32-bit offsets; "
                             f"split the input rows or use the torch backend")
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out.reshape(*lead, n)
    out_bf16 = x.dtype == torch.bfloat16
    y = out.view(torch.int16) if out_bf16 else (out if x.dtype == torch.float32 else
                                                 torch.empty((m, n), dtype=torch.float32, device=x.device))
    g = global_scale if global_scale is not None else scales  # unused pointer for MX formats
    if max_scale_code is not None and not isinstance(max_scale_code, int):
        raise QuantSpecError(f"packed_matmul: max_scale_code must be a Python int (computed once with "
                             f"max_scale_code(scales)), got {type(max_scale_code).__name__}")
    small = fmt == FMT_MXFP4 and max_scale_code is not None and max_scale_code <= SMALL_SCALE_MAX_CODE
    if path not in ("auto", "tile", "decode"):
        raise QuantSpecError(f"packed_matmul: path must be 'auto', 'tile' or 'decode', not {path!r}")
    decode_cfg = config is not None and "BKW" in config
    use_decode = path == "decode" or decode_cfg or (path == "auto" and m <= AUTO_DECODE_MAX_M and config is None
                                                    and _word_readable(codes) and scales.stride(-1) == 1)
    if use_decode:
        if m > DECODE_MAX_M or not _word_readable(codes) or scales.stride(-1) != 1 or (config is not None
                                                                                       and not decode_cfg):
            raise QuantSpecError(f"packed_matmul: the decode path needs M <= {DECODE_MAX_M}, int32-aligned "
                                 f"contiguous code rows and a decode config {{MODE, BN, BKW, SPLIT_K}}")
        _decode_launch(x2, codes, scales, g, y, m, n, k, kp, fmt, block, out_bf16, small, config)
    else:
        _tile_launch(x2, codes, scales, g, y, m, n, k, kp, fmt, block, out_bf16, small, config)
    if y is not out and not out_bf16:
        out.copy_(y)
    return out.reshape(*lead, n)


def _tile_launch(x2, codes, scales, g, y, m, n, k, kp, fmt, block, out_bf16, small, config) -> None:
    """Launch the tile kernel (autotuned per shape on CUDA unless ``config`` is given)."""
    dev = x2.device
    use_split = m <= SPLIT_K_MAX_M
    part = _workspace(dev, MAX_SPLIT_K * m * n if use_split else 1)
    cnt = _counters(dev, _cdiv(SPLIT_K_MAX_M, 16) * _cdiv(n, 16))  # >= tiles of any split launch
    common = dict(KP_CONST=0 if x2.is_cuda else kp, FMT=fmt, BLOCK=block, OUT_BF16=out_bf16,
                  DOT_FP32=x2.dtype == torch.float32 or not x2.is_cuda, SMALL_SCALES=small)
    bucket = _bucket(m)
    args = (x2, codes, scales, g, y, part, cnt, m, n, k, kp, x2.stride(0), codes.stride(0), scales.stride(0),
            y.stride(0), bucket)
    if config is None and x2.is_cuda:
        _launch_autotuned(_packed_matmul_kernel, _tuned_kernel,
                          ("tile", bucket, n, k, fmt, block, out_bf16, small, x2.dtype, dev),
                          lambda meta: (_cdiv(m, meta["BM"]) * _cdiv(n, meta["BN"]), meta["SPLIT_K"]), args, common)
        return
    cfg = dict(config) if config is not None else _interpreter_config(m, n, kp, block)
    if cfg["SPLIT_K"] > MAX_SPLIT_K or (cfg["SPLIT_K"] > 1 and not use_split):
        raise QuantSpecError(f"SPLIT_K must be <= {MAX_SPLIT_K} and needs M <= {SPLIT_K_MAX_M}")
    launch = {k_: v for k_, v in cfg.items() if k_ in ("num_warps", "num_stages")}
    tiles = {k_: cfg[k_] for k_ in ("BM", "BN", "BK", "SPLIT_K")}
    grid = (_cdiv(m, tiles["BM"]) * _cdiv(n, tiles["BN"]), tiles["SPLIT_K"])
    _packed_matmul_kernel[grid](*args, **common, **tiles, **launch)


def _launch_autotuned(kernel, tuned_kernel, key: tuple, grid_of, args: tuple, common: dict) -> None:
    """The autotuner benchmarks the pruned configs on the first call for ``key`` (every component a static
    property of the call's shapes); later calls launch the chosen config directly, without the autotuner's
    per-call argument dicts."""
    plan = _PLANS.get(key)
    if plan is not None:
        kernel[plan[0]](*args, **plan[1])
        return
    tuned = tuned_kernel()
    tuned[grid_of](*args, **common)
    best = tuned.best_config.all_kwargs()
    _PLANS[key] = (grid_of(best), {**common, **best})


def _word_readable(codes: torch.Tensor) -> bool:
    """Whether the code rows can be read as int32 words (contiguous rows, 4-byte aligned)."""
    return (codes.stride(-1) == 1 and codes.stride(0) % 4 == 0 and codes.shape[-1] % 4 == 0
            and codes.storage_offset() % 4 == 0)


def _decode_launch(x2, codes, scales, g, y, m, n, k, kp, fmt, block, out_bf16, small, config) -> None:
    """Launch the decode kernel (autotuned per shape on CUDA unless ``config`` is given). After the first call for a
    static key the chosen grid and constexprs are kept, so later calls skip the autotuner's per-call work."""
    dev = x2.device
    kb = kp // block
    w32 = codes.view(torch.int32)
    bucket = 1 if m == 1 else DECODE_MAX_M
    part = _workspace(dev, MAX_SPLIT_K * m * n)  # persistent: no allocation per call
    cnt = _counters(dev, _cdiv(n, 16))  # >= tiles of any decode launch (BN >= 16)
    args = (x2, w32, scales, g, y, part, cnt, m, n, k, kb, x2.stride(0), w32.stride(0), scales.stride(0),
            y.stride(0), bucket)
    if config is None and x2.is_cuda:
        common = dict(KB_CONST=0, FMT=fmt, BLOCK=block, OUT_BF16=out_bf16, DOT_FP32=x2.dtype == torch.float32,
                      SMALL_SCALES=small)
        _launch_autotuned(_packed_decode_kernel, _tuned_decode_kernel,
                          ("decode", bucket, n, k, kp, fmt, block, out_bf16, small, x2.dtype, dev),
                          lambda meta: (_cdiv(n, meta["BN"]), meta["SPLIT_K"]), args, common)
        return
    cfg = dict(config) if config is not None else _decode_interpreter_config(m, n, kb, fmt, block)
    if (not _decode_ok(cfg, fmt, block, kb, m, tuning=False) or not 1 <= cfg["SPLIT_K"] <= MAX_SPLIT_K
            or cfg["BN"] < 16 or cfg["BN"] & (cfg["BN"] - 1)):
        raise QuantSpecError(f"packed_matmul: decode config {cfg} does not fit this call (BKW a multiple of the "
                             f"{block // _elems_per_word(fmt)} words per block and >= 16 for MODE 0, MODE 1 only "
                             f"at M == 1, BN a power of two >= 16, 1 <= SPLIT_K <= {MAX_SPLIT_K})")
    tiles = {k_: cfg[k_] for k_ in ("MODE", "BN", "BKW", "SPLIT_K")}
    launch = {k_: v for k_, v in cfg.items() if k_ in ("num_warps", "num_stages")}
    common = dict(KB_CONST=0 if x2.is_cuda else kb, FMT=fmt, BLOCK=block, OUT_BF16=out_bf16,
                  DOT_FP32=x2.dtype == torch.float32 or not x2.is_cuda, SMALL_SCALES=small)
    _packed_decode_kernel[(_cdiv(n, tiles["BN"]), tiles["SPLIT_K"])](*args, **common, **tiles, **launch)
