"""Triton kernels for MX quantization.

Public entry points (the torch reference in ``ptq.quantizers`` is the specification they match bit for bit):

- ``supports(spec, x) -> bool``: whether ``triton_fake_quantize`` can run ``spec`` on ``x`` here (Triton importable,
  a CUDA tensor or ``TRITON_INTERPRET=1`` for CPU tensors, a float dtype, a spec the template covers).
- ``triton_fake_quantize(x, spec, noise=None) -> Tensor``: fused quantize-dequantize, same shape and dtype as ``x``.
- ``triton_quantize_packed(x, spec) -> PackedQuant``: packed codes + scales (see ``ptq.kernels.mx_pack``).

``import ptq.kernels`` never needs Triton: the kernel modules are imported on first use, and ``supports`` answers
False where Triton is missing.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING

import torch

from ptq.errors import PtqError, QuantSpecError
from ptq.formats import QuantSpec

if TYPE_CHECKING:
    from ptq.kernels.mx_pack import PackedQuant

__all__ = ["supports", "triton_available", "triton_fake_quantize", "triton_quantize_packed", "packed_supports"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# One program holds at least one whole block in registers; past this the torch reference is the better tool.
MAX_BLOCK_SIZE = 8192


def triton_available() -> bool:
    """Triton can be imported on this machine."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _device_ok(x: torch.Tensor) -> bool:
    if x.is_cuda:
        return True
    return x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def supports(spec: QuantSpec, x: torch.Tensor) -> bool:
    """True when ``triton_fake_quantize(x, spec)`` runs here and matches the reference bit for bit."""
    if not isinstance(spec, QuantSpec) or not isinstance(x, torch.Tensor):
        return False
    if x.dtype not in _FLOAT_DTYPES or x.dim() == 0 or not _device_ok(x) or not triton_available():
        return False
    if spec.family in ("mx6", "mx9") and spec.block_size % 2:
        return False
    return spec.block_size <= MAX_BLOCK_SIZE and -x.dim() <= spec.axis < x.dim()


def _check_runnable(x: torch.Tensor, spec: QuantSpec) -> None:
    if not _device_ok(x):
        raise PtqError(f"the Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 on the CPU); got a tensor on "
                       f"{x.device}. Use backend='torch' for the reference.")
    if spec.block_size > MAX_BLOCK_SIZE:
        raise QuantSpecError(f"{spec}: the Triton kernels take blocks of at most {MAX_BLOCK_SIZE} elements; use "
                             "backend='torch' for larger groups")


def _on_device(x: torch.Tensor):
    """Launch on ``x``'s GPU even when another one is current (no device switch when it already is)."""
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def _to_blocked_2d(x: torch.Tensor, axis: int) -> torch.Tensor:
    moved = x.movedim(axis, -1)
    return moved.reshape(-1, moved.shape[-1]).contiguous()


def _noise_2d(x: torch.Tensor, spec: QuantSpec, noise: torch.Tensor | None) -> torch.Tensor | None:
    """The reference's stochastic-rounding noise (drawn or checked by it) as [rows, padded length] fp32."""
    if noise is None and spec.rounding != "stochastic":
        return None  # the common case, decided before the (per-call) import below
    from ptq.quantizers.reference import resolve_noise

    noise = resolve_noise(x, spec, noise)
    if noise is None:
        return None
    return noise.reshape(-1, noise.shape[-2] * noise.shape[-1]).contiguous()


def _rows_in_place(x: torch.Tensor, axis: int, stochastic: bool) -> torch.Tensor | None:
    """An output tensor with ``x``'s strides when ``x``'s memory already is the kernel's [rows, L] layout, else
    None (then the blocked axis is moved last and copied).

    That holds when ``x`` is dense and non-overlapping (exactly then ``empty_like`` keeps its strides) and the
    blocked axis has stride 1: then it is the innermost memory dim and every block is L consecutive elements, e.g.
    K / V as [batch, heads, seq, head_dim] views of a [batch, seq, heads, head_dim] buffer. Blocks do not depend on
    the order of the rows, except for stochastic-rounding noise, which is indexed in logical row order: with it,
    only layouts whose memory order is the logical one (axis moved last, contiguous) qualify.
    """
    if x.stride(axis) != 1:
        return None
    if stochastic and not x.movedim(axis, -1).is_contiguous():
        return None
    y = torch.empty_like(x)
    return y if y.stride() == x.stride() else None


def triton_fake_quantize(x: torch.Tensor, spec: QuantSpec, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize ``x`` with ``spec`` in one Triton kernel; returns a tensor of ``x``'s shape and dtype.

    Bit-identical to ``ptq.quantizers.reference_fake_quantize``. ``noise`` (stochastic rounding only): U[0,1)
    float32 of ``ptq.quantizers.noise_shape(x, spec)`` = ``(*x.movedim(axis, -1).shape[:-1], n_blocks,
    block_size)``; drawn from ``torch.Generator(device).manual_seed(spec.seed)`` when omitted, exactly as the
    reference does. When the blocked axis has stride 1 in a dense ``x`` (e.g. a contiguous tensor blocked along its
    last dim) the kernel reads ``x`` in place and the result has ``x``'s strides; otherwise the blocked axis is
    moved last into a contiguous copy and the result is a view with ``x``'s layout. Not differentiable (no autograd
    graph): wrap it in a straight-through estimator where gradients are needed.
    """
    from ptq.kernels.mx_quant import check_input, fake_quantize_2d, launch_fake_quantize, nvfp4_global_scale_fast

    axis = check_input(x, spec)
    _check_runnable(x, spec)
    n2 = _noise_2d(x, spec, noise)
    L = x.shape[axis]
    y = _rows_in_place(x, axis, n2 is not None) if L else None
    if y is not None:
        with _on_device(x):
            g = None
            if spec.family == "nvfp4":  # the tensor-wide amax does not depend on the order of the elements
                g = nvfp4_global_scale_fast(x.as_strided((x.numel(),), (1,)))
            launch_fake_quantize(x, y, x.numel() // L, L, spec, n2, g)
        return y
    moved_shape = x.movedim(axis, -1).shape
    x2 = _to_blocked_2d(x, axis)
    with _on_device(x):
        g = nvfp4_global_scale_fast(x2) if spec.family == "nvfp4" else None
        y2 = fake_quantize_2d(x2, spec, n2, g)
    return y2.reshape(moved_shape).movedim(-1, axis)


def packed_supports(spec: QuantSpec, x: torch.Tensor) -> bool:
    """True when ``triton_quantize_packed(x, spec)`` handles ``spec`` (MXFP4, NVFP4, MXINT4, MXINT8, MXFP8)."""
    from ptq.kernels.mx_pack import packable

    return supports(spec, x) and packable(spec)


def triton_quantize_packed(x: torch.Tensor, spec: QuantSpec) -> "PackedQuant":
    """Quantize ``x`` to packed codes + scales in one kernel; see ``ptq.kernels.mx_pack.quantize_packed``."""
    from ptq.kernels.mx_pack import quantize_packed
    from ptq.kernels.mx_quant import check_input

    check_input(x, spec)
    _check_runnable(x, spec)
    with _on_device(x):
        return quantize_packed(x, spec)
