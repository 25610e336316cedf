"""The role layer (ptq.architectures) and the coverage report (ptq.coverage) across decoder families."""

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from families import FAMILIES, tiny_model
from ptq.architectures import MATMUL_ROLES, ROLE_TABLE, architecture, decoder_layers
from ptq.coverage import check_coverage, coverage_report
from ptq.errors import ModelError
from ptq.passes.swap import swap_modules
from ptq.recipe import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
LLAMA_NAMES = r"""
['model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj']
name = "mxint"
weight_width = 4
['model\.layers\.\d+\.mlp\.(gate|up|down)_proj']
name = "mxint"
weight_width = 4
"""


def _matmul_modules(layer: nn.Module) -> list[str]:
    return [n for n, m in layer.named_modules() if n and (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"
                                                          or any(p.dim() == 3 for p in m.parameters(recurse=False)))]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_decoder_matmul_and_attention_has_a_role(family):
    model = tiny_model(family)
    arch = architecture(model)
    assert arch.known and arch.model_type in ROLE_TABLE
    path, layers = decoder_layers(model)
    assert path == arch.layers_path and len(layers) == arch.num_layers == model.config.num_hidden_layers
    for i, layer in enumerate(layers):
        for sub in _matmul_modules(layer):
            assert arch.role_of(f"{path}.{i}.{sub}") in MATMUL_ROLES + ("router",), (family, sub)
        assert sum(arch.role_of(f"{path}.{i}.{sub}") == "attention" for sub, _ in layer.named_modules()) == 1
    assert "lm_head" in arch.roles.values()


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "phi3", "gpt2"])
def test_unknown_model_type_falls_back_to_discovery(family):
    model = tiny_model(family)
    known = architecture(model)
    model.config.model_type = "mystery"
    found = architecture(model)
    assert not found.known and found.layers_path == known.layers_path and found.roles == known.roles
    recipe = load_recipe(RECIPES / "mxfp4.toml")
    with pytest.warns(UserWarning, match="not in ptq's role table"):
        assert len(recipe.resolve(model)) > 0


def test_no_decoder_layers_is_a_clear_error():
    with pytest.raises(ModelError, match="cannot find the decoder layers"):
        architecture(nn.Sequential(nn.Linear(4, 4)))


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("recipe", ["mxfp4.toml", "w4a4kv4.toml"])
def test_shipped_role_recipes_cover_every_family_fully(family, recipe):
    """The shipped recipes quantize 100% of every family's decoder matmul weights (fused qkv / gate_up, Conv1D,
    MoE experts included), and the W4A4KV4 one the KV cache of every attention module."""
    model = tiny_model(family)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no selector may match nothing, no coverage problem
        swap_modules(model, load_recipe(RECIPES / recipe).resolve(model, strict=True))
        report = coverage_report(model)
        check_coverage(report, strict=True)
    assert report["weight_fraction"] == 1.0 and report["input_fraction"] == 1.0, report
    assert report["problems"] == []
    att = report["attention"]
    assert att["modules"] == model.config.num_hidden_layers
    assert att.get("kv_cache", 0) == (att["modules"] if recipe == "w4a4kv4.toml" else 0)


@pytest.mark.parametrize("family,fraction", [("phi3", 1 / 3), ("starcoder2", None), ("gpt_neox", 0.0)])
def test_llama_name_recipe_on_other_families_is_reported(family, fraction):
    """Llama module names reach only part of Phi-3 (o and down) and StarCoder2 (attention only) and nothing of
    GPT-NeoX: each is a coverage problem, loud by default and an error when strict."""
    model = tiny_model(family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unmatched selectors warn on their own
        mapping = load_recipe(LLAMA_NAMES).resolve(model)
    swap_modules(model, mapping)
    report = coverage_report(model)
    assert report["problems"]
    if fraction is not None:
        assert report["weight_fraction"] == pytest.approx(fraction, abs=0.05)
    with pytest.warns(UserWarning, match="coverage"):
        check_coverage(report)
    with pytest.raises(ModelError, match="strict"):
        check_coverage(report, strict=True)


def test_rotation_sites_by_role_on_fused_families():
    """The rotation search finds its candidates by role: GPT-NeoX's fused qkv and MLP linears are candidates."""
    from ptq.config import RotationSearchConfig
    from ptq.passes.rotation_search import candidate_types, rotation_sites

    model = tiny_model("gpt_neox")
    swap_modules(model, load_recipe(RECIPES / "mxfp4.toml").resolve(model, strict=True))
    types = candidate_types(rotation_sites(model), RotationSearchConfig())
    assert types == ["qkv", "o", "up", "down"]


def test_rotation_search_without_candidates_is_an_error():
    import ptq

    model = tiny_model("llama")
    recipe = load_recipe('by = "role"\n[rotation_search]\n["layers\\\\.\\\\d+\\\\.q"]\nbypass = true\n')
    with pytest.raises(ModelError, match="no candidate"):
        ptq.quantize_module_transform_pass(model, recipe, device="cpu", progress=False)


def test_coverage_counts_parameters():
    model = tiny_model("llama")
    per_layer = sum(m.weight.numel() for n, m in model.model.layers[0].named_modules() if isinstance(m, nn.Linear))
    swap_modules(model, load_recipe(LLAMA_NAMES).resolve(model))
    report = coverage_report(model)
    assert report["weight_params"] == report["weight_quantized_params"] == 2 * per_layer
    assert report["input_quantized_params"] == 0 and report["input_fraction"] == 0.0
    assert report["problems"] == [] and report["roles"]["q"] == {"modules": 2, "weight_quantized": 2,
                                                                  "input_quantized": 0}
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_shipped_w4a4kv4_recipe_decodes_like_a_full_forward(family):
    """The whole shipped W4A4KV4 recipe (weights, inputs, KV cache) on every family: incremental decode with a cache
    gives the full forward's logits (fp32, <= 1e-5), greedy generate agrees with and without a cache (where a
    length-dependent 4-bit rounding flip parts them, the flip is shown), and the
    quantization really changed the model. Per-token input blocks make every quantizer causal."""
    from test_attention_families import assert_generate_agrees_with_no_cache, incremental_logits, tokens

    model = tiny_model(family)
    plain = tiny_model(family)
    swap_modules(model, load_recipe(RECIPES / "w4a4kv4.toml").resolve(model, strict=True))
    ids = tokens()
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        assert (full - plain(ids, use_cache=False).logits).abs().max() > 1e-3
        step, _ = incremental_logits(model, ids)
        torch.testing.assert_close(step, full, rtol=0, atol=1e-5)
        assert_generate_agrees_with_no_cache(model, ids[:, :8], max_new_tokens=8)
