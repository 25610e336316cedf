"""Shared pieces of the torch reference quantizers: input checks, the blocked layout, exact powers of two and
logarithms, element rounding, stochastic-rounding noise.

Everything here is pure and vectorised; all arithmetic is fp32 (bf16 / fp16 inputs are upcast exactly).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ptq.errors import QuantSpecError
from ptq.formats import QuantSpec

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Sentinel exponent of zero: below every fp32 exponent (the smallest subnormal is 2^-149).
ZERO_EXP = -150


def check_tensor(x, what: str = "x") -> None:
    """Refuse anything but an fp32 / bf16 / fp16 tensor, naming what was passed and the fix."""
    if not isinstance(x, torch.Tensor):
        raise QuantSpecError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        hint = "cast it with .float()" if x.dtype == torch.float64 else "quantizers take floating-point tensors"
        raise QuantSpecError(
            f"{what} has dtype {x.dtype} (shape {tuple(x.shape)}); quantizers accept float32, bfloat16 or float16 "
            f"({hint})")


def check_spec(spec) -> QuantSpec:
    if not isinstance(spec, QuantSpec):
        raise QuantSpecError(f"spec must be a ptq.formats.QuantSpec, got {type(spec).__name__}; build one with "
                             f"QuantSpec.mxint(4) / QuantSpec.mxfp('e2m1') / ...")
    return spec


def normalize_axis(axis: int, x: torch.Tensor, spec: QuantSpec | None = None) -> int:
    if x.dim() == 0:
        raise QuantSpecError("cannot block-quantize a 0-d tensor: give it at least one dimension (x.reshape(1))")
    if not -x.dim() <= axis < x.dim():
        where = f" of {spec}" if spec is not None else ""
        raise QuantSpecError(f"axis {axis}{where} is out of range for a tensor of shape {tuple(x.shape)}")
    return axis % x.dim()


@dataclass(frozen=True)
class BlockLayout:
    """How a tensor maps to its blocked form ``[*lead, n_blocks, block_size]`` (blocked axis moved last, tail
    zero-padded). ``moved_shape`` is the shape after moving the axis last, before padding."""

    axis: int
    moved_shape: tuple[int, ...]
    block_size: int

    @property
    def length(self) -> int:
        return self.moved_shape[-1]

    @property
    def n_blocks(self) -> int:
        return -(-self.length // self.block_size)

    @property
    def padded_length(self) -> int:
        return self.n_blocks * self.block_size

    @property
    def blocked_shape(self) -> tuple[int, ...]:
        return (*self.moved_shape[:-1], self.n_blocks, self.block_size)


def layout_of(x: torch.Tensor, spec: QuantSpec) -> BlockLayout:
    axis = normalize_axis(spec.axis, x, spec)
    moved = list(x.shape)
    moved.append(moved.pop(axis))
    return BlockLayout(axis, tuple(moved), spec.block_size)


def to_blocks(x: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """fp32 view of ``x`` in the blocked layout ``[*lead, n_blocks, block_size]`` (tail zero-padded)."""
    y = x.to(torch.float32).movedim(layout.axis, -1)
    pad = layout.padded_length - layout.length
    if pad:
        y = torch.nn.functional.pad(y, (0, pad))
    return y.reshape(layout.blocked_shape)


def from_blocks(y: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Inverse of `to_blocks`: drop the padding and move the axis back (dtype unchanged)."""
    y = y.reshape(*layout.moved_shape[:-1], layout.padded_length)[..., : layout.length]
    return y.movedim(-1, layout.axis)


def exp2i(e: torch.Tensor) -> torch.Tensor:
    """Exactly 2^e as fp32, for integer ``e`` in [-149, 127], built from the bit pattern (no libm rounding)."""
    e = e.to(torch.int32)
    normal_bits = (e + 127).clamp(min=1) << 23
    subnormal_bits = torch.ones_like(e) << (e + 149).clamp(0, 22)
    return torch.where(e >= -126, normal_bits, subnormal_bits).view(torch.float32)


def floor_log2(a: torch.Tensor) -> torch.Tensor:
    """Exact floor(log2(a)) as int32 for finite a >= 0 (subnormals included); `ZERO_EXP` for a == 0.

    frexp gives a = m * 2^k with m in [0.5, 1), so floor(log2 a) = k - 1 without any floating-point logarithm.
    """
    a = a.to(torch.float32)
    _, k = torch.frexp(a)
    return torch.where(a > 0, k.to(torch.int32) - 1, torch.full_like(k, ZERO_EXP, dtype=torch.int32))


def surely_finite(x: torch.Tensor) -> bool:
    """True only when every element of ``x`` is finite, decided by one reduction instead of an ``isfinite`` mask.

    A finite sum proves it (NaN and +-Inf poison a sum); a sum that overflows returns False, which only sends the
    caller down its general path. On CUDA it always returns False: reading the answer would synchronise the device,
    and the CPU is where the saved mask passes matter (the torch reference is the CPU path)."""
    return x.device.type == "cpu" and x.numel() > 0 and bool(torch.isfinite(x.sum()))


def finite_abs(x: torch.Tensor) -> torch.Tensor:
    """|x| with NaN / +-Inf replaced by 0: non-finite values never enter a scale (one bad value must not erase the
    other elements of its block)."""
    if surely_finite(x):
        return x.abs()
    return torch.where(torch.isfinite(x), x.abs(), torch.zeros((), dtype=x.dtype, device=x.device))


def round_magnitude(r: torch.Tensor, rounding: str, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Round a non-negative fp32 tensor to integers.

    even: half to even; nearest: half away from zero; floor: truncate; stochastic: floor(r + u), u ~ U[0, 1) given.
    """
    if rounding == "even":
        return torch.round(r)
    if rounding == "nearest":
        f = torch.floor(r)
        # r - f is exact for the magnitudes quantizers see, unlike r + 0.5 near 2^23
        return f + (r - f >= 0.5).to(r.dtype)
    if rounding == "floor":
        return torch.floor(r)
    if rounding == "stochastic":
        if noise is None:
            raise QuantSpecError("stochastic rounding needs a noise tensor (U[0,1) float32)")
        return torch.floor(r + noise)
    raise QuantSpecError(f"unknown rounding {rounding!r}")


def round_signed(v: torch.Tensor, rounding: str, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Round the magnitude of ``v`` (see `round_magnitude`) and keep its sign, the sign of zero included."""
    return torch.copysign(round_magnitude(v.abs(), rounding, noise), v)


def restore_nonfinite(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """NaN stays NaN and +-Inf stays +-Inf, element-wise."""
    if surely_finite(x):
        return out
    return torch.where(torch.isfinite(x), out, x.to(out.dtype))


def noise_shape(x: torch.Tensor, spec: QuantSpec) -> tuple[int, ...]:
    """Shape of the stochastic-rounding noise for ``fake_quantize(x, spec)``: the padded blocked shape
    ``(*x.movedim(spec.axis, -1).shape[:-1], n_blocks, spec.block_size)`` with n_blocks = ceil(len / block_size)."""
    return layout_of(x, spec).blocked_shape


def make_noise(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """U[0,1) float32 noise of `noise_shape` from ``torch.Generator(device=x.device).manual_seed(spec.seed)``."""
    gen = torch.Generator(device=x.device).manual_seed(int(spec.seed))
    return torch.rand(noise_shape(x, spec), generator=gen, device=x.device, dtype=torch.float32)


def check_noise(noise, shape: tuple[int, ...], device: torch.device, what: str = "noise") -> torch.Tensor:
    if not isinstance(noise, torch.Tensor) or noise.dtype != torch.float32:
        raise QuantSpecError(f"{what} must be a float32 tensor of U[0,1) values with shape {shape}")
    if tuple(noise.shape) != tuple(shape):
        raise QuantSpecError(f"{what} has shape {tuple(noise.shape)}, expected {tuple(shape)} (the padded blocked "
                             f"shape: blocked axis last, n_blocks, block_size); see ptq.quantizers.noise_shape")
    if noise.device != device:
        raise QuantSpecError(f"{what} is on {noise.device} but the tensor is on {device}; move it with .to()")
    return noise


def true_div(a: torch.Tensor, b: float) -> torch.Tensor:
    """``a / b`` correctly rounded on every device.

    PyTorch's CUDA kernel turns division by a Python (CPU) scalar into a multiplication by its reciprocal, which is
    not correctly rounded; dividing by a same-device 0-dim tensor keeps a true division, as on the CPU and in the
    Triton kernels (div_rn)."""
    return a / torch.full((), b, dtype=a.dtype, device=a.device)
