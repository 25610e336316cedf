"""Real quantization: codes + scales (`QTensor`), their decoding, and 4-bit nibble packing.

Layout: the blocked axis is moved last and zero-padded to whole blocks, so ``codes`` has shape
``(*lead, n_blocks * block_size)`` and ``scales`` ``(*lead, n_blocks)``.
- mxfp / nvfp4 codes: uint8 bit patterns sign << (w-1) | exponent << man | mantissa (float8_e4m3fn / float8_e5m2
  bits for the 8-bit formats, OCP FP6 / FP4 otherwise). NaN / Inf are encoded only where the format has them
  (E5M2-like: both; E4M3: NaN); anything else refuses non-finite input.
- mxint codes: int8 two's complement of m (value m / 2^(w-2)); int codes: int8 / int16 (symmetric) or uint8 /
  int32 (asymmetric, 0 .. 2^w - 1).
- MX scales: uint8 E8M0 (biased exponent, 127 = 2^0); nvfp4: float8_e4m3fn block scales + fp32 ``global_scale``;
  int: fp32 scales (+ int32 ``zero_point`` when asymmetric).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ptq.errors import QuantSpecError
from ptq.formats import QuantSpec
from ptq.quantizers.common import (SUPPORTED_DTYPES, check_spec, check_tensor, exp2i, finite_abs, floor_log2,
                                   from_blocks, layout_of, to_blocks)
from ptq.quantizers.intq import int_block_scales, int_codes, int_dequant
from ptq.quantizers.mx import element_grid, mx_scale_exponent
from ptq.quantizers.nvfp4 import nvfp4_block_scales, nvfp4_elements, nvfp4_global_scale


@dataclass(frozen=True)
class QTensor:
    """A real-quantized tensor. ``shape`` / ``dtype`` are the original tensor's; see the module docstring for the
    layout of ``codes``, ``scales``, ``global_scale`` (nvfp4) and ``zero_point`` (asymmetric int)."""

    codes: torch.Tensor
    scales: torch.Tensor
    global_scale: torch.Tensor | None
    zero_point: torch.Tensor | None
    spec: QuantSpec
    shape: tuple[int, ...]
    dtype: torch.dtype


# ---- minifloat bit patterns -----------------------------------------------------------------------------------------
def _has_nan_code(spec: QuantSpec) -> bool:
    return spec.ieee_like or (spec.exp_bits, spec.man_bits) == (4, 3)


def encode_minifloat(q: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """uint8 codes of values ``q`` already on ``spec``'s minifloat grid (the sign of zero is kept)."""
    if spec.width > 8:
        raise QuantSpecError(f"{spec}: packed codes hold at most 8 bits, this format has {spec.width}; "
                             f"use fake_quantize")
    finite = torch.isfinite(q)
    a = torch.where(finite, q.abs(), torch.zeros_like(q))
    man = spec.man_bits
    e = floor_log2(a)
    normal = e >= spec.emin
    e_safe = torch.where(normal, e, torch.full_like(e, spec.emin))
    exp_field = torch.where(normal, e + spec.exp_bias, torch.zeros_like(e))
    subnormal_step = exp2i(torch.full_like(e, spec.emin - man))
    mant = torch.where(normal, a / exp2i(e_safe - man) - float(1 << man), a / subnormal_step)
    code = (exp_field << man) | mant.to(torch.int32)
    top = (1 << (spec.exp_bits + man)) - 1  # all exponent and mantissa bits set
    if not bool(finite.all()):
        inf = torch.isinf(q)
        if spec.ieee_like:
            code = torch.where(inf, torch.full_like(code, ((1 << spec.exp_bits) - 1) << man), code)
            code = torch.where(torch.isnan(q), torch.full_like(code, top), code)
        elif _has_nan_code(spec) and not bool(inf.any()):
            code = torch.where(torch.isnan(q), torch.full_like(code, top), code)
        else:
            raise QuantSpecError(f"{spec}: the tensor holds {int((~finite).sum())} NaN/Inf values that "
                                 f"E{spec.exp_bits}M{man} codes cannot encode; clean the tensor or use fake_quantize")
    sign = torch.signbit(q).to(torch.int32) << (spec.width - 1)
    return (code | sign).to(torch.uint8)


def decode_minifloat(codes: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """fp32 values of uint8 minifloat ``codes`` (inverse of `encode_minifloat`)."""
    c = codes.to(torch.int32)
    man = spec.man_bits
    mant = (c & ((1 << man) - 1)).to(torch.float32)
    exp_field = (c >> man) & ((1 << spec.exp_bits) - 1)
    normal = exp_field > 0
    e = torch.where(normal, exp_field - spec.exp_bias, torch.full_like(exp_field, spec.emin))
    sig = torch.where(normal, mant + float(1 << man), mant)
    val = sig * exp2i(e - man)
    top_exp = exp_field == (1 << spec.exp_bits) - 1
    if spec.ieee_like:
        val = torch.where(top_exp, torch.where(mant == 0, torch.inf, torch.nan), val)
    elif _has_nan_code(spec):
        val = torch.where(top_exp & (mant == float((1 << man) - 1)), torch.nan, val)
    sign = ((c >> (spec.width - 1)) & 1).bool()
    return torch.where(sign, -val, val)


# ---- E8M0 ------------------------------------------------------------------------------------------------------------
def e8m0_encode(scale: torch.Tensor) -> torch.Tensor:
    """uint8 biased exponent of power-of-two fp32 scales in [2^-127, 2^127]."""
    return (floor_log2(scale) + 127).to(torch.uint8)


def e8m0_decode(codes: torch.Tensor) -> torch.Tensor:
    """fp32 2^(code - 127); code 255 is NaN."""
    c = codes.to(torch.int32)
    return torch.where(c == 255, torch.nan, exp2i((c - 127).clamp(max=127)))


# ---- quantize / dequantize -------------------------------------------------------------------------------------------
def _refuse_nonfinite(xb: torch.Tensor, spec: QuantSpec) -> None:
    if not bool(torch.isfinite(xb).all()):
        raise QuantSpecError(f"{spec}: the tensor holds {int((~torch.isfinite(xb)).sum())} NaN/Inf values, which "
                             f"{spec.name} codes cannot encode; clean the tensor or use fake_quantize")


def quantize(x: torch.Tensor, spec: QuantSpec) -> QTensor:
    """Real-quantize ``x`` to codes and scales (mxint, mxfp, nvfp4, int); ``dequantize`` of the result equals
    ``fake_quantize(x, spec)`` bit for bit. Stochastic rounding draws the same noise as fake_quantize."""
    from ptq.quantizers.reference import resolve_noise

    check_spec(spec)
    check_tensor(x)
    f = spec.family
    if f in ("mx6", "mx9"):
        raise QuantSpecError(f"{spec}: real quantization to codes is not provided for mx6 / mx9; use fake_quantize")
    noise = resolve_noise(x, spec, None)
    layout = layout_of(x, spec)
    xb = to_blocks(x, layout)
    lead = xb.shape[:-2]
    global_scale = zero_point = None
    if f in ("mxint", "mxfp"):
        e = mx_scale_exponent(finite_abs(xb).amax(dim=-1, keepdim=True), spec)
        q = element_grid(xb / exp2i(e), spec, noise)
        if f == "mxint":
            _refuse_nonfinite(xb, spec)
            codes = (q * float(1 << spec.mxint_frac_bits)).to(torch.int8)
        else:
            codes = encode_minifloat(torch.where(torch.isfinite(xb), q, xb), spec)
        scales = (e + 127).to(torch.uint8).squeeze(-1)
    elif f == "nvfp4":
        global_scale = nvfp4_global_scale(x)
        s = nvfp4_block_scales(xb, global_scale)
        q = nvfp4_elements(xb, s, global_scale, spec, noise)
        codes = encode_minifloat(torch.where(torch.isfinite(xb), q, xb), spec)
        scales = s.squeeze(-1).to(torch.float8_e4m3fn)
    else:
        _refuse_nonfinite(xb, spec)
        scale, zp = int_block_scales(xb, spec)
        q = int_codes(xb, scale, spec, zp, noise)
        if spec.symmetric:
            codes = q.to(torch.int8 if spec.width <= 8 else torch.int16)
        else:
            codes = q.to(torch.uint8 if spec.width <= 8 else torch.int32)
            zero_point = zp.squeeze(-1).to(torch.int32)
        scales = scale.squeeze(-1)
    codes = codes.reshape(*lead, layout.padded_length)
    return QTensor(codes, scales, global_scale, zero_point, spec, tuple(x.shape), x.dtype)


def dequantize(q: QTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Decode a `QTensor` to a tensor of its original shape, in ``dtype`` (default: the original dtype)."""
    if not isinstance(q, QTensor):
        raise QuantSpecError(f"dequantize takes a QTensor (from ptq.quantizers.quantize), got {type(q).__name__}")
    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        raise QuantSpecError(f"dequantize(dtype={dtype}): choose one of float32, bfloat16, float16")
    spec = q.spec
    layout = layout_of(torch.empty(q.shape, device="meta"), spec)
    codes = q.codes.reshape(layout.blocked_shape)
    f = spec.family
    if f in ("mxint", "mxfp"):
        scale = e8m0_decode(q.scales).unsqueeze(-1)
        if f == "mxint":
            elem = codes.to(torch.float32) / float(1 << spec.mxint_frac_bits)
        else:
            elem = decode_minifloat(codes, spec)
        yb = torch.where(torch.isfinite(elem), elem * scale, elem)
    elif f == "nvfp4":
        s = q.scales.to(torch.float32).unsqueeze(-1)
        elem = decode_minifloat(codes, spec)
        yb = torch.where(torch.isfinite(elem), (elem * s) * q.global_scale.to(torch.float32), elem)
    elif f == "int":
        zp = None if q.zero_point is None else q.zero_point.to(torch.float32).unsqueeze(-1)
        yb = int_dequant(codes.to(torch.float32), q.scales.unsqueeze(-1), spec, zp)
    else:
        raise QuantSpecError(f"{spec}: no codes to decode for family {f!r}")
    return from_blocks(yb, layout).to(dtype or q.dtype)


# ---- nibble packing --------------------------------------------------------------------------------------------------
def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes (uint8 or int8; low 4 bits used) two per byte along the last dim: element 2i goes to the
    LOW nibble of byte i, element 2i+1 to the high nibble. The last dim must be even."""
    if not isinstance(codes, torch.Tensor) or codes.dtype not in (torch.uint8, torch.int8):
        raise QuantSpecError("pack_nibbles takes a uint8 / int8 tensor of 4-bit codes")
    if codes.dim() == 0 or codes.shape[-1] % 2:
        raise QuantSpecError(f"pack_nibbles needs an even last dimension, got shape {tuple(codes.shape)}; "
                             f"pad the codes to whole pairs first")
    c = codes.view(torch.uint8) & 0x0F
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, signed: bool = False) -> torch.Tensor:
    """Inverse of `pack_nibbles`: uint8 codes 0..15, or int8 -8..7 (two's complement) when ``signed``."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise QuantSpecError("unpack_nibbles takes the uint8 tensor made by pack_nibbles")
    lo = packed & 0x0F
    hi = packed >> 4
    out = torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    if signed:
        return (out.to(torch.int16) - ((out.to(torch.int16) & 0x8) << 1)).to(torch.int8)
    return out
