"""The sequential part of GPTQ for one block of columns (its scale choice and its column loop) as one Triton kernel.

Inside an MX block GPTQ must go column by column: the block's scale is chosen from its current weights (the format's
rule, or the clip search), then column c is quantized under it and its error, divided by U[c, c], moves every later
column of the block by -err * U[c, c+1:]. In torch that is some twenty small kernels per column and fifty per scale
search; at 8B scale (26k columns, 832 blocks per decoder layer) launching them was most of GPTQ's time. Rows are
independent, so each program here holds a tile of rows of the block in registers and does all of it: one launch
per block.

Numerics are those of the torch path (`ptq.gptq.core.gptq_block`) step for step: the element rounding is the
fake-quantize kernels' own (`mx_elements`, `nvfp4_elements`; exact against the torch reference), the scale rule is
`mx_block_exponent` of the block's amax times the candidate multiplier (the torch search scales the block instead:
the same power-of-two product), the error is a correctly rounded division, and the update w - err * u is a product
and a difference rounded separately (the launch disables mul+add contraction). The clip search's losses are sums
over the block, formed in another order than torch's, so where two candidates' losses agree to the last bits either
may win; everything else is bit for bit the same (tests compare under the Triton interpreter, and on the GPU).
nvfp4 blocks take their scale from torch (its search is over E4M3 ratios) and run the column loop here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ptq.errors import QuantSpecError
from ptq.formats import QuantSpec
from ptq.kernels import _on_device
from ptq.kernels._triton_utils import exp2i, floor_log2
from ptq.kernels.mx_quant import (
    EXACT_FP_OPTIONS,
    format_constants,
    mx_block_exponent,
    mx_elements,
    nvfp4_elements,
)

SCALE_GIVEN, SCALE_RULE, SCALE_WEIGHT, SCALE_OUTPUT = 0, 1, 2, 3
SCALE_MODES = {None: SCALE_RULE, "weight": SCALE_WEIGHT, "output": SCALE_OUTPUT}
ROWS_PER_PROGRAM = 32
MAX_BLOCK = 64  # a tile of ROWS_PER_PROGRAM x block fp32 values lives in registers


def kernel_mode(spec: QuantSpec, w: torch.Tensor) -> str | None:
    """How much of a GPTQ block of ``spec`` the kernel does on ``w``'s device: ``"block"`` (scale and columns:
    mxint, mxfp), ``"columns"`` (the column loop under a scale chosen by torch: nvfp4) or None (the torch path: CPU
    tensors, int / mx6 / mx9 formats, stochastic rounding, blocks over `MAX_BLOCK`). The interpreter is for tests,
    which call `triton_gptq_block` directly."""
    if not (w.is_cuda and w.dtype == torch.float32 and spec.rounding != "stochastic"
            and spec.block_size <= MAX_BLOCK):
        return None
    return {"mxint": "block", "mxfp": "block", "nvfp4": "columns"}.get(spec.family)


@triton.jit
def _candidate_loss(w, ax, e, h, FAMILY: tl.constexpr, MAN_BITS: tl.constexpr, EMAX: tl.constexpr,
                    EMIN: tl.constexpr, MAX_NORMAL: tl.constexpr, LEVELS: tl.constexpr, FRAC_BITS: tl.constexpr,
                    ROUNDING: tl.constexpr, OUTPUT: tl.constexpr):
    """Per-row clip-search objective of the tile ``w`` quantized under 2^e: ||d||^2, or d H d^T (OUTPUT)."""
    d = w - mx_elements(w, ax, e[:, None], 0.0, FAMILY, MAN_BITS, EMAX, EMIN, MAX_NORMAL, LEVELS, FRAC_BITS,
                        ROUNDING)
    if OUTPUT:
        return tl.sum(tl.dot(d, h, input_precision="ieee") * d, axis=1)
    else:
        return tl.sum(d * d, axis=1)


@triton.jit
def _try_candidate(w, ax, amax, e, best, h, MULT: tl.constexpr, FAMILY: tl.constexpr, MAN_BITS: tl.constexpr,
                   EMAX: tl.constexpr, EMIN: tl.constexpr, MAX_NORMAL: tl.constexpr, LEVELS: tl.constexpr,
                   FRAC_BITS: tl.constexpr, ROUNDING: tl.constexpr, SCALE_CEIL: tl.constexpr, OUTPUT: tl.constexpr):
    """Keep the rule's exponent for the block scaled by MULT where its loss is strictly lower."""
    ek = mx_block_exponent(amax * MULT, EMAX, MAX_NORMAL, SCALE_CEIL)
    lk = _candidate_loss(w, ax, ek, h, FAMILY, MAN_BITS, EMAX, EMIN, MAX_NORMAL, LEVELS, FRAC_BITS, ROUNDING, OUTPUT)
    better = lk < best
    return tl.where(better, ek, e), tl.where(better, lk, best)


@triton.jit
def _gptq_block_kernel(w_ptr, u_ptr, h_ptr, s_ptr, g_ptr, q_ptr, err_ptr, rows, sw0, sw1, su0, su1, sh0, sh1,
                       L: tl.constexpr, SCALE: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, M3: tl.constexpr,
                       FAMILY: tl.constexpr, MAN_BITS: tl.constexpr, EMAX: tl.constexpr, EMIN: tl.constexpr,
                       MAX_NORMAL: tl.constexpr, LEVELS: tl.constexpr, FRAC_BITS: tl.constexpr,
                       ROUNDING: tl.constexpr, SCALE_CEIL: tl.constexpr, BR: tl.constexpr, BL: tl.constexpr):
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    c = tl.arange(0, BL)
    in_rows = r < rows
    in_cols = c < L
    tile = in_rows[:, None] & in_cols[None, :]
    w = tl.load(w_ptr + r[:, None] * sw0 + c[None, :] * sw1, mask=tile, other=0.0)
    if SCALE == 0:
        s = tl.load(s_ptr + r, mask=in_rows, other=1.0)
        if FAMILY == 3:
            g = tl.load(g_ptr)
        else:
            e = floor_log2(s)  # the scale is 2^e exactly
    else:  # mxint / mxfp: the rule's exponent, or the best of the candidates (first one on ties, as torch's argmin)
        ax = tl.abs(w)
        amax = tl.max(ax, axis=1)
        e = mx_block_exponent(amax, EMAX, MAX_NORMAL, SCALE_CEIL)
        if SCALE >= 2:
            if SCALE == 3:
                hm = in_cols[:, None] & in_cols[None, :]
                h = tl.load(h_ptr + c[:, None] * sh0 + c[None, :] * sh1, mask=hm, other=0.0)
            else:
                h = 0.0
            best = _candidate_loss(w, ax, e, h, FAMILY, MAN_BITS, EMAX, EMIN, MAX_NORMAL, LEVELS, FRAC_BITS,
                                   ROUNDING, SCALE == 3)
            e, best = _try_candidate(w, ax, amax, e, best, h, M1, FAMILY, MAN_BITS, EMAX, EMIN, MAX_NORMAL, LEVELS,
                                     FRAC_BITS, ROUNDING, SCALE_CEIL, SCALE == 3)
            e, best = _try_candidate(w, ax, amax, e, best, h, M2, FAMILY, MAN_BITS, EMAX, EMIN, MAX_NORMAL, LEVELS,
                                     FRAC_BITS, ROUNDING, SCALE_CEIL, SCALE == 3)
            e, best = _try_candidate(w, ax, amax, e, best, h, M3, FAMILY, MAN_BITS, EMAX, EMIN, MAX_NORMAL, LEVELS,
                                     FRAC_BITS, ROUNDING, SCALE_CEIL, SCALE == 3)
        tl.store(s_ptr + r, exp2i(e), mask=in_rows)
    q_tile = tl.zeros([BR, BL], dtype=tl.float32)
    err_tile = tl.zeros([BR, BL], dtype=tl.float32)
    for j in tl.static_range(L):
        pick = (c == j)[None, :]
        x = tl.sum(tl.where(pick, w, -0.0), axis=1)  # column j exactly (x + -0 == x, the sign of zero included)
        if FAMILY == 3:
            q = nvfp4_elements(x, tl.abs(x), s, g, 0.0, MAN_BITS, EMIN, EMAX, MAX_NORMAL, ROUNDING)
        else:
            q = mx_elements(x, tl.abs(x), e, 0.0, FAMILY, MAN_BITS, EMAX, EMIN, MAX_NORMAL, LEVELS, FRAC_BITS,
                            ROUNDING)
        err = tl.math.div_rn(x - q, tl.load(u_ptr + j * (su0 + su1)))
        u_row = tl.load(u_ptr + j * su0 + c * su1, mask=(c > j) & in_cols, other=0.0)
        w = w - err[:, None] * u_row[None, :]
        q_tile = tl.where(pick, q[:, None], q_tile)
        err_tile = tl.where(pick, err[:, None], err_tile)
    out = r[:, None] * L + c[None, :]
    tl.store(q_ptr + out, q_tile, mask=tile)
    tl.store(err_ptr + out, err_tile, mask=tile)


def triton_gptq_block(w: torch.Tensor, u: torch.Tensor, spec: QuantSpec, *, scale: torch.Tensor | None = None,
                      clip: str | None = None, h_block: torch.Tensor | None = None,
                      global_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One GPTQ block of fp32 ``w [rows, L]`` with ``u [L, L]`` (any strides): ``(q, err, scale [rows, 1])`` as
    `ptq.gptq.core.gptq_block` returns them. With ``scale`` given (2^e for MX; the decoded E4M3 block scale for
    nvfp4, with ``global_scale``) only the column loop runs; without it (mxint / mxfp) the kernel picks the scale by
    the format's rule (``clip=None``) or the clip search (``"weight"``, or ``"output"`` with ``h_block [L, L]``)."""
    from ptq.gptq.clip_search import scale_multipliers

    rows, L = w.shape
    mx = spec.family in ("mxint", "mxfp")
    if not (mx or spec.family == "nvfp4") or L > MAX_BLOCK or (scale is None and not mx):
        raise QuantSpecError(f"triton_gptq_block: {spec} with a block of {L} columns"
                             f"{' and no scale' if scale is None else ''} is not supported; use the torch path")
    if spec.family == "nvfp4" and global_scale is None:
        raise QuantSpecError("triton_gptq_block: nvfp4 needs the tensor's global scale")
    if scale is None and clip == "output" and h_block is None:
        raise QuantSpecError("triton_gptq_block: the output clip search needs the block's Hessian h_block")
    c = format_constants(spec)
    mult = scale_multipliers(spec)
    q = torch.empty(rows, L, dtype=torch.float32, device=w.device)
    err = torch.empty_like(q)
    if scale is None:
        mode = SCALE_MODES[clip]
        s = torch.empty(rows, dtype=torch.float32, device=w.device)
    else:
        mode = SCALE_GIVEN
        s = scale.reshape(rows).to(torch.float32).contiguous()
    g = global_scale.reshape(1).to(torch.float32) if global_scale is not None else s
    h = h_block if mode == SCALE_OUTPUT else w
    with _on_device(w):
        _gptq_block_kernel[(triton.cdiv(rows, ROWS_PER_PROGRAM),)](
            w, u, h, s, g, q, err, rows, *w.stride(), *u.stride(), *h.stride(), L=L, SCALE=mode,
            M1=mult[1] if mx else 0.0, M2=mult[2] if mx else 0.0, M3=mult[3] if mx else 0.0,
            FAMILY=c.family, MAN_BITS=c.man_bits, EMAX=c.emax, EMIN=c.emin, MAX_NORMAL=c.max_normal,
            LEVELS=c.levels, FRAC_BITS=c.frac_bits, ROUNDING=c.rounding, SCALE_CEIL=c.scale_ceil,
            BR=ROWS_PER_PROGRAM, BL=triton.next_power_of_2(max(L, 16)), num_warps=4, **EXACT_FP_OPTIONS,
        )
    return q, err, s.reshape(rows, 1)
