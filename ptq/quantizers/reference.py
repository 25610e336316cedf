"""The torch reference: fake quantization, block scales and quantize-with-a-given-scale for every family."""

from __future__ import annotations

import torch

from ptq.errors import QuantSpecError
from ptq.formats import QuantSpec
from ptq.quantizers.common import (check_noise, check_spec, check_tensor, from_blocks, layout_of, make_noise,
                                   restore_nonfinite, to_blocks)
from ptq.quantizers.intq import int_block_scales, int_fake_blocks, int_quantize_with_scale
from ptq.quantizers.mx import mx_block_scales, mx_fake_blocks, mx_quantize_with_scale
from ptq.quantizers.mx69 import mx69_block_scales, mx69_fake_blocks, mx69_quantize_with_scale
from ptq.quantizers.nvfp4 import (nvfp4_block_scales, nvfp4_fake_blocks, nvfp4_global_scale,
                                  nvfp4_quantize_with_scale)


def resolve_noise(x: torch.Tensor, spec: QuantSpec, noise: torch.Tensor | None) -> torch.Tensor | None:
    """The stochastic-rounding noise for ``fake_quantize(x, spec)`` (None unless rounding is stochastic)."""
    if spec.rounding != "stochastic":
        if noise is not None:
            raise QuantSpecError(f"noise was given but {spec} does not use stochastic rounding; drop the argument")
        return None
    layout = layout_of(x, spec)
    if noise is None:
        return make_noise(x, spec)
    return check_noise(noise, layout.blocked_shape, x.device)


def reference_fake_quantize(x: torch.Tensor, spec: QuantSpec, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize ``x`` with the torch reference (no backend dispatch). Output dtype = input dtype.

    ``x`` is upcast to fp32, its ``spec.axis`` moved last and zero-padded to whole blocks, quantized, unpadded and
    cast back with round-to-nearest-even. NaN / +-Inf pass through element-wise and never enter a block's scale.
    """
    check_spec(spec)
    check_tensor(x)
    noise = resolve_noise(x, spec, noise)
    layout = layout_of(x, spec)
    xb = to_blocks(x, layout)
    if x.numel() == 0:
        return x.clone()
    f = spec.family
    if f in ("mxint", "mxfp"):
        yb = mx_fake_blocks(xb, spec, noise)
    elif f in ("mx6", "mx9"):
        yb = mx69_fake_blocks(xb, spec, noise)
    elif f == "nvfp4":
        yb = nvfp4_fake_blocks(xb, spec, nvfp4_global_scale(x), noise)
    elif f == "int":
        yb = int_fake_blocks(xb, spec, noise)
    else:  # pragma: no cover - QuantSpec validates the family
        raise QuantSpecError(f"unknown family {f!r}")
    yb = restore_nonfinite(yb, xb)
    return from_blocks(yb, layout).to(x.dtype)


def block_scales(x_blocked: torch.Tensor, spec: QuantSpec,
                 global_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fp32 scale (and zero point) the reference uses for each block of ``x_blocked`` (block = LAST dim).

    Returns ``(scale, zero_point)``, both of shape ``[..., 1]``; ``zero_point`` is None except for asymmetric int.
    mxint / mxfp: 2^e; mx6 / mx9: the shared block exponent 2^E (before any pair's prime bit); int: the group
    scale; nvfp4: the decoded E4M3 block scale times ``global_scale`` (computed from ``x_blocked`` when None).
    For nvfp4, `nvfp4_block_scales` gives the block scale alone, which `quantize_with_scale` takes together with
    ``global_scale`` to reproduce the reference bit for bit.
    """
    check_spec(spec)
    check_tensor(x_blocked, "x_blocked")
    if x_blocked.dim() == 0:
        raise QuantSpecError("x_blocked must have the block as its last dimension, got a 0-d tensor")
    xb = x_blocked.to(torch.float32)
    f = spec.family
    if f in ("mxint", "mxfp"):
        return mx_block_scales(xb, spec), None
    if f in ("mx6", "mx9"):
        return mx69_block_scales(xb, spec), None
    if f == "int":
        return int_block_scales(xb, spec)
    g = nvfp4_global_scale(xb) if global_scale is None else global_scale.to(torch.float32)
    return nvfp4_block_scales(xb, g) * g, None


def quantize_with_scale(x: torch.Tensor, scale: torch.Tensor, spec: QuantSpec,
                        zero_point: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                        global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Element-quantize ``x`` to ``spec``'s grid under a given (broadcastable) ``scale``; dequantized fp32 values.

    ``scale`` as returned by `block_scales` (``zero_point`` too for asymmetric int). mx6 / mx9: the last dim must
    hold whole pairs, whose prime bits are decided here against the block exponent ``scale``. nvfp4: with
    ``global_scale`` given, ``scale`` is the decoded E4M3 block scale s and the result, (q * s) * g, matches the
    reference bit for bit; without it, ``scale`` is the effective s * g and the result q * (s * g) can differ from
    the reference in the last bit. ``noise`` (stochastic rounding): U[0,1) float32 of ``x``'s shape.
    Non-finite elements of ``x`` pass through.
    """
    check_spec(spec)
    check_tensor(x)
    if not isinstance(scale, torch.Tensor):
        raise QuantSpecError(f"scale must be a tensor broadcastable to x of shape {tuple(x.shape)}")
    if spec.rounding == "stochastic":
        if noise is None:
            raise QuantSpecError(f"{spec} rounds stochastically: pass noise, U[0,1) float32 of shape {tuple(x.shape)}")
        check_noise(noise, tuple(x.shape), x.device)
    xf = x.to(torch.float32)
    scale = scale.to(torch.float32)
    f = spec.family
    if f in ("mxint", "mxfp"):
        out = mx_quantize_with_scale(xf, scale, spec, noise)
    elif f in ("mx6", "mx9"):
        out = mx69_quantize_with_scale(xf, scale, spec, noise)
    elif f == "int":
        if not spec.symmetric and zero_point is None:
            raise QuantSpecError(f"{spec} is asymmetric: pass the zero_point returned by block_scales")
        out = int_quantize_with_scale(xf, scale, spec, zero_point, noise)
    elif global_scale is not None:
        out = nvfp4_quantize_with_scale(xf, scale, global_scale, spec, noise)
    else:
        out = nvfp4_quantize_with_scale(xf, scale, torch.ones((), device=x.device), spec, noise)
    return restore_nonfinite(out, xf)
