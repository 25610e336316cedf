"""The CPU shortcuts of the torch reference quantizers give the same bits as the general path."""

import pytest
import torch

import ptq.quantizers.common as common
import ptq.quantizers.mx as mx
from ptq.formats import QuantSpec
from ptq.quantizers import reference_fake_quantize

SPECS = [QuantSpec.mxint(4), QuantSpec.mxint(8), QuantSpec.mxfp("e2m1"), QuantSpec.mxfp("e4m3"), QuantSpec.mx6(),
         QuantSpec.nvfp4(), QuantSpec.int_(4, block_size=32, symmetric=False)]


def test_surely_finite_only_when_proved():
    assert common.surely_finite(torch.randn(100))
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = torch.randn(100)
        x[17] = bad
        assert not common.surely_finite(x)
    assert not common.surely_finite(torch.full((4,), 3e38))  # finite, but the sum overflows: general path
    assert not common.surely_finite(torch.empty(0))


def _general_mxint(v, spec, noise=None, rounding=None):  # the compare-and-where form of MXINT's +0
    rounding = rounding or spec.rounding
    frac = float(1 << spec.mxint_frac_bits)
    m = torch.clamp(common.round_magnitude(v.abs() * frac, rounding, noise), max=float(spec.int_levels))
    return torch.where(m > 0, torch.copysign(m, v), torch.zeros_like(m)) / frac


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("specials", [False, True])
def test_shortcuts_are_bit_identical(spec, specials, monkeypatch, gen):
    x = torch.randn(64, 96, generator=gen) * torch.logspace(-6, 4, 96)
    x[3, :5] = 0.0
    x[4, :7] = -0.0
    if specials:
        x[0, 1], x[1, 40], x[2, 70] = float("nan"), float("inf"), float("-inf")
    fast = reference_fake_quantize(x, spec)
    monkeypatch.setattr(common, "surely_finite", lambda t: False)
    monkeypatch.setattr(mx, "surely_finite", lambda t: False)
    monkeypatch.setattr(mx, "mxint_elements", _general_mxint)
    slow = reference_fake_quantize(x, spec)
    assert torch.equal(fast.view(torch.int32), slow.view(torch.int32))
