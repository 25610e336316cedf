"""NVFP4: E2M1 elements in blocks of 16, an E4M3 scale per block and an fp32 scale per tensor.

g = amax / (448 * 6) over the tensor's finite elements (g = 1 when that is 0 or underflows to 0);
s = E4M3(amax_block / (6 * g)), rounded to nearest even and saturating at 448; elements are E2M1 of x / (s * g);
the dequantized value is (q * s) * g in fp32. A block whose s rounds to 0 is all zeros (q * 0).
"""

from __future__ import annotations

import torch

from ptq.formats import QuantSpec
from ptq.quantizers.common import finite_abs, true_div
from ptq.quantizers.mx import minifloat_elements

E4M3 = QuantSpec.mxfp("e4m3")  # the block-scale grid (only its element constants are used)
E2M1_MAX = 6.0
E4M3_MAX = 448.0


def nvfp4_global_scale(x: torch.Tensor) -> torch.Tensor:
    """fp32 scalar g = amax(|x| over finite elements) / (448 * 6); 1 where that is 0."""
    amax = finite_abs(x.to(torch.float32)).amax() if x.numel() else torch.zeros((), device=x.device)
    g = true_div(amax, E4M3_MAX * E2M1_MAX)
    return torch.where(g > 0, g, torch.ones_like(g))


def e4m3_round(s: torch.Tensor) -> torch.Tensor:
    """Round non-negative fp32 to the nearest-even E4M3 ("fn") value, saturating at 448; fp32 result."""
    return minifloat_elements(s, E4M3, rounding="even")


def nvfp4_block_scales(xb: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """Decoded E4M3 block scale s per block (fp32, shape ``[..., 1]``), for ``xb`` of shape ``[..., 16]``."""
    amax = finite_abs(xb).amax(dim=-1, keepdim=True)
    g = global_scale.to(torch.float32)
    return e4m3_round(amax / (E2M1_MAX * g))


def nvfp4_elements(x: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor, spec: QuantSpec,
                   noise: torch.Tensor | None = None) -> torch.Tensor:
    """E2M1 element values q of fp32 ``x`` for decoded block scale ``s`` and global scale ``g`` (signed zeros where
    s == 0, since x / 0 has no grid point)."""
    g = global_scale.to(torch.float32)
    s = block_scale.to(torch.float32)
    q = minifloat_elements(x / (s * g), spec, noise)
    return torch.where(s > 0, q, torch.copysign(torch.zeros_like(x), x))


def nvfp4_quantize_with_scale(x: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor,
                              spec: QuantSpec, noise: torch.Tensor | None = None) -> torch.Tensor:
    """E2M1-quantize fp32 ``x`` against decoded block scale ``s`` and global scale ``g``: returns (q * s) * g."""
    q = nvfp4_elements(x, block_scale, global_scale, spec, noise)
    return (q * block_scale.to(torch.float32)) * global_scale.to(torch.float32)


def nvfp4_fake_blocks(xb: torch.Tensor, spec: QuantSpec, global_scale: torch.Tensor,
                      noise: torch.Tensor | None = None) -> torch.Tensor:
    return nvfp4_quantize_with_scale(xb, nvfp4_block_scales(xb, global_scale), global_scale, spec, noise)
