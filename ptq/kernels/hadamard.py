"""Triton Hadamard transform (FWHT) and the fused rotate + fake-quantize kernel of the activation path.

Both follow the exact operation order of the torch reference (``ptq.hadamard``, module docstring): the +-1 mixing
of the known order ``m`` summed left to right, butterfly stages ``h = 1, 2, ..., p/2`` of ``(a + b, a - b)``, one
multiply by the fp32 ``1/sqrt(n)``, then the cast to the input dtype (round to nearest even, done on the bits so it
is exact under ``TRITON_INTERPRET=1`` too). IEEE additions are deterministic, so the results are bit-identical to
the reference (products by +-1 are exact, so FMA contraction cannot change them either; it is disabled anyway).

Kernels:
- ``_rotate_kernel``: one program owns ``RB`` whole transform rows (``n = m * p <= MAX_TILE`` elements each) as
  a ``[RB * m_pad, p]`` register tile: mixing from global memory, butterflies in registers (reshape / split /
  join), scale, dtype rounding and, when ``QUANT``, the MX fake quantization of ``ptq.kernels.mx_quant``'s
  ``fake_quant_tile`` on the same registers before the single store. This is the fused activation path.
- Longer rows (``p > MAX_TILE``): ``_mix_kernel`` (m > 1) then two ``_butterfly_pass_kernel`` passes over fp32
  scratch (stages ``h < L1`` inside contiguous chunks of ``L1``, then the strided stages ``h >= L1`` with the scale),
  then a torch cast; quantization then runs as a separate kernel.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ptq.errors import PtqError
from ptq.formats import QuantSpec
from ptq.kernels._triton_utils import f32_to_bf16_bits
from ptq.kernels.mx_quant import fake_quant_tile, format_constants, tile_stats

MAX_TILE = 8192  # elements of one transform row held in registers by one program
_TILE_TARGET = 4096  # elements per program (rows are batched up to this)
OUT_NATIVE, OUT_BF16_BITS = 0, 1


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
def _butterflies(x, T: tl.constexpr, P: tl.constexpr, LOG_P: tl.constexpr, RADIX4: tl.constexpr):
    """Stages h = 1, 2, ..., P/2 of (a + b, a - b) along the last dim of the [T, P] tile ``x``."""
    if RADIX4:
        for s in tl.static_range(LOG_P // 2):
            x = _stage4(x, T, P, 1 << (2 * s))
        if LOG_P % 2 == 1:
            x = _stage2(x, T, P, 1 << (LOG_P - 1))
    else:
        for s in tl.static_range(LOG_P):
            x = _stage2(x, T, P, 1 << s)
    return x


@triton.jit
def _round_to_out(y, OUT_KIND: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """fp32 -> output dtype -> fp32 (the value the reference holds after its cast)."""
    if OUT_KIND == 1:
        return (f32_to_bf16_bits(y, False).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        return y.to(OUT_DTYPE).to(tl.float32)


@triton.jit
def _rotate_kernel(x_ptr, s_ptr, y_ptr, noise_ptr, n_rows, scale,
                   M: tl.constexpr, MP2: tl.constexpr, P: tl.constexpr, LOG_P: tl.constexpr, RB: tl.constexpr,
                   OUT_KIND: tl.constexpr, QUANT: tl.constexpr, QB: tl.constexpr,
                   FAMILY: tl.constexpr, WIDTH: tl.constexpr, MAN_BITS: tl.constexpr, EMAX: tl.constexpr,
                   EMIN: tl.constexpr, MAX_NORMAL: tl.constexpr, LEVELS: tl.constexpr, FRAC_BITS: tl.constexpr,
                   ROUNDING: tl.constexpr, SCALE_CEIL: tl.constexpr, RADIX4: tl.constexpr,
                   USE_I64: tl.constexpr):
    T: tl.constexpr = RB * MP2
    pid = tl.program_id(0)
    t = tl.arange(0, T)
    r = pid * RB + t // MP2
    if USE_I64:
        r = r.to(tl.int64)
    i = t % MP2
    c = tl.arange(0, P)
    r_ok = (r < n_rows)[:, None] & (c[None, :] < P)
    base = r[:, None] * (M * P) + c[None, :]
    if M == 1:
        x = tl.load(x_ptr + base, mask=r_ok, other=0.0).to(tl.float32)
    else:
        # y_i = sum_j s[i, j] x_j, left to right; the first term initialises (keeps the sign of zeros exact)
        s_ok = i < M
        xj = tl.load(x_ptr + base, mask=r_ok, other=0.0).to(tl.float32)
        sj = tl.load(s_ptr + i * M, mask=s_ok, other=0.0)
        x = sj[:, None] * xj
        for j in range(1, M):
            xj = tl.load(x_ptr + base + j * P, mask=r_ok, other=0.0).to(tl.float32)
            sj = tl.load(s_ptr + i * M + j, mask=s_ok, other=0.0)
            x = x + sj[:, None] * xj
    x = _butterflies(x, T, P, LOG_P, RADIX4)
    x = _round_to_out(x * scale, OUT_KIND, y_ptr.dtype.element_ty)
    out_offs = base + i[:, None] * P
    mask = r_ok & (i < M)[:, None]
    if QUANT:
        NQB: tl.constexpr = T * P // QB
        if ROUNDING == 3:
            u = tl.reshape(tl.load(noise_ptr + out_offs, mask=mask, other=0.0), (NQB, QB))
        else:
            u = 0.0
        in_block = (tl.arange(0, QB) < QB)[None, :]
        xb = tl.reshape(x, (NQB, QB))
        ax, amax = tile_stats(xb, in_block, False)
        xq = fake_quant_tile(xb, ax, amax, u, 1.0, FAMILY, WIDTH, MAN_BITS, EMAX, EMIN, MAX_NORMAL, LEVELS,
                             FRAC_BITS, ROUNDING, SCALE_CEIL, NQB, QB)
        x = tl.reshape(xq, (T, P))
    if OUT_KIND == 1:
        tl.store(y_ptr + out_offs, f32_to_bf16_bits(x, False), mask=mask)
    else:
        tl.store(y_ptr + out_offs, x.to(y_ptr.dtype.element_ty), mask=mask)


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
                           RB: tl.constexpr, APPLY_SCALE: tl.constexpr, RADIX4: tl.constexpr):
    """All stages along a strided axis: logical row t holds x[(t // C) * L * C + (t % C) + l * C], l < L (fp32)."""
    t = (tl.program_id(0) * RB + tl.arange(0, RB)).to(tl.int64)
    base = (t // C) * (L * C) + (t % C)
    offs = base[:, None] + tl.arange(0, L)[None, :] * C
    mask = (t < n_rows)[:, None] & (tl.arange(0, L) < L)[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    x = _butterflies(x, RB, L, LOG_L, RADIX4)
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


def _out_kind(dtype: torch.dtype) -> int:
    return OUT_BF16_BITS if dtype == torch.bfloat16 else OUT_NATIVE


def _check(x: torch.Tensor, rot) -> None:
    from ptq.hadamard import check_input

    check_input(x, rot.size)
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise PtqError(f"the Triton Hadamard kernel handles float32 / bfloat16 / float16, not {x.dtype}")


def radix4() -> bool:
    """Butterflies two stages at a time (default) or one (``PTQ_HADAMARD_RADIX=2``, for benchmarking); both do
    the same additions in the same order, so results are identical."""
    return os.environ.get("PTQ_HADAMARD_RADIX", "4") != "2"


def _warps(tile_elems: int) -> int:
    return 4 if tile_elems < 4096 else 8 if tile_elems <= 8192 else 16


def _rows_per_program(row_elems: int, at_least: int = 1) -> int:
    return max(at_least, triton.next_power_of_2(max(1, _TILE_TARGET // row_elems)))


def _launch_tile(x2: torch.Tensor, rot, inverse: bool, spec: QuantSpec | None, noise: torch.Tensor | None,
                 rb_min: int = 1) -> torch.Tensor:
    """``_rotate_kernel`` over a contiguous [rows, n] view (n = the transform length)."""
    rows = x2.shape[0]
    m, p = rot.m, rot.p
    mp2 = triton.next_power_of_2(m)
    rb = _rows_per_program(mp2 * p, rb_min)
    y2 = torch.empty_like(x2)
    if rows == 0:
        return y2
    kind = _out_kind(x2.dtype)
    y_arg = y2.view(torch.int16) if kind == OUT_BF16_BITS else y2
    signs = _signs(rot, inverse, x2.device)
    if spec is not None:
        c = format_constants(spec)
        fmt = dict(QUANT=True, QB=spec.block_size, FAMILY=c.family, WIDTH=c.width, MAN_BITS=c.man_bits,
                   EMAX=c.emax, EMIN=c.emin, MAX_NORMAL=c.max_normal, LEVELS=c.levels, FRAC_BITS=c.frac_bits,
                   ROUNDING=c.rounding, SCALE_CEIL=c.scale_ceil)
    else:
        fmt = dict(QUANT=False, QB=1, FAMILY=0, WIDTH=0, MAN_BITS=0, EMAX=0, EMIN=0, MAX_NORMAL=0.0, LEVELS=0,
                   FRAC_BITS=0, ROUNDING=0, SCALE_CEIL=False)
    grid = (triton.cdiv(rows, rb),)
    _rotate_kernel[grid](
        x2, signs, y_arg, noise if noise is not None else x2, rows, rot.scale,
        M=m, MP2=mp2, P=p, LOG_P=_log2(p), RB=rb, OUT_KIND=kind, USE_I64=(rows + rb) * m * p >= 2**31 - 1,
        RADIX4=radix4(), num_warps=_warps(rb * mp2 * p), enable_fp_fusion=False, **fmt)
    return y2


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
            RADIX4=radix4(), num_warps=_warps(rb * L), enable_fp_fusion=False)
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
