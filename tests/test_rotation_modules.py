"""Hadamard rotations inside LinearMX / AttentionMX on stories260k: exact with every quantizer bypassed.

Tolerance: with all quantizers bypassed a rotation changes only the fp32 rounding of the matmuls (and of the
transform itself), so logits must agree with the original model to |diff| <= 2e-4 absolute (logits of stories260k
are O(10); measured differences are ~1e-5); with no rotation they are bit-identical.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F

from ptq.config import AttentionQuantConfig, LinearQuantConfig, RotationSearchConfig
from ptq.formats import QuantSpec
from ptq.modules.rotation import HadamardRotation

LOGIT_ATOL = 2e-4
TYPE_SETS = [(), ("q",), ("k", "v"), ("o",), ("gate", "up"), ("down",), ("kv_cache",), ("qk_matmul",),
             ("q", "k", "v", "o", "gate", "up", "down", "kv_cache")]


def _bypassed(model):
    from ptq.passes.swap import swap_modules

    mapping = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            mapping[name] = LinearQuantConfig()
        elif name.endswith("self_attn"):
            mapping[name] = AttentionQuantConfig()
    swap_modules(model, mapping)
    return model


@pytest.fixture
def ids():
    g = torch.Generator().manual_seed(0)
    return torch.cat([torch.ones(2, 1, dtype=torch.long), torch.randint(2, 512, (2, 47), generator=g)], 1)


@pytest.mark.parametrize("kind,block,mode", [("full", None, "matched"), ("block", 4, "matched"),
                                             ("full", None, "activation_only")])
def test_any_set_of_rotations_keeps_the_logits(stories260k, ids, kind, block, mode):
    from ptq.passes.rotation_search import RotationBank, rotation_sites

    model, _ = stories260k
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    _bypassed(model)
    bank = RotationBank(rotation_sites(model), RotationSearchConfig(kind=kind, block_size=block, mode=mode))
    worst = 0.0
    for types in TYPE_SETS:
        bank.apply(types)
        with torch.no_grad():
            got = model(input_ids=ids).logits
        if not types:
            assert torch.equal(got, ref)
            continue
        diff = (got - ref).abs().max().item()
        worst = max(worst, diff)
        assert diff <= LOGIT_ATOL, (types, diff)
        assert diff > 0  # the rotation really ran (fp32 rounding differs somewhere)
    print(f"{kind}/{block}/{mode}: worst |logit diff| {worst:.2e}")


def test_down_proj_172_uses_the_williamson_order(stories260k):
    """stories260k's intermediate size 172 = 4 * 43 is itself a known order: the full rotation is one 172 x 172
    Hadamard (no block-diagonal fallback)."""
    from ptq.passes.rotation_search import RotationBank, rotation_sites

    model, _ = stories260k
    _bypassed(model)
    bank = RotationBank(rotation_sites(model), RotationSearchConfig())
    bank.apply(["down"])
    rot = model.model.layers[0].mlp.down_proj.rotation
    assert isinstance(rot, HadamardRotation) and (rot.size, rot.m, rot.p, rot.kind) == (172, 172, 1, "full")
    attn = model.model.layers[0].self_attn
    bank.apply(["kv_cache"])
    assert attn.qk_rotation.size == attn.v_rotation.size == 8
    bank.apply(["qk_matmul"])
    assert attn.qk_rotation is not None and attn.v_rotation is None
    bank.apply([])
    assert attn.qk_rotation is None and model.model.layers[0].mlp.down_proj.rotation is None


def test_matched_rotation_with_quantizers_is_q_of_rotated_operands():
    from ptq.modules.linear import LinearMX
    from ptq.quantizers import fake_quantize

    torch.manual_seed(0)
    spec = QuantSpec.mxint(4)
    lin = torch.nn.Linear(64, 16, bias=False)
    m = LinearMX.from_linear(lin, LinearQuantConfig(weight=spec, data_in=spec))
    rot = HadamardRotation(64)
    m.set_rotation(rot, "matched")
    x = torch.randn(3, 64)
    with torch.no_grad():
        expect = F.linear(fake_quantize(rot(x), spec), fake_quantize(rot(lin.weight), spec))
        assert torch.equal(m(x), expect)
        # the rotation is what changes the result: the same layer without it differs
        m.set_rotation(None)
        assert not torch.equal(m(x), expect)


def test_rotation_lowers_quantization_error_with_outliers():
    """The reason rotations exist: an outlier channel inflates its MX block's scale; rotating spreads it."""
    from ptq.quantizers import fake_quantize

    torch.manual_seed(0)
    spec = QuantSpec.mxint(4)
    x = torch.randn(256, 64)
    x[:, 5] *= 60.0
    rot = HadamardRotation(64)
    plain = (fake_quantize(x, spec) - x).pow(2).mean()
    rotated = (rot.inverse(fake_quantize(rot(x), spec)) - x).pow(2).mean()
    assert rotated < 0.5 * plain


@pytest.mark.parametrize("types", list(itertools.combinations(["q", "down", "kv_cache"], 2)))
def test_rotations_are_shared_modules(stories260k, types):
    from ptq.passes.rotation_search import RotationBank, rotation_sites

    model, _ = stories260k
    _bypassed(model)
    bank = RotationBank(rotation_sites(model), RotationSearchConfig())
    bank.apply(types)
    rots = {id(m) for m in model.modules() if isinstance(m, HadamardRotation)}
    assert len(rots) == len(types)  # one module per distinct size, shared by every layer
