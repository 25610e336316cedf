"""GPT-2's Conv1D (weight stored [in, out], y = x @ W + b) as a LinearMX target (CPU, fp32, tiny random GPT-2)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from ptq.config import LinearQuantConfig
from ptq.errors import ModelError
from ptq.formats import QuantSpec
from ptq.modules.linear import LinearMX
from ptq.passes.swap import swap_modules
from ptq.quantizers import fake_quantize
from tests.families import tiny_model
from tests.test_experts import calibration_ctx, tokens

W4 = QuantSpec.mxint(4, block_size=32)
A8 = QuantSpec.mxint(8, block_size=32)
CONV = r"transformer\.h\.\d+\.(attn|mlp)\.c_(attn|proj|fc)"


pytestmark = pytest.mark.usefixtures("one_thread")


def conv_names(model):
    from transformers.pytorch_utils import Conv1D

    return [n for n, m in model.named_modules() if isinstance(m, Conv1D)]


def test_bypass_is_bit_identical_and_state_dict_unchanged():
    model = tiny_model("gpt2")
    ids = tokens()
    ref = model(ids).logits
    keys = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    names = conv_names(model)
    assert len(names) == 4 * model.config.n_layer
    info = swap_modules(model, {n: LinearQuantConfig() for n in names})
    assert info["counts"] == {"Conv1D -> LinearMX": len(names)}
    assert torch.equal(model(ids).logits, ref)
    swap_modules(model, {n: LinearQuantConfig(weight=W4, data_in=A8) for n in names})
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == keys  # [in, out] kept, same keys
    assert not torch.allclose(model(ids).logits, ref, atol=1e-4)


def test_weight_only_rtn_equals_an_independent_computation():
    model = tiny_model("gpt2")
    original = copy.deepcopy(model)
    names = conv_names(model)
    before = {n: model.get_submodule(n) for n in names}
    swap_modules(model, {n: LinearQuantConfig(weight=W4) for n in names})
    g = torch.Generator().manual_seed(0)
    for n in names:
        conv, mx = original.get_submodule(n), model.get_submodule(n)
        assert isinstance(mx, LinearMX) and mx.weight_transposed and mx.weight is before[n].weight  # shared
        in_f, out_f = conv.weight.shape
        assert (mx.in_features, mx.out_features) == (in_f, out_f)
        wq = fake_quantize(conv.weight.detach().t().contiguous(), W4)  # [out, in], blocked along in
        assert torch.equal(mx.effective_weight(), wq)
        assert not torch.equal(wq, fake_quantize(conv.weight.detach(), W4).t())  # the other axis differs
        x = torch.randn(3, 5, in_f, generator=g)
        assert torch.equal(mx(x), F.linear(x, wq, conv.bias))
    # the whole model equals GPT-2 with each Conv1D weight replaced by its quantized [in, out] matrix
    with torch.no_grad():
        for n in names:
            w = original.get_submodule(n).weight
            w.copy_(fake_quantize(w.t().contiguous(), W4).t())
    ids = tokens()
    assert torch.allclose(model(ids).logits, original(ids).logits, rtol=0, atol=1e-5)


def test_set_quantized_weight_takes_the_matmul_layout():
    model = tiny_model("gpt2")
    name = "transformer.h.0.mlp.c_fc"  # [64, 128] stored, [128, 64] as a linear
    swap_modules(model, {name: LinearQuantConfig(weight=W4, gptq=True)})
    mx = model.get_submodule(name)
    with pytest.raises(ModelError, match=r"\[out_features, in_features\]"):
        mx.set_quantized_weight(torch.zeros(64, 128))
    mx.set_quantized_weight(torch.ones(128, 64))
    assert torch.equal(mx.effective_weight(), torch.ones(128, 64))


def test_gptq_on_gpt2_lands_on_grid_and_beats_rtn():
    import ptq

    recipe = {"gptq": {"dataset": "tinystories", "nsamples": 8, "seqlen": 32, "cali_batch_size": 4},
              CONV: {"config": {"name": "mxint", "weight_width": 4, "gptq": True}}}
    model = tiny_model("gpt2")
    model, info = ptq.quantize_module_transform_pass(model, recipe, ctx=calibration_ctx())
    g = info["gptq"]
    names = conv_names(tiny_model("gpt2"))
    assert g["computed"] == [0, 1] and sorted(g["proxy_loss"]) == sorted(names)
    for n in names:
        mx = model.get_submodule(n)
        assert mx.has_gptq_weight
        q = mx.effective_weight()
        assert torch.equal(fake_quantize(q, W4), q)
        assert not torch.equal(q, fake_quantize(mx.weight_to_quantize(), W4))  # GPTQ moved it off the RTN result
    # output error of the whole model: GPTQ below RTN
    ids = tokens(4, 32, seed=5)
    ref = tiny_model("gpt2")
    rtn = tiny_model("gpt2")
    swap_modules(rtn, {n: LinearQuantConfig(weight=W4) for n in names})
    base = ref(ids).logits
    err_gptq = (model(ids).logits - base).pow(2).mean()
    err_rtn = (rtn(ids).logits - base).pow(2).mean()
    assert err_gptq < err_rtn, (float(err_gptq), float(err_rtn))


def test_packed_export_round_trip(tmp_path):
    from ptq.export import export_quantized, load_quantized

    model = tiny_model("gpt2")
    names = conv_names(model)
    swap_modules(model, {n: LinearQuantConfig(weight=W4, data_in=A8) for n in names})
    summary = export_quantized(model, tmp_path / "out", progress=False, format="ptq")
    assert summary["packed"] == sorted(names)
    loaded = load_quantized(tmp_path / "out")
    ids = tokens()
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_compressed_tensors_export_refuses_conv1d(tmp_path):
    """compressed-tensors compresses nn.Linear only: a Conv1D model is refused up front, nothing is written."""
    from ptq.errors import ModelError
    from ptq.export import export_quantized

    model = tiny_model("gpt2")
    swap_modules(model, {n: LinearQuantConfig(weight=W4) for n in conv_names(model)})
    with pytest.raises(ModelError, match="Conv1D"):
        export_quantized(model, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
