"""MX6 / MX9: AMD Quark's shared-prime-bit block format.

A block of ``block_size`` elements (16 by default) shares an 8-bit exponent E = floor(log2 amax) (amax over the
block's finite elements; clamped to >= -127, E8M0's smallest). Elements come in pairs; a pair whose two elements
both lie below 2^E (floor(log2|x|) <= E - 1, zero and non-finite elements count as below) takes the prime bit and
is encoded one exponent lower, gaining a bit of precision. Each element is a signed ``width``-bit integer
(MX6: 5 bits, MX9: 8 bits) m with |m| <= 2^(width-1) - 1 and value m * 2^(E - prime - (width - 2)).

This is bit-exact with ``quark.torch.kernel.hw_emulation.hw_emulation_interface.fake_quantize_mx6_mx9`` on
finite, normal inputs. Where the format and Quark's emulation part ways we follow the format: subnormal inputs
are kept (Quark flushes them to zero, including every fp16 value below 2^-14), so a block whose amax is tiny
still quantizes its elements exactly as a normal block would.
"""

from __future__ import annotations

import torch

from ptq.errors import QuantSpecError
from ptq.formats import E8M0_MIN_EXP, QuantSpec
from ptq.quantizers.common import exp2i, finite_abs, floor_log2, round_signed

PAIR = 2  # elements sharing one prime bit


def check_pairs(n: int, spec: QuantSpec, what: str) -> None:
    if n % PAIR:
        raise QuantSpecError(f"{spec}: {what} has {n} elements along the blocked axis; MX6/MX9 need whole pairs "
                             f"(an even count) because each pair shares one prime bit")


def mx69_block_scales(xb: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """fp32 block scale 2^E per block, shape ``[..., 1]`` (zero blocks: 2^-127)."""
    amax = finite_abs(xb).amax(dim=-1, keepdim=True)
    return exp2i(floor_log2(amax).clamp(min=E8M0_MIN_EXP))


def mx69_quantize_with_scale(x: torch.Tensor, scale: torch.Tensor, spec: QuantSpec,
                             noise: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize fp32 ``x`` (last dim: whole pairs) against the power-of-two block ``scale`` = 2^E."""
    check_pairs(x.shape[-1], spec, f"tensor of shape {tuple(x.shape)}")
    block_exp = floor_log2(scale.to(torch.float32))
    elem_exp = floor_log2(finite_abs(x))
    below = (elem_exp <= block_exp - 1).reshape(*x.shape[:-1], x.shape[-1] // PAIR, PAIR)
    prime = below.all(dim=-1, keepdim=True).expand_as(below).reshape(x.shape).to(torch.int32)
    step = exp2i(block_exp - prime - (spec.width - 2))
    limit = float((1 << (spec.width - 1)) - 1)
    m = torch.clamp(round_signed(x / step, spec.rounding, noise), -limit, limit)
    return m * step


def mx69_fake_blocks(xb: torch.Tensor, spec: QuantSpec, noise: torch.Tensor | None = None) -> torch.Tensor:
    check_pairs(xb.shape[-1], spec, "each block")
    return mx69_quantize_with_scale(xb, mx69_block_scales(xb, spec), spec, noise)
