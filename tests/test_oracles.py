"""Bit-exact agreement with independent implementations: AMD Quark (MX6 / MX9) and torchao (MXFP8 / MXFP6 / MXFP4,
NVFP4). Each test skips when its oracle cannot be imported."""

from __future__ import annotations


import pytest
import torch

from ptq.formats import QuantSpec
from ptq.quantizers import dequantize, fake_quantize, pack_nibbles, quantize
from bitcheck import assert_bits, bits, randn

Q = QuantSpec


def ties(gen, *shape, bits_=4):
    """Values with few significant bits: many land exactly on grid midpoints (rounding ties)."""
    m = torch.randint(-(1 << bits_), 1 << bits_, shape, generator=gen).float()
    e = torch.randint(-6, 6, shape, generator=gen).float()
    return m * torch.pow(2.0, e)


def flush_subnormal(x):
    return torch.where(x.abs() < torch.finfo(x.dtype).tiny, torch.zeros_like(x), x)


# ---- AMD Quark: MX6 / MX9 --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quark_mx69():
    pytest.importorskip("quark")
    mod = pytest.importorskip("quark.torch.kernel.hw_emulation.hw_emulation_interface")
    if not hasattr(mod, "fake_quantize_mx6_mx9"):
        pytest.skip("this amd-quark has no fake_quantize_mx6_mx9")
    return mod.fake_quantize_mx6_mx9


def wide(gen, *shape):
    """Inputs spanning many binades: stresses the shared exponent."""
    return randn(gen, *shape, spread=2.0)


MX69 = [("mx6", 5), ("mx9", 8)]


@pytest.mark.parametrize("fam,qbit", MX69, ids=[f for f, _ in MX69])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape,axis", [((8, 64), -1), ((8, 64), 0), ((3, 32, 5), 1), ((2, 48, 16), -1),
                                        ((4, 40), -1), ((38, 3), 0)])
def test_quark_mx6_mx9_random(quark_mx69, fam, qbit, dtype, shape, axis, gen):
    spec = getattr(Q, fam)(axis=axis)
    for maker in (wide, ties):
        x = flush_subnormal(maker(gen, *shape).to(dtype))  # Quark flushes subnormals: compare on normal inputs
        x = torch.where(torch.isfinite(x), x, torch.ones_like(x))
        ref = quark_mx69(x, axis, 16, quant_bit=qbit, sub_block_size=2)
        assert_bits(fake_quantize(x, spec), ref)


@pytest.mark.parametrize("fam,qbit", MX69, ids=[f for f, _ in MX69])
def test_quark_mx6_mx9_edges(quark_mx69, fam, qbit, gen):
    spec = getattr(Q, fam)()
    x = randn(gen, 6, 32, spread=2.0)
    x[0] = 0  # zero blocks
    x[1, 1:] = 0  # a lone element
    x[2] = torch.pow(2.0, torch.randint(-20, 20, (32,), generator=gen).float())  # powers of two
    x[3, :16] = 1.99  # just below the carry of the top binade
    x[3, 16:] = torch.linspace(0.5, 0.999, 16)  # everything below 2^0 except nothing: all pairs take the prime bit
    x[4] *= 1e30
    x[5] *= 1e-30
    ref = quark_mx69(x, -1, 16, quant_bit=qbit, sub_block_size=2)
    assert_bits(fake_quantize(x, spec), ref)


@pytest.mark.parametrize("fam,qbit", MX69, ids=[f for f, _ in MX69])
def test_quark_mx6_mx9_nonfinite(quark_mx69, fam, qbit, gen):
    # Non-finite values are left out of the shared exponent and count as "below" for the prime bit, as in Quark;
    # compare the finite positions (and that ours propagates NaN / Inf, which the format requires).
    x = randn(gen, 4, 32, spread=1.0)
    bad = torch.rand(x.shape, generator=gen) < 0.1
    x = torch.where(bad, torch.tensor([float("nan"), float("inf"), -float("inf")])[torch.randint(0, 3, x.shape,
                                                                                             generator=gen)], x)
    ours = fake_quantize(x, getattr(Q, fam)())
    ref = quark_mx69(x, -1, 16, quant_bit=qbit, sub_block_size=2)
    assert_bits(ours[~bad], ref[~bad])
    torch.testing.assert_close(ours[bad], x[bad], rtol=0, atol=0, equal_nan=True)


def test_quark_mx9_subnormals_differ_by_design(quark_mx69):
    # Quark flushes subnormal inputs to zero before quantizing; the format can hold them (the shared exponent
    # reaches 2^-127), so ptq keeps them. Here: a block whose amax has exponent -127.
    x = torch.zeros(1, 16)
    x[0, 0] = 3 * 2.0**-128
    x[0, 2] = 2.0**-130
    ref = quark_mx69(x, -1, 16, quant_bit=8, sub_block_size=2)
    assert torch.equal(ref, torch.zeros_like(ref))
    assert_bits(fake_quantize(x, Q.mx9()), x)  # 96 and 8 steps of 2^-133: exact


# ---- torchao: MX floating point --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def torchao_mx():
    mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
    consts = pytest.importorskip("torchao.prototype.mx_formats.constants")
    return mx, consts


def _torchao_elem(consts, fmt):
    return {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2, "e2m1": torch.float4_e2m1fn_x2,
            "e2m3": consts.DTYPE_FP6_E2M3, "e3m2": consts.DTYPE_FP6_E3M2}[fmt]


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2", "e2m1", "e2m3", "e3m2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block", [32, 16])
def test_torchao_mx_floor(torchao_mx, fmt, dtype, block, gen):
    mx, consts = torchao_mx
    elem = _torchao_elem(consts, fmt)
    spec = Q.mxfp(fmt, block_size=block)
    for maker in (wide, ties):
        x = maker(gen, 16, 128).to(dtype)
        x[0, :block] = 0
        x[1, 1:block] = 0
        # torchao divides by max(2^e, 2^-126) where the E8M0 scale is 2^-127; keep blocks away from that corner
        x[2] = x[2] * 1e-30
        scale, data = mx.to_mx(x.contiguous(), elem, block, mx.ScaleCalculationMode.FLOOR)
        ref = mx.to_dtype(data, scale, elem, block, dtype)
        assert_bits(fake_quantize(x, spec), ref)
        q = quantize(x, spec)
        assert torch.equal(q.scales, scale.view(torch.uint8))
        codes = pack_nibbles(q.codes) if fmt == "e2m1" else q.codes
        assert torch.equal(codes, data.view(torch.uint8))
        assert_bits(dequantize(q), ref)


@pytest.mark.parametrize("fmt", ["e4m3", "e2m1"])
def test_torchao_mx_other_axis_and_edges(torchao_mx, fmt, gen):
    mx, consts = torchao_mx
    elem = _torchao_elem(consts, fmt)
    spec = Q.mxfp(fmt, axis=0)
    x = randn(gen, 64, 8, spread=2.0)
    top = spec.max_normal
    x[:32, 0] = torch.tensor([top, -top, top / 2] + [0.0] * 29)  # the largest finite element
    x[:32, 1] = torch.linspace(1.76, 1.99, 32) * 2.0**spec.emax / 2  # just below a carry
    x[:32, 2] = torch.pow(2.0, -torch.arange(32).float())  # powers of two
    scale, data = mx.to_mx(x.t().contiguous(), elem, 32, mx.ScaleCalculationMode.FLOOR)
    ref = mx.to_dtype(data, scale, elem, 32, torch.float32).t()
    assert_bits(fake_quantize(x, spec), ref)


# ---- torchao: NVFP4 --------------------------------------------------------------------------------------------------
def test_torchao_nvfp4_where_semantics_coincide(gen):
    """torchao's NVFP4 differs from ptq's contract in rounding order only:
    - block scale: torchao E4M3((amax_b / 6) / g) with the scale clamped to >= 2^-6 (E4M3's smallest normal);
      ptq E4M3(amax_b / (6 * g)), which may round to a subnormal or to 0 (then the block is zeros);
    - elements: torchao x * ((1 / g) / s), ptq x / (s * g);  dequant: torchao q * (g * s), ptq (q * s) * g.
    With a power-of-two global scale every one of those products is exact, so codes, scales and values must
    agree bit for bit (barring a reciprocal 1/s landing an element exactly on a tie, which random data avoids)."""
    nv = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")
    x = randn(gen, 32, 128, spread=0.5)
    k = int(torch.randint(-20, 20, (1,), generator=gen))
    amax = 2688.0 * 2.0**k  # -> g = 2^k
    x = x / x.abs().max() * (amax * 0.99)
    x[0, 0] = amax
    x[1, :16] = x[1, :16] * 1e-3  # small blocks still above 2^-6 * 6 * g
    g = nv.per_tensor_amax_to_scale(x.abs().max())
    assert g.item() == 2.0**k
    scales, data = nv.nvfp4_quantize(x, 16, g)
    t = nv.NVFP4Tensor.to_nvfp4(x, per_tensor_scale=g)
    ref = t.dequantize(torch.float32)
    q = quantize(x, Q.nvfp4())
    assert q.global_scale.item() == g.item()
    assert torch.equal(q.scales.view(torch.uint8), scales.view(torch.uint8))
    assert torch.equal(pack_nibbles(q.codes), data.view(torch.uint8))
    assert_bits(fake_quantize(x, Q.nvfp4()), ref)
