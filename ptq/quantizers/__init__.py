"""Quantizers: the one entry point `fake_quantize` (Triton on CUDA, the torch reference elsewhere), the torch
reference itself, per-block scales for GPTQ, and real quantization to codes.

Numeric rules (normative; ``ptq.formats`` holds the constants): all math in fp32, output in the input dtype
(round to nearest even); the blocked axis moved last and zero-padded to whole blocks; NaN / +-Inf pass through
element-wise and are excluded from every scale statistic, so one bad value does not erase its block; integer-coded
families (mxint, int) return +0 for zero elements because two's-complement codes have no -0.
"""

from __future__ import annotations

import functools
import os

import torch

from ptq.errors import PtqError
from ptq.formats import QuantSpec
from ptq.quantizers.codes import (QTensor, decode_minifloat, dequantize, e8m0_decode, e8m0_encode, encode_minifloat,
                                  pack_nibbles, quantize, unpack_nibbles)
from ptq.quantizers.common import check_spec, check_tensor, make_noise, noise_shape
from ptq.quantizers.nvfp4 import nvfp4_block_scales, nvfp4_global_scale
from ptq.quantizers.reference import block_scales, quantize_with_scale, reference_fake_quantize, resolve_noise

BACKENDS = ("auto", "torch", "triton")
BACKEND_ENV = "PTQ_BACKEND"

__all__ = [
    "BACKENDS", "BACKEND_ENV", "QTensor", "block_scales", "decode_minifloat", "dequantize", "e8m0_decode",
    "e8m0_encode", "encode_minifloat", "fake_quantize", "make_noise", "noise_shape", "nvfp4_block_scales",
    "nvfp4_global_scale", "pack_nibbles", "quantize", "quantize_with_scale", "reference_fake_quantize",
    "resolve_backend", "unpack_nibbles",
]


def _requested_backend(backend: str | None) -> str:
    if backend is None:
        env = os.environ.get(BACKEND_ENV, "").strip().lower()
        if env and env not in BACKENDS:
            raise PtqError(f"environment variable {BACKEND_ENV}={env!r} is not one of {', '.join(BACKENDS)}")
        return env or "auto"
    if backend not in BACKENDS:
        raise PtqError(f"backend={backend!r} is not one of {', '.join(BACKENDS)} (or None)")
    return backend


@functools.cache  # imported once: a module's importability does not change while the process runs
def _triton_module():
    try:
        import ptq.kernels as kernels
    except Exception as exc:  # a broken Triton install must not break the torch path
        return None, exc
    if not (hasattr(kernels, "triton_fake_quantize") and hasattr(kernels, "supports")):
        return None, ImportError("ptq.kernels provides no triton_fake_quantize / supports")
    return kernels, None


def resolve_backend(x: torch.Tensor, spec: QuantSpec, backend: str | None = None) -> str:
    """"torch" or "triton": what `fake_quantize` would run for ``x`` / ``spec`` / ``backend``.

    ``backend`` None defers to $PTQ_BACKEND (auto | torch | triton), then "auto": Triton for CUDA tensors that
    ``ptq.kernels.supports`` accepts, the torch reference otherwise. Forcing "triton" where it cannot run raises.
    """
    want = _requested_backend(backend)
    if want == "torch":
        return "torch"
    if want == "auto" and not x.is_cuda:
        return "torch"
    kernels, exc = _triton_module()
    ok = kernels is not None and bool(kernels.supports(spec, x))
    if want == "triton" and not ok:
        why = f"ptq.kernels cannot be imported ({exc})" if kernels is None else \
            f"ptq.kernels.supports() refuses {spec} for a {x.dtype} tensor of shape {tuple(x.shape)} on {x.device}"
        raise PtqError(f"backend 'triton' was forced but {why}; use backend='torch' (or {BACKEND_ENV}=torch)")
    return "triton" if ok else "torch"


def fake_quantize(x: torch.Tensor, spec: QuantSpec, *, backend: str | None = None,
                  noise: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize ``x`` with ``spec``; same shape and dtype as ``x``. Both backends agree bit for bit.

    ``backend``: None / "auto" / "torch" / "triton" (see `resolve_backend`). ``noise`` (stochastic rounding only):
    U[0,1) float32 of `noise_shape`; by default drawn from ``torch.Generator(device=x.device).manual_seed(
    spec.seed)`` (`make_noise`), so both backends see the same draws.

    Autograd: when ``x`` requires grad (and grad mode is on), the gradient passes straight through (identity
    backward); the forward result is the same bits either way.
    """
    check_spec(spec)
    check_tensor(x)
    chosen = resolve_backend(x, spec, backend)
    noise = resolve_noise(x, spec, noise)
    if x.requires_grad and torch.is_grad_enabled():
        return _StraightThrough.apply(x, spec, chosen, noise)
    return _run_backend(x, spec, chosen, noise)


def _run_backend(x: torch.Tensor, spec: QuantSpec, chosen: str, noise: torch.Tensor | None) -> torch.Tensor:
    if chosen == "triton":
        return _triton_module()[0].triton_fake_quantize(x, spec, noise=noise)
    return reference_fake_quantize(x, spec, noise=noise)


class _StraightThrough(torch.autograd.Function):
    """The straight-through estimator: the forward is `fake_quantize` itself (same bits, either backend), the
    backward the identity, so rotations and other parameters upstream of a quantizer can be trained through it
    (rotation_learn). The rounding's true derivative is zero almost everywhere, which would train nothing."""

    @staticmethod
    def forward(ctx, x, spec, chosen, noise):
        return _run_backend(x.detach(), spec, chosen, noise)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None
