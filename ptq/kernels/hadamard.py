"""Triton Hadamard transform (FWHT) and the fused rotate + fake-quantize kernel of the activation path.

Both follow the exact operation order of the torch reference (``ptq.hadamard``, module docstring): the +-1 mixing
of the known order ``m`` summed left to right, butterfly stages ``h = 1, 2, ..., p/2`` of ``(a + b, a - b)``, one
multiply by the fp32 ``1/sqrt(n)``, then the cast to the input dtype (round to nearest even: on the bits under
``TRITON_INTERPRET=1``, whose cast truncates; by the GPU's own round-to-nearest-even cvt on CUDA). IEEE additions
are deterministic, so the results are bit-identical to the reference. The mixing uses explicit fma(+-1, x, acc):
the product is exact, so its single rounding is the addition's; elsewhere FMA contraction is disabled.

Kernels:
- ``_rotate_kernel``: one program owns ``T`` consecutive rows of the flat ``[rows * m, p]`` view of the output
  (``p <= MAX_TILE``): mixing from global memory (rows four at a time, each input chunk loaded once per four
  outputs), butterflies in registers, scale, dtype rounding and, when ``QUANT``, the MX fake quantization of
  ``ptq.kernels.mx_quant``'s ``fake_quant_tile`` on the same registers before the single store. This is the fused
  activation path. Its speed is instruction-bound (memory needs ~40 instructions per bf16 element on an H100), so
  the formulation is chosen by the SASS it compiles to: see ``TileConfig`` / ``default_config`` (the butterfly
  ``MODE``s, tile size, mixing group; all bit-identical) and ``bench/hadamard.py``, which times them.
- Longer rows (``p > MAX_TILE``): ``_mix_kernel`` (m > 1) then two ``_butterfly_pass_kernel`` passes over fp32
  scratch (stages ``h < L1`` inside contiguous chunks of ``L1``, then the strided stages ``h >= L1`` with the scale),
  then a torch cast; quantization then runs as a separate kernel.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from ptq.errors import PtqError
from ptq.formats import QuantSpec
from ptq.kernels._triton_utils import bf16_bits_to_f32, f32_to_bf16_bits
from ptq.kernels.mx_quant import bf16_exact, fake_quant_tile, format_constants, tile_stats

MAX_TILE = 8192  # elements of one transform row held in registers by one program
_TILE_TARGET = 4096  # elements per program of the unfused long-row passes
# How the fp32 rotation result is rounded to a bf16 value inside ``_rotate_kernel`` (constexpr OUT_KIND):
# native ``.to()`` for fp32 / fp16, round-to-nearest-even on the bit pattern (exact everywhere, ~7 instructions
# per element), or the GPU's cvt.rn.bf16.f32 (the same rounding in ~1 instruction; never under the interpreter,
# whose fp32 -> bf16 cast truncates).
OUT_NATIVE, OUT_BF16_BITS, OUT_BF16_HW = 0, 1, 2
# Butterfly formulations (constexpr MODE), all doing the same additions in the same order (identical bits):
# radix-2 / radix-4 register shuffles (reshape / permute / split / join: the compiler moves data between layouts,
# often through shared memory), or "xor" (partner fetch): each element fetches its partner's bit pattern with a
# 2-element reduction (an in-register op, or one warp shuffle, where the pair lies in a thread or a warp; no layout
# change) for the first XOR_LOG stages, radix-4 for the rest. ``TileConfig`` / ``default_config`` choose.
MODE_RADIX2, MODE_RADIX4, MODE_XOR = 0, 1, 2


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
    first = (tl.arange(0, 2) == 0)[None, :, None]
    # first: v = a, partner = b -> a + b; second: partner = a, v = b -> a - b (both exactly the reference's ops)
    return tl.reshape(tl.where(first, v + partner, partner - v), (T, P))


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
def _round_to_out(y, OUT_KIND: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """fp32 -> output dtype -> fp32 (the value the reference holds after its cast)."""
    if OUT_KIND == 1:
        return (f32_to_bf16_bits(y, False).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    elif OUT_KIND == 2:
        return y.to(tl.bfloat16).to(tl.float32)
    else:
        return y.to(OUT_DTYPE).to(tl.float32)


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
                   ROUNDING: tl.constexpr, SCALE_CEIL: tl.constexpr, MODE: tl.constexpr, XOR_LOG: tl.constexpr,
                   UNROLL: tl.constexpr, G: tl.constexpr, USE_I64: tl.constexpr):
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
        NQB: tl.constexpr = T * P // QB
        if ROUNDING == 3:
            u = tl.reshape(tl.load(noise_ptr + offs, mask=mask, other=0.0), (NQB, QB))
        else:
            u = 0.0
        xb = tl.reshape(x, (NQB, QB))
        ax, amax = tile_stats(xb, True, False)
        xq = fake_quant_tile(xb, ax, amax, u, 1.0, FAMILY, WIDTH, MAN_BITS, EMAX, EMIN, MAX_NORMAL, LEVELS,
                             FRAC_BITS, ROUNDING, SCALE_CEIL, NQB, QB)
        x = tl.reshape(xq, (T, P))
    # STORE_EXACT: x is a value of the output dtype already (the rounded rotation, or an MX grid value that
    # ``mx_quant.bf16_exact`` guarantees is a bf16 number), so dropping the low half is the cast
    if OUT_KIND == 0:
        tl.store(y_ptr + offs, x.to(y_ptr.dtype.element_ty), mask=mask)
    elif STORE_EXACT or OUT_KIND == 1:
        tl.store(y_ptr + offs, f32_to_bf16_bits(x, STORE_EXACT), mask=mask)
    else:
        tl.store(y_ptr + offs, x.to(tl.bfloat16).to(tl.int16, bitcast=True), mask=mask)


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


def _out_kind(x: torch.Tensor) -> int:
    if x.dtype != torch.bfloat16:
        return OUT_NATIVE
    return OUT_BF16_HW if x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1" else OUT_BF16_BITS


def _check(x: torch.Tensor, rot) -> None:
    from ptq.hadamard import check_input

    check_input(x, rot.size)
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise PtqError(f"the Triton Hadamard kernel handles float32 / bfloat16 / float16, not {x.dtype}")


def radix4() -> bool:
    """Butterflies of the unfused long-row passes two stages at a time (default) or one
    (``PTQ_HADAMARD_RADIX=2``, for benchmarking); both do the same additions in the same order."""
    return os.environ.get("PTQ_HADAMARD_RADIX", "4") != "2"


@dataclass(frozen=True)
class TileConfig:
    """How ``_rotate_kernel`` is launched: ``elems`` elements per program (whole transform rows, at least one),
    ``warps``, butterfly ``mode`` (``MODE_*``), ``xor_stages`` (MODE_XOR: how many leading stages fetch their
    partner, the rest run radix-4; -1 = all), ``unroll`` (mixing loop over the m known-order rows unrolled at
    compile time; by default for m <= 64) and ``mix_group`` (4: mixing rows handled four at a time, sharing
    each load of the input; 1: one at a time). All configurations give identical bits; they differ in speed only."""

    elems: int = 4096
    warps: int = 4
    mode: int = MODE_XOR
    xor_stages: int = -1
    unroll: bool = True
    mix_group: int = 4


_VARIANTS = {"r2": (MODE_RADIX2, 0), "r4": (MODE_RADIX4, 0), "xor": (MODE_XOR, -1)}


def _env_config(base: TileConfig) -> TileConfig:
    """``base`` with the benchmarking overrides of the environment applied:
    ``PTQ_HADAMARD_VARIANT`` = r2 | r4 | xor | xorK (K leading partner-fetch stages, then radix-4),
    ``PTQ_HADAMARD_TILE`` = ELEMS,WARPS, ``PTQ_HADAMARD_UNROLL`` = 0 | 1, ``PTQ_HADAMARD_MIXG`` = 1 | 4."""
    env = os.environ
    variant = env.get("PTQ_HADAMARD_VARIANT")
    if env.get("PTQ_HADAMARD_RADIX") == "2" and not variant:
        variant = "r2"
    cfg = base
    if variant:
        if variant in _VARIANTS:
            mode, k = _VARIANTS[variant]
        elif variant.startswith("xor") and variant[3:].isdigit():
            mode, k = MODE_XOR, int(variant[3:])
        else:
            raise PtqError(f"PTQ_HADAMARD_VARIANT={variant!r}: use r2, r4, xor or xorK (K an integer)")
        cfg = replace(cfg, mode=mode, xor_stages=k)
    tile = env.get("PTQ_HADAMARD_TILE")
    if tile:
        try:
            elems, warps = (int(v) for v in tile.split(","))
        except ValueError:
            raise PtqError(f"PTQ_HADAMARD_TILE={tile!r}: use ELEMS,WARPS, e.g. 4096,4") from None
        if elems < 1 or elems & (elems - 1) or warps not in (1, 2, 4, 8, 16, 32):
            raise PtqError(f"PTQ_HADAMARD_TILE={tile!r}: ELEMS must be a power of two, WARPS 1..32 (power of 2)")
        cfg = replace(cfg, elems=elems, warps=warps)
    if env.get("PTQ_HADAMARD_UNROLL") in ("0", "1"):
        cfg = replace(cfg, unroll=env["PTQ_HADAMARD_UNROLL"] == "1")
    if env.get("PTQ_HADAMARD_MIXG") in ("1", "4"):
        cfg = replace(cfg, mix_group=int(env["PTQ_HADAMARD_MIXG"]))
    return cfg


def default_config(rot) -> TileConfig:
    """The launch configuration of ``_rotate_kernel`` for a rotation (before environment overrides).

    Chosen by the SASS the kernel compiles to for sm_90 (triton 3.6, counted offline with ``bench/hadamard.py
    --sass``; per bf16 element, fused with MXINT4): a bf16 tile load gives each thread 8 consecutive elements, so
    the first 3 stages are in registers and partner fetch costs nothing there; the next 5 (lane bits) cost one
    shuffle each, against a trip through shared memory and a barrier per radix-4 pair. Short transforms
    (p <= 256) therefore fetch partners in every stage and need no shared memory at all (~33 instructions per
    element for blocks of 32, ~36 for 64, ~39 for 128; quantize alone: ~22); long ones (p >= 512, e.g. 4096) fetch
    in the first 3 and then go radix-4 (~43; all 12 by partner fetch: ~65, whose cross-warp stages go through
    shared memory one at a time). 4096 elements in 4 warps (~32 per thread) was never clearly worse than 2048 /
    8192 elements or 2 / 8 warps. The m = 36 mixing of 576 costs ~35 fma per element on top (~82 in all).
    ``bench/hadamard.py`` times the alternatives on the GPU. Measured there (H100, 8 x 2048 x dim bf16, MXINT4,
    CUDA-graph GPU time / quantize alone): the instruction count did not predict the winner for short transforms:
    plain radix-2 stages gave 1.00x (block 32) / 1.04x (block 64) at dim 4096 against 1.09x / 1.11x with partner
    fetch in every stage, and tied at 576; for the full 4096 transform, partner fetch in the first 5 stages gave
    1.33x against 1.42x with 3 and 1.61x with none (radix 4). Those winners are the defaults."""
    # ~32 fp32 values per thread: a row of 8192 (one program) in 8 warps (~44 instructions vs ~50 in 4)
    warps = 8 if rot.p > 4096 else 4
    if rot.p <= 256 and rot.m == 1:
        return TileConfig(elems=4096, warps=warps, mode=MODE_RADIX2, xor_stages=0, unroll=True, mix_group=4)
    # p <= 256 after a known-order mixing (576 = 36 x 16): partner fetch throughout measured 4.28x vs 4.48x radix-2
    xor = -1 if rot.p <= 256 else 5
    return TileConfig(elems=4096, warps=warps, mode=MODE_XOR, xor_stages=xor, unroll=rot.m <= 64, mix_group=4)


def tile_meta(rot, spec: QuantSpec | None, cfg: TileConfig, dtype: torch.dtype, gpu: bool,
              pairs: bool = True, rb_min: int = 1) -> tuple[int, dict]:
    """(rows per program ``T``, the constexprs and launch options of ``_rotate_kernel``) for one launch.

    ``gpu``: compiled for a CUDA device (hardware bf16 rounding) rather than interpreted; ``pairs``: the bf16 input
    may be read as int32 pairs (4-byte aligned). Separate from the launch so the exact kernel can also be compiled
    offline for inspection (e.g. ``triton.compile`` for sm_90 on a machine without a GPU)."""
    m, p = rot.m, rot.p
    log_p = _log2(p)
    # whole quantization blocks per program: at least rb_min rows and QB / P rows (a block spanning rows)
    t_min = max(rb_min, (spec.block_size // p) if spec is not None else 1)
    g = 4 if m > 1 and cfg.mix_group == 4 and m % 4 == 0 else 1
    t = max(triton.next_power_of_2(t_min), cfg.elems // p, g)
    bits = dtype == torch.bfloat16
    kind = OUT_NATIVE if not bits else OUT_BF16_HW if gpu else OUT_BF16_BITS
    # bf16 input: int32 pairs where a row has an even length, else int16 patterns (a shift each)
    in_kind = 0 if not bits else 2 if p % 2 == 0 and pairs else 1
    if spec is not None:
        c = format_constants(spec)
        fmt = dict(QUANT=True, QB=spec.block_size, **c.element_kwargs(), STORE_EXACT=bits and bf16_exact(spec))
    else:
        fmt = dict(QUANT=False, QB=1, FAMILY=0, WIDTH=0, MAN_BITS=0, EMAX=0, EMIN=0, MAX_NORMAL=0.0, LEVELS=0,
                   FRAC_BITS=0, ROUNDING=0, SCALE_CEIL=False, STORE_EXACT=bits)
    xor_log = 0 if cfg.mode != MODE_XOR else log_p if cfg.xor_stages < 0 else min(cfg.xor_stages, log_p)
    return t, dict(M=m, P=p, LOG_P=log_p, T=t, IN_KIND=in_kind, OUT_KIND=kind, MODE=cfg.mode, XOR_LOG=xor_log,
                   UNROLL=cfg.unroll, G=g, num_warps=cfg.warps, enable_fp_fusion=False, **fmt)


def _launch_tile(x2: torch.Tensor, rot, inverse: bool, spec: QuantSpec | None, noise: torch.Tensor | None,
                 rb_min: int = 1, config: TileConfig | None = None) -> torch.Tensor:
    """``_rotate_kernel`` over a contiguous [rows, n] view (n = the transform length)."""
    rows = x2.shape[0]
    y2 = torch.empty_like(x2)
    if rows == 0:
        return y2
    cfg = _env_config(config or default_config(rot))
    t, meta = tile_meta(rot, spec, cfg, x2.dtype, _out_kind(x2) == OUT_BF16_HW, x2.data_ptr() % 4 == 0, rb_min)
    in_kind = meta["IN_KIND"]
    x_arg = x2 if in_kind == 0 else x2.view(torch.int32) if in_kind == 2 else x2.view(torch.int16)
    y_arg = y2.view(torch.int16) if x2.dtype == torch.bfloat16 else y2
    n_flat = rows * rot.m
    _rotate_kernel[(triton.cdiv(n_flat, t),)](
        x_arg, _signs(rot, inverse, x2.device), y_arg, noise if noise is not None else x2, n_flat, rot.scale,
        USE_I64=(n_flat + t) * rot.p >= 2**31 - 1, **meta)
    return y2


def _warps(tile_elems: int) -> int:
    return 4 if tile_elems < 4096 else 8 if tile_elems <= 8192 else 16


def _rows_per_program(row_elems: int, at_least: int = 1) -> int:
    return max(at_least, triton.next_power_of_2(max(1, _TILE_TARGET // row_elems)))


def _launch_long(x2: torch.Tensor, rot, inverse: bool) -> torch.Tensor:
    """Transform rows longer than one tile: mixing, then the butterflies in two passes over fp32 scratch."""
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
            MODE=MODE_RADIX4 if radix4() else MODE_RADIX2, num_warps=_warps(rb * L), enable_fp_fusion=False)
    if p == 1:  # no butterflies ran: the single scale multiply happens here
        y = y * rot.scale
    return y.to(x2.dtype)


def _fits_tile(rot) -> bool:
    return rot.p <= MAX_TILE and triton.next_power_of_2(rot.m) * rot.p <= 4 * MAX_TILE


def triton_rotate(x: torch.Tensor, rot, *, inverse: bool = False) -> torch.Tensor:
    """``rot(x)`` (or ``rot.inverse(x)``) with the Triton kernels; bit-identical to the torch reference.

    ``rot``: a ``ptq.modules.rotation.HadamardRotation`` (only ``size``, ``n``, ``m``, ``p``, ``scale`` and the
    ``pm1`` buffer are read)."""
    _check(x, rot)
    x2 = x.contiguous().view(-1, rot.n)
    if _fits_tile(rot):
        y2 = _launch_tile(x2, rot, inverse, None, None)
    else:
        y2 = _launch_long(x2, rot, inverse)
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
                         backend: str | None = None) -> torch.Tensor:
    """``fake_quantize(rotation(x), spec)`` (bit for bit), in one Triton kernel where ``fusable``.

    ``backend``: None/"auto" (Triton on CUDA, else torch), "torch" (the two reference steps), "triton"."""
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
        return fake_quantize(triton_rotate(x, rotation), spec, backend=resolve_backend(x, spec, None), noise=noise)
    noise = resolve_noise(x, spec, noise)  # validates a given noise tensor, draws the default one
    x2 = x.contiguous().view(-1, rotation.n)
    n2 = noise.contiguous().view(-1) if noise is not None else None
    rb_min = max(1, spec.block_size // (rotation.m * rotation.p)) if rotation.m == 1 else 1
    return _launch_tile(x2, rotation, False, spec, n2, rb_min).view(x.shape)


def _torch_rotate(x: torch.Tensor, rot) -> torch.Tensor:
    from ptq.hadamard import rotate_reference

    return rotate_reference(x, rot.size, kind=rot.kind, block_size=rot.block_size)
