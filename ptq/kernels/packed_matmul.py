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
    ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    if OUT_BF16:
        # fp32 -> bf16 round-to-nearest-even on the bits (exact on the GPU and under the interpreter)
        b = acc.to(tl.uint32, bitcast=True)
        r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        tl.store(ptrs, r.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    else:
        tl.store(ptrs, acc, mask=mask)


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
        part = part_ptr + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :]
        tl.store(part, acc, mask=tile_mask)
        tl.debug_barrier()  # every thread's partial is written before the counter says so
        arrived = tl.atomic_add(cnt_ptr + pid_mn, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.zeros((BM, BN), dtype=tl.float32)
            for s_idx in range(SPLIT_K):  # fixed order: deterministic sum
                p_ptrs = part_ptr + (s_idx * M + offs_m[:, None]) * N + offs_n[None, :]
                total += tl.load(p_ptrs, mask=tile_mask, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(cnt_ptr + pid_mn, 0)
            _store_tile(y_ptr, total, offs_m, offs_n, M, N, stride_ym, OUT_BF16)


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


# ---- workspace ------------------------------------------------------------------------------------------------------
_COUNTERS: dict[torch.device, torch.Tensor] = {}  # per-device split-K tile counters (kept at zero between calls)
_BEST: dict[tuple, dict] = {}  # launcher-side copy of the autotuner's choice (launch kwargs) per tuning key


def _counters(device: torch.device, n: int) -> torch.Tensor:
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        # grown rarely (sized for M <= SPLIT_K_MAX_M); never on a steady decode loop, so CUDA graphs stay valid
        buf = torch.zeros(max(n, 8192), dtype=torch.int32, device=device)
        _COUNTERS[device] = buf
    return buf


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
        config: force a tile configuration ``{"BM", "BN", "BK", "SPLIT_K"}`` (benchmarks / tests); default: autotuned
            on CUDA, large tiles under the interpreter.
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
    use_split = m <= SPLIT_K_MAX_M
    # split-K workspace: from the caching allocator (no sync, no zeroing: every slot read is written first), so a
    # CUDA graph capture gets its own; the tile counters are a persistent zeroed buffer the kernel resets itself
    part = torch.empty((MAX_SPLIT_K, m, n) if use_split else (1,), dtype=torch.float32, device=x.device)
    cnt = _counters(x.device, _cdiv(SPLIT_K_MAX_M, 16) * _cdiv(n, 16))  # >= tiles of any split launch
    if max_scale_code is not None and not isinstance(max_scale_code, int):
        raise QuantSpecError(f"packed_matmul: max_scale_code must be a Python int (computed once with "
                             f"max_scale_code(scales)), got {type(max_scale_code).__name__}")
    small = fmt == FMT_MXFP4 and max_scale_code is not None and max_scale_code <= SMALL_SCALE_MAX_CODE
    common = dict(KP_CONST=0 if x.is_cuda else kp, FMT=fmt, BLOCK=block, OUT_BF16=out_bf16,
                  DOT_FP32=x.dtype == torch.float32 or not x.is_cuda, SMALL_SCALES=small)
    bucket = _bucket(m)
    args = (x2, codes, scales, g, y, part, cnt, m, n, k, kp, x2.stride(0), codes.stride(0), scales.stride(0),
            y.stride(0), bucket)
    if config is None and x.is_cuda:
        key = (bucket, n, k, fmt, block, out_bf16, small, x.dtype, x.device)
        best = _BEST.get(key)
        if best is None:  # first call for this key: the autotuner benchmarks the pruned configs once
            grid = lambda meta: (_cdiv(m, meta["BM"]) * _cdiv(n, meta["BN"]), meta["SPLIT_K"])  # noqa: E731
            tuned = _tuned_kernel()
            tuned[grid](*args, **common)
            _BEST[key] = tuned.best_config.all_kwargs()
        else:  # what the autotuner does on a cache hit, minus its per-call argument dicts
            grid = (_cdiv(m, best["BM"]) * _cdiv(n, best["BN"]), best["SPLIT_K"])
            _packed_matmul_kernel[grid](*args, **common, **best)
    else:
        cfg = dict(config) if config is not None else _interpreter_config(m, n, kp, block)
        if cfg["SPLIT_K"] > MAX_SPLIT_K or (cfg["SPLIT_K"] > 1 and not use_split):
            raise QuantSpecError(f"SPLIT_K must be <= {MAX_SPLIT_K} and needs M <= {SPLIT_K_MAX_M}")
        launch = {k_: v for k_, v in cfg.items() if k_ in ("num_warps", "num_stages")}
        tiles = {k_: cfg[k_] for k_ in ("BM", "BN", "BK", "SPLIT_K")}
        grid = (_cdiv(m, tiles["BM"]) * _cdiv(n, tiles["BN"]), tiles["SPLIT_K"])
        _packed_matmul_kernel[grid](*args, **common, **tiles, **launch)
    if y is not out and not out_bf16:
        out.copy_(y)
    return out.reshape(*lead, n)
