"""Real quantization: codes, scales, bit patterns, nibble packing, and dequantize(quantize(x)) == fake_quantize(x)."""

from __future__ import annotations


import pytest
import torch

from ptq.errors import QuantSpecError
from ptq.formats import QuantSpec
from ptq.quantizers import (QTensor, decode_minifloat, dequantize, e8m0_decode, e8m0_encode, encode_minifloat,
                            fake_quantize, pack_nibbles, quantize, unpack_nibbles)
from bitcheck import bits, ids

Q = QuantSpec

CODE_SPECS = ([Q.mxint(w) for w in range(2, 9)]
              + [Q.mxfp(f) for f in ("e2m1", "e2m3", "e3m2", "e4m3", "e5m2", "e3m4", "e1m2")]
              + [Q.mxfp("e2m1", scale_rule="ceil", block_size=16), Q.nvfp4()]
              + [Q.int_(w, block_size=16, symmetric=s) for w in (2, 4, 8, 16) for s in (True, False)])


@pytest.mark.parametrize("spec", CODE_SPECS, ids=ids(CODE_SPECS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_dequantize_quantize_equals_fake_quantize(spec, dtype, gen):
    n = 3 * spec.block_size + 5  # a padded tail block
    x = (torch.randn(4, n, generator=gen) * torch.exp(torch.randn(4, n, generator=gen))).to(dtype)
    x[0, : spec.block_size] = 0
    x[1, 3] = -0.0
    q = quantize(x, spec)
    assert isinstance(q, QTensor) and q.shape == tuple(x.shape) and q.dtype == dtype and q.spec == spec
    y = dequantize(q)
    assert y.dtype == dtype
    assert torch.equal(bits(y), bits(fake_quantize(x, spec)))
    assert torch.equal(bits(dequantize(q, torch.float32)), bits(fake_quantize(x.float(), spec)))


@pytest.mark.parametrize("spec", [Q.mxfp("e2m1", axis=0, block_size=4), Q.nvfp4(axis=1),
                                  Q.int_(4, block_size=4, axis=0, symmetric=False),
                                  Q.mxint(4, rounding="stochastic", seed=3, axis=0, block_size=8)], ids=str)
def test_round_trip_other_axes_and_stochastic(spec, gen):
    x = torch.randn(21, 37, 3, generator=gen)
    assert torch.equal(bits(dequantize(quantize(x, spec))), bits(fake_quantize(x, spec)))


def test_layout_dtypes_and_ranges(gen):
    x = torch.randn(3, 5, 70, generator=gen)
    q = quantize(x, Q.mxint(4, axis=1, block_size=4))
    assert q.codes.shape == (3, 70, 8) and q.codes.dtype == torch.int8
    assert q.scales.shape == (3, 70, 2) and q.scales.dtype == torch.uint8
    assert q.codes.abs().max() <= 7 and q.global_scale is None and q.zero_point is None
    assert torch.equal(q.codes[..., 5:], torch.zeros_like(q.codes[..., 5:]))  # padding codes are zero
    q = quantize(x, Q.mxfp("e2m1"))
    assert q.codes.shape == (3, 5, 96) and q.codes.dtype == torch.uint8 and q.codes.max() <= 15
    q = quantize(x, Q.nvfp4())
    assert q.codes.shape == (3, 5, 80) and q.scales.dtype == torch.float8_e4m3fn and q.scales.shape == (3, 5, 5)
    assert q.global_scale.dtype == torch.float32 and q.global_scale.dim() == 0
    q = quantize(x, Q.int_(4, block_size=32, symmetric=False))
    assert q.codes.dtype == torch.uint8 and q.codes.max() <= 15 and q.zero_point.dtype == torch.int32
    assert q.scales.dtype == torch.float32 and q.zero_point.shape == (3, 5, 3)
    assert quantize(x, Q.int_(12)).codes.dtype == torch.int16


def test_mx_scales_are_e8m0():
    x = torch.tensor([[12.0, 3.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.5, 0.0, 0.0]])
    q = quantize(x, Q.mxfp("e2m1", block_size=4))
    assert q.scales.flatten().tolist() == [128, 0, 125]  # 2^1 (12 -> 3 - 2), zero block -> code 0, 2^-2
    # E2M1 codes: 12 / 2 = 6 -> 0b0111; 3 / 2 = 1.5 -> 0b0011; 1 / 0.25 = 4 -> 0b0110; 0.5 / 0.25 = 2 -> 0b0100
    assert q.codes[0, :2].tolist() == [0b0111, 0b0011] and q.codes[2, :2].tolist() == [0b0110, 0b0100]
    e = torch.arange(-127, 128)
    s = torch.pow(2.0, e.double()).float()
    assert torch.equal(e8m0_encode(s), (e + 127).to(torch.uint8))
    assert torch.equal(e8m0_decode((e + 127).to(torch.uint8)), s)
    assert e8m0_decode(torch.tensor([255], dtype=torch.uint8)).isnan().all()


@pytest.mark.parametrize("fmt,dt", [("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)])
def test_fp8_codes_are_torch_float8_bits(fmt, dt):
    spec = Q.mxfp(fmt)
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    ref = codes.view(dt).float()
    ours = decode_minifloat(codes, spec)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(ours.isnan(), ref.isnan())
    finite = torch.isfinite(ref)
    assert torch.equal(bits(ours[finite]), bits(ref[finite]))  # -0 included
    assert torch.equal(encode_minifloat(ref[finite], spec), codes[finite])
    nonfinite = torch.tensor([float("nan"), float("inf"), -float("inf")])
    if fmt == "e5m2":
        assert torch.equal(encode_minifloat(nonfinite, spec).view(dt).float().isnan(), torch.tensor([1, 0, 0]).bool())
        assert encode_minifloat(nonfinite[1:], spec).view(dt).float().tolist() == [float("inf"), -float("inf")]
    else:
        assert encode_minifloat(nonfinite[:1], spec).view(dt).float().isnan().all()
        with pytest.raises(QuantSpecError, match="cannot encode"):
            encode_minifloat(nonfinite, spec)


def test_fp4_fp6_code_tables():
    # OCP E2M1: exponent bias 1, codes 0..7 = 0, 0.5, 1, 1.5, 2, 3, 4, 6; bit 3 is the sign
    e2m1 = decode_minifloat(torch.arange(16, dtype=torch.uint8), Q.mxfp("e2m1"))
    assert e2m1.tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6]
    assert torch.signbit(e2m1[8])
    # OCP E2M3: max 7.5 (0b011111), smallest subnormal 1/8; E3M2: max 28 (0b011111), smallest subnormal 1/16
    e2m3 = decode_minifloat(torch.tensor([0x1F, 0x01, 0x08, 0x3F], dtype=torch.uint8), Q.mxfp("e2m3"))
    assert e2m3.tolist() == [7.5, 0.125, 1.0, -7.5]
    e3m2 = decode_minifloat(torch.tensor([0x1F, 0x01, 0x04, 0x3F], dtype=torch.uint8), Q.mxfp("e3m2"))
    assert e3m2.tolist() == [28.0, 0.0625, 0.25, -28.0]
    for fmt in ("e2m1", "e2m3", "e3m2", "e1m2", "e3m4"):
        spec = Q.mxfp(fmt)
        codes = torch.arange(1 << spec.width, dtype=torch.int32).to(torch.uint8)
        vals = decode_minifloat(codes, spec)
        assert torch.equal(encode_minifloat(vals, spec), codes), fmt
        assert vals.abs().max().item() == spec.max_normal


def test_nonfinite_codes():
    x = torch.tensor([1.0, float("nan"), -float("inf"), 2.0] * 8)
    for spec in (Q.mxfp("e2m1"), Q.mxint(4), Q.int_(4), Q.nvfp4(), Q.mxfp("e4m3")):
        with pytest.raises(QuantSpecError, match="NaN/Inf"):
            quantize(x, spec)
    spec = Q.mxfp("e5m2")
    torch.testing.assert_close(dequantize(quantize(x, spec)), fake_quantize(x, spec), rtol=0, atol=0, equal_nan=True)
    x = torch.tensor([1.0, float("nan"), -3.0, 2.0] * 8)
    spec = Q.mxfp("e4m3")
    torch.testing.assert_close(dequantize(quantize(x, spec)), fake_quantize(x, spec), rtol=0, atol=0, equal_nan=True)


def test_pack_nibbles_layout():
    codes = torch.tensor([[1, 2, 3, 4], [15, 0, 7, 8]], dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.dtype == torch.uint8 and packed.tolist() == [[0x21, 0x43], [0x0F, 0x87]]
    assert torch.equal(unpack_nibbles(packed), codes)
    signed = torch.tensor([-7, 7, -1, 0, -8, 3], dtype=torch.int8)
    assert pack_nibbles(signed).tolist() == [0x79, 0x0F, 0x38]
    assert torch.equal(unpack_nibbles(pack_nibbles(signed), signed=True), signed)


def test_pack_round_trip_random(gen):
    codes = torch.randint(0, 16, (5, 3, 64), generator=gen, dtype=torch.uint8)
    assert torch.equal(unpack_nibbles(pack_nibbles(codes)), codes)
    q = quantize(torch.randn(8, 64, generator=gen), Q.mxint(4))
    assert torch.equal(unpack_nibbles(pack_nibbles(q.codes), signed=True), q.codes)


def test_bad_inputs():
    with pytest.raises(QuantSpecError, match="even"):
        pack_nibbles(torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(QuantSpecError, match="uint8"):
        pack_nibbles(torch.zeros(4, dtype=torch.int32))
    with pytest.raises(QuantSpecError, match="uint8"):
        unpack_nibbles(torch.zeros(4, dtype=torch.int8))
    with pytest.raises(QuantSpecError, match="fake_quantize"):
        quantize(torch.randn(4, 16), Q.mx6())
    with pytest.raises(QuantSpecError, match="8 bits"):
        quantize(torch.randn(4, 32), Q.mxfp((5, 4)))
    with pytest.raises(QuantSpecError, match="int32"):
        quantize(torch.ones(4, 32, dtype=torch.int32), Q.mxint(4))
    with pytest.raises(QuantSpecError, match="QTensor"):
        dequantize(torch.ones(4))
    with pytest.raises(QuantSpecError, match="dtype"):
        dequantize(quantize(torch.randn(4, 32), Q.mxint(4)), torch.int32)
