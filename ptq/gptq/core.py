"""GPTQ on one weight matrix and its input Hessian: pure tensor code, no modules, no I/O.

MX-aware: the quantization groups are the format's blocks along ``in_features``. A block's scale is chosen when its
first column is reached, from the block's CURRENT weights (already moved by the error feedback of earlier columns),
optionally by clip search; then its columns are quantized one at a time (mx6 / mx9: one pair at a time, since a pair
shares a prime bit) with the usual error feedback to every later column, inside and after the block.

Act-order with blocks: columns cannot be freely permuted without breaking block membership (a block's elements must
share one scale). We permute whole blocks by their summed ``diag(H)`` (descending) and, inside each block, the
element groups by their own ``diag(H)``. Each block stays contiguous in the processing order, so its scale is still
chosen when it is reached, and the result is a valid blocked tensor in the original column order.

Lazy updates on two levels: inside a block, each column's error reaches the block's later columns at once (the
sequential part, `gptq_block`); the block's error reaches the rest of its batch (``blocksize`` columns, rounded
to whole blocks) as one rank-``block_size`` update, and the batch's error the columns after the batch as one
rank-``blocksize`` update. The same arithmetic as the column-by-column algorithm, regrouped.

On CUDA the sequential part of a block (scale choice and column loop) is one Triton kernel where the format allows
(`ptq.kernels.gptq_block`: mxint / mxfp whole, nvfp4 the column loop). In torch it is some twenty small kernels per
column and fifty per clip search, which at 8B scale made launching them, not the arithmetic, the cost of GPTQ. The
kernel computes what the torch path computes (see its module docstring for the one place summation order enters).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ptq.errors import PtqError, QuantSpecError
from ptq.formats import QuantSpec
from ptq.gptq.clip_search import (
    OBJECTIVES,
    candidate_multipliers,
    element_group,
    quantize_block,
    rule_scale,
    search_block_scale,
)


class HessianError(PtqError):
    """The damped Hessian is not positive definite (too little calibration data or ``percdamp`` too small)."""


@dataclass(frozen=True)
class GPTQResult:
    """weight: fp32 [out, in], every block on its own grid. scales / zero_points: fp32 [out, n_blocks] (original
    block order; zero_points only for asymmetric int). global_scale: nvfp4's per-tensor scale. proxy_loss:
    tr((W - Q) H (W - Q)^T) with the undamped H. perm: the processing order of the columns (act-order)."""

    weight: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor | None
    global_scale: torch.Tensor | None
    proxy_loss: float
    perm: torch.Tensor | None


def gram(x: torch.Tensor) -> torch.Tensor:
    """x^T x of ``x [tokens, features]`` in fp32, the per-batch term of a Hessian.

    bf16 / fp16 inputs on CUDA go through the tensor cores with fp32 accumulation and output: their products are
    exact in fp32 (two 8- or 11-bit significands), so the result is the fp32 GEMM of the widened input up to
    summation order, at a fraction of its cost (a 14336-wide down_proj Hessian over 262k tokens is ~108 TFLOP)."""
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(x.T, x, out_dtype=torch.float32)
    x = x.float()
    return x.T @ x


def proxy_loss(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """tr(dW H dW^T): the layer-output squared error GPTQ minimises (up to the factor in H)."""
    d = (w.float() - q.float()).to(h.dtype)
    return float(torch.einsum("ri,ij,rj->", d, h, d))


def check_spec(spec: QuantSpec, shape: torch.Size) -> None:
    """GPTQ quantizes a [out, in] weight blocked along ``in`` with deterministic rounding."""
    if len(shape) != 2:
        raise QuantSpecError(f"GPTQ takes a 2-D weight [out_features, in_features], got shape {tuple(shape)}")
    if spec.axis not in (-1, 1):
        raise QuantSpecError(
            f"GPTQ quantizes weights blocked along in_features (axis -1), got {spec} for shape {tuple(shape)}")
    if spec.rounding == "stochastic":
        raise QuantSpecError(
            f"GPTQ needs a deterministic weight rounding, got {spec}; use weight_rounding = 'even' (the default)")


def damp(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """H + percdamp * mean(diag H) * I (a copy)."""
    d = h.clone()
    idx = torch.arange(h.shape[0], device=h.device)
    d[idx, idx] += percdamp * torch.mean(torch.diag(h))
    return d


def inverse_factor(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor U of H^-1 (U^T U = H^-1) for an already damped H; ``percdamp`` is for messages."""
    n = h.shape[0]
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise HessianError(
            f"the damped Hessian ({n}x{n}) is not positive definite (percdamp={percdamp}); raise [gptq].percdamp "
            "(e.g. 0.05) or use more calibration samples (nsamples / seqlen)")
    hinv = torch.cholesky_inverse(chol)
    u, info = torch.linalg.cholesky_ex(hinv, upper=True)
    if int(info) != 0:
        raise HessianError(
            f"the inverse of the damped Hessian ({n}x{n}) lost positive definiteness in fp32 (percdamp={percdamp}); "
            "raise [gptq].percdamp (e.g. 0.05)")
    return u


def processing_order(
    diag: torch.Tensor, block_size: int, group: int, act_order: bool
) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """Column permutation and the blocks in processing order as (start, length, original block index).

    Without act-order: identity. With act-order: blocks by summed diag(H) descending, element groups inside a block
    by their diag(H) descending (stable sorts, so ties keep the original order). Computed on the CPU: these are a
    few small operations per block, which as GPU launches (and a read-back per block) would cost more than GPTQ's
    arithmetic."""
    device = diag.device
    diag = diag.detach().cpu()
    n = diag.numel()
    n_blocks = -(-n // block_size)
    starts = [b * block_size for b in range(n_blocks)]
    if act_order:
        sums = torch.stack([diag[s : s + block_size].sum() for s in starts])
        block_order = torch.argsort(sums, descending=True, stable=True).tolist()
    else:
        block_order = list(range(n_blocks))
    pieces, segments, pos = [], [], 0
    for b in block_order:
        cols = torch.arange(starts[b], min(starts[b] + block_size, n))
        if act_order and group == 1:
            cols = cols[torch.argsort(diag[cols], descending=True, stable=True)]
        elif act_order:
            units = cols.split(group)
            keys = torch.stack([diag[u].sum() for u in units])
            cols = torch.cat([units[i] for i in torch.argsort(keys, descending=True, stable=True).tolist()])
        pieces.append(cols)
        segments.append((pos, cols.numel(), b))
        pos += cols.numel()
    return torch.cat(pieces).to(device), segments


def gptq_block(
    w: torch.Tensor,
    u: torch.Tensor,
    spec: QuantSpec,
    clip: str | None = None,
    h_block: torch.Tensor | None = None,
    global_scale: torch.Tensor | None = None,
    multipliers: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The sequential part of GPTQ for one block ``w [rows, L]`` (its current, error-updated weights): choose the
    block's scale (the format's rule, or the clip search ``clip`` with the damped Hessian's block ``h_block``), then
    quantize column by column (mx6 / mx9: pair by pair), feeding each column's error forward to the block's later
    columns through ``u [L, L]`` (the block's diagonal sub-block of the upper Cholesky factor of H^-1).

    Returns ``(q, err, scale [rows, 1], zero_point [rows, 1] | None)``, q and err [rows, L], err the scaled errors
    (w_c - q_c) / u_cc that the later blocks need. ``w`` is not modified. On CUDA, `ptq.kernels.gptq_block` does
    the scale choice and the column loop in one launch where the format allows."""
    from ptq.kernels.gptq_block import kernel_mode, triton_gptq_block

    mode = kernel_mode(spec, w)
    if mode == "block":
        q, err, scale = triton_gptq_block(w, u, spec, clip=clip, h_block=h_block)
        return q, err, scale, None
    if clip is None:
        scale, zp = rule_scale(w, spec, global_scale)
    else:
        scale, zp = search_block_scale(w, spec, clip, h_block, global_scale, multipliers)
    rows = w.shape[0]
    scale = scale.reshape(rows, 1)
    zp = zp.reshape(rows, 1) if zp is not None else None
    if mode == "columns":
        q, err, _ = triton_gptq_block(w, u, spec, scale=scale, global_scale=global_scale)
        return q, err, scale, zp
    q, err = block_columns(w, u, scale, spec, zp, global_scale)
    return q, err, scale, zp


def block_columns(
    w: torch.Tensor,
    u: torch.Tensor,
    scale: torch.Tensor,
    spec: QuantSpec,
    zero_point: torch.Tensor | None = None,
    global_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The column loop of `gptq_block` in torch, under a given ``scale [rows, 1]``: ``(q, err)``."""
    w = w.clone()
    q_out = torch.empty_like(w)
    err = torch.empty_like(w)
    n, group = w.shape[1], element_group(spec)
    for j in range(0, n, group):
        k = min(group, n - j)
        q = quantize_block(w[:, j : j + k], scale, spec, zero_point, global_scale)
        for t in range(k):
            c = j + t
            q_out[:, c] = q[:, t]
            e = (w[:, c] - q[:, t]) / u[c, c]
            w[:, c + 1 :].addr_(e, u[c, c + 1 :], alpha=-1.0)
            err[:, c] = e
    return q_out, err


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    *,
    percdamp: float = 0.01,
    act_order: bool = False,
    blocksize: int = 128,
    clip: str | None = None,
    global_scale: torch.Tensor | None = None,
) -> GPTQResult:
    """Quantize ``weight [out, in]`` to ``spec`` (blocked along ``in``) by GPTQ with input Hessian ``hessian [in, in]``.

    percdamp: dampening as a fraction of mean(diag H). act_order: process blocks (and columns inside them) by
    decreasing diag(H). blocksize: columns per lazy batch update (rounded to whole blocks). clip: None,
    ``"weight"`` (quantile_search) or ``"output"`` (clip_search_y): per-block scale search, see ``clip_search``.
    global_scale: nvfp4's per-tensor scale (default: from the whole ``weight``, before any update).
    All arithmetic in fp32 on ``weight``'s device; the inputs are not modified.
    """
    check_spec(spec, weight.shape)
    if clip is not None and clip not in OBJECTIVES:
        raise QuantSpecError(f"unknown clip objective {clip!r}; choose one of None, {', '.join(OBJECTIVES)}")
    out_f, in_f = weight.shape
    if tuple(hessian.shape) != (in_f, in_f):
        raise QuantSpecError(f"Hessian shape {tuple(hessian.shape)} does not match weight in_features {in_f}")
    w = weight.detach().float().clone()
    if not bool(torch.isfinite(w).all()):
        raise QuantSpecError(f"GPTQ got a weight of shape {tuple(w.shape)} with NaN/Inf entries; error feedback "
                             "would spread them to every later column. Fix the checkpoint or set gptq = false")
    h_in = hessian.detach().to(device=w.device, dtype=torch.float32)
    if spec.family == "nvfp4" and global_scale is None:
        from ptq.quantizers import nvfp4_global_scale

        global_scale = nvfp4_global_scale(w)

    h = h_in.clone()
    dead = torch.diag(h) == 0
    idx = torch.arange(in_f, device=w.device)
    h[idx[dead], idx[dead]] = 1.0
    w[:, dead] = 0.0

    bs, group = spec.block_size, element_group(spec)
    perm, segments = processing_order(torch.diag(h), bs, group, act_order)
    w = w[:, perm]
    h = h[perm][:, perm]
    h_damped = damp(h, percdamp)
    u = inverse_factor(h_damped, percdamp)

    q_all = torch.zeros_like(w)
    n_blocks = len(segments)
    scales = torch.zeros(out_f, n_blocks, dtype=torch.float32, device=w.device)
    asym = spec.family == "int" and not spec.symmetric
    zps = torch.zeros_like(scales) if asym else None
    per_batch = max(1, blocksize // bs)
    mult = candidate_multipliers(spec, w.device) if clip is not None else None
    for s0 in range(0, n_blocks, per_batch):
        batch = segments[s0 : s0 + per_batch]
        i1, i2 = batch[0][0], batch[-1][0] + batch[-1][1]
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for start, length, b in batch:
            a = start - i1
            hb = h_damped[start : start + length, start : start + length] if clip == "output" else None
            ub = u1[a : a + length, a : a + length]
            q, err, scale, zp = gptq_block(w1[:, a : a + length], ub, spec, clip, hb, global_scale, mult)
            q1[:, a : a + length], err1[:, a : a + length] = q, err
            scales[:, b] = scale[:, 0]
            if zps is not None:
                zps[:, b] = zp[:, 0]
            w1[:, a + length :] -= err1[:, a : a + length] @ u1[a : a + length, a + length :]
        q_all[:, i1:i2] = q1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]

    inv = torch.argsort(perm)
    q_final = q_all[:, inv]
    loss = proxy_loss(weight.to(w.device), q_final, h_in)
    return GPTQResult(
        weight=q_final,
        scales=scales,
        zero_points=zps,
        global_scale=global_scale,
        proxy_loss=loss,
        perm=perm if act_order else None,
    )

