"""The swap pass: exactly the selected modules, in place, idempotent, clear errors, the RTN recipe."""

from pathlib import Path

import pytest
import torch
from torch import nn

from ptq.config import AttentionQuantConfig, LinearQuantConfig
from ptq.errors import ModelError
from ptq.formats import QuantSpec
from ptq.modules import AttentionMX, LinearMX
from ptq.passes.base import PassContext, registered_passes
from ptq.passes.swap import SwapPass, swap_modules

ROOT = Path(__file__).resolve().parents[1]
W4 = QuantSpec.mxint(4)
RTN = LinearQuantConfig(weight=W4, data_in=W4)
KV = AttentionQuantConfig(kv_cache=W4)


def module_types(model):
    return {n: type(m) for n, m in model.named_modules()}


def param_storage(model):
    return {n: (p.data_ptr(), p.dtype, p.device) for n, p in model.named_parameters()}


def test_swaps_exactly_the_mapped_modules(stories260k):
    model, _ = stories260k
    before = module_types(model)
    mapping = {"model.layers.0.self_attn.q_proj": RTN, "model.layers.3.mlp.down_proj": RTN,
               "model.layers.1.self_attn": KV}
    info = swap_modules(model, mapping)
    after = module_types(model)
    changed = {n for n in after if after[n] is not before.get(n)}
    assert changed == set(mapping)
    assert sorted(info["swapped"]) == sorted(mapping)
    assert info["counts"] == {"Linear -> LinearMX": 2, "LlamaAttention -> LlamaAttentionMX": 1}
    assert info["configs"] == {"weight=MXINT4(block=32, axis=-1), data_in=MXINT4(block=32, axis=-1)": 2,
                               "kv_cache=MXINT4(block=32, axis=-1)": 1}


def test_swap_is_in_place_keeps_parameters_and_is_idempotent(stories260k, stories260k_path):
    model, _ = stories260k
    storage = param_storage(model)
    layer0 = model.model.layers[0]
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    mapping = {n: RTN for n in names}
    mapping.update({f"model.layers.{i}.self_attn": KV for i in range(5)})
    swap_modules(model, mapping)
    assert model.model.layers[0] is layer0  # parents are edited, not copied
    assert param_storage(model) == storage
    modules = dict(model.named_modules())
    ids = torch.tensor([[1, 5, 9, 22, 40, 7]])
    with torch.no_grad():
        y1 = model(ids).logits
    info = swap_modules(model, mapping)
    assert info["swapped"] == [] and sorted(info["reconfigured"]) == sorted(mapping)
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(modules[n] is m for n, m in model.named_modules())  # reconfigured, not wrapped again
    assert not any(isinstance(c, LinearMX) for m in model.modules() if isinstance(m, LinearMX) for c in m.children())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, y1)
    # reconfiguring to bypass gives back the original model's logits bit for bit
    swap_modules(model, {n: LinearQuantConfig() for n in names} | {n: AttentionQuantConfig() for n in mapping
                                                                    if n.endswith("self_attn")})
    ref = type(model).from_pretrained(stories260k_path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)


def test_swap_keeps_dtype(stories260k):
    model, _ = stories260k
    model.to(torch.bfloat16)
    swap_modules(model, {"model.layers.0.mlp.up_proj": RTN, "model.layers.0.self_attn": KV})
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        out = model(torch.tensor([[1, 5, 9]])).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_mismatched_configs_are_clear_errors(stories260k):
    model, _ = stories260k
    with pytest.raises(ModelError, match=r"model\.layers\.0\.self_attn.*LlamaAttention.*linear config"):
        swap_modules(model, {"model.layers.0.self_attn": RTN})
    with pytest.raises(ModelError, match=r"model\.layers\.0\.mlp'.*LlamaMLP.*attention config.*LlamaAttention"):
        swap_modules(model, {"model.layers.0.mlp": KV})
    with pytest.raises(ModelError, match=r"q_proj.*Linear.*attention config"):
        swap_modules(model, {"model.layers.0.self_attn.q_proj": KV})
    before = module_types(model)
    with pytest.raises(ModelError, match="LlamaMLP"):  # checked before anything is swapped
        swap_modules(model, {"model.layers.0.self_attn": KV, "model.layers.1.mlp.up_proj": RTN,
                             "model.layers.1.mlp": RTN})
    assert module_types(model) == before
    with pytest.raises(ModelError, match="no module named"):
        swap_modules(model, {"model.layers.9.mlp.up_proj": RTN})
    with pytest.raises(ModelError, match="root"):
        swap_modules(model, {"": RTN})
    model.config._attn_implementation = "flash_attention_2"  # what a flash-loaded model reports
    with pytest.raises(ModelError, match="attn_implementation='sdpa'"):
        swap_modules(model, {"model.layers.0.self_attn": AttentionQuantConfig(softmax=W4)})
    swap_modules(model, {"model.layers.0.self_attn": KV})  # kv-only keeps whatever kernel the model uses


def test_bypass_on_an_unswappable_module_is_reported_not_swapped(stories260k):
    model, _ = stories260k
    norm = model.model.layers[0].input_layernorm
    info = swap_modules(model, {"model.layers.0.input_layernorm": AttentionQuantConfig(),
                                "model.layers.0.mlp.up_proj": AttentionQuantConfig()})
    assert info["skipped"] == ["model.layers.0.input_layernorm"]
    assert model.model.layers[0].input_layernorm is norm
    assert isinstance(model.model.layers[0].mlp.up_proj, LinearMX)  # bypass fits a linear too
    assert model.model.layers[0].mlp.up_proj.cfg == LinearQuantConfig()


def test_accelerate_hooks_move_to_the_new_modules(stories260k, stories260k_path):
    """A device_map-loaded model has accelerate hooks wrapping `forward`; the swapped modules keep the hook and run
    the quantized forward (not the original one the hook was bound to)."""
    hooks = pytest.importorskip("accelerate.hooks")
    model, _ = stories260k
    ref = type(model).from_pretrained(stories260k_path, dtype=torch.float32).eval()
    for m in (model, ref):
        hooks.add_hook_to_module(m.model.layers[0].self_attn, hooks.AlignDevicesHook(execution_device="cpu"))
        hooks.add_hook_to_module(m.model.layers[0].mlp.up_proj, hooks.AlignDevicesHook(execution_device="cpu"))
    mapping = {"model.layers.0.self_attn": KV, "model.layers.0.mlp.up_proj": RTN}
    swap_modules(model, mapping)
    for n in mapping:
        assert isinstance(model.get_submodule(n)._hf_hook, hooks.AlignDevicesHook)
    ids = torch.tensor([[1, 5, 9, 22, 40, 7]])
    for m in (ref.model.layers[0].self_attn, ref.model.layers[0].mlp.up_proj):
        hooks.remove_hook_from_module(m)
    swap_modules(ref, mapping)  # the same swap without hooks
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)
        plain = type(model).from_pretrained(stories260k_path, dtype=torch.float32).eval()
        assert not torch.equal(model(ids).logits, plain(ids).logits)


def test_swap_pass_is_registered():
    factory = registered_passes()["swap"]
    p = factory()
    assert isinstance(p, SwapPass) and p.name == "swap" and p.after == () and p.wanted(None)


def tiny_model(arch: str):
    """2 layers, hidden 64, 4 heads / 2 KV heads (GQA)."""
    import transformers
    from transformers import AutoModelForCausalLM

    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[arch]
    torch.manual_seed(0)
    cfg = cls(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("arch", ["stories260k", "llama", "mistral", "qwen2", "qwen3"])
def test_rtn_recipe_swaps_the_decoder(arch, request):
    recipe_mod = pytest.importorskip("ptq.recipe")
    recipe = recipe_mod.load_recipe(ROOT / "recipes" / "w4a4kv4.toml")
    model = request.getfixturevalue("stories260k")[0] if arch == "stories260k" else tiny_model(arch)
    n_layers = model.config.num_hidden_layers
    before = module_types(model)
    info = SwapPass().run(model, recipe, PassContext(progress=False))
    want = {f"model.layers.{i}.{p}" for i in range(n_layers)
            for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                      "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    attn = {f"model.layers.{i}.self_attn" for i in range(n_layers)}
    assert {n for n, m in model.named_modules() if isinstance(m, LinearMX)} == want
    assert {n for n, m in model.named_modules() if isinstance(m, AttentionMX)} == attn
    assert {n for n, t in module_types(model).items() if before[n] is not t} == want | attn
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, LinearMX)
    attn_cls = type(model.model.layers[0].self_attn).__mro__[2].__name__
    assert info["counts"] == {"Linear -> LinearMX": 7 * n_layers, f"{attn_cls} -> {attn_cls}MX": n_layers}
    assert info["eager_attention"] == []
    q = model.model.layers[1].self_attn.q_proj
    assert q.cfg.weight == W4 and q.cfg.data_in == W4 and q.cfg.bias is None
    assert model.model.layers[1].self_attn.cfg == AttentionQuantConfig(kv_cache=W4)
    # running the pass again reconfigures in place
    again = SwapPass().run(model, recipe, PassContext(progress=False))
    assert again["swapped"] == [] and len(again["reconfigured"]) == 8 * n_layers


# ---- shared prepared inputs -----------------------------------------------------------------------------------------
def rtn_swapped(stories260k):
    recipe = pytest.importorskip("ptq.recipe").load_recipe(ROOT / "recipes" / "w4a4kv4.toml")
    model = stories260k[0]
    info = SwapPass().run(model, recipe, PassContext(progress=False))
    return model, info


def forward_with_counts(model, ids, monkeypatch):
    """Logits, names of the linears that prepared their input, and the number of `fake_quantize` calls."""
    import ptq.quantizers
    from ptq.modules.linear import LinearMX as L

    names = {id(m): n for n, m in model.named_modules()}
    prepared, quantized = [], []
    real_prepare, real_fq = L._prepare_input, ptq.quantizers.fake_quantize
    monkeypatch.setattr(L, "_prepare_input", lambda self, x: prepared.append(names[id(self)]) or real_prepare(self, x))
    monkeypatch.setattr(ptq.quantizers, "fake_quantize", lambda t, s, **kw: quantized.append(1) or real_fq(t, s, **kw))
    with torch.no_grad():
        logits = model(ids).logits
    monkeypatch.undo()
    return logits, prepared, len(quantized)


def test_swap_links_siblings_and_sharing_is_bit_identical(stories260k, monkeypatch):
    from ptq.passes.swap import unlink_shared_inputs

    model, info = rtn_swapped(stories260k)
    n = model.config.num_hidden_layers
    assert info["shared_inputs"] == [g for i in range(n) for g in (
        [f"model.layers.{i}.self_attn.{p}_proj" for p in "qkv"],
        [f"model.layers.{i}.mlp.{p}_proj" for p in ("gate", "up")])]
    assert model.model.layers[0].self_attn.o_proj.input_memo is None
    ids = torch.tensor([[1, 5, 9, 22, 40, 7, 300, 12, 77, 3, 2, 500]])
    forward_with_counts(model, ids, monkeypatch)  # warm the weight caches: count activations only
    shared, prepared, n_shared = forward_with_counts(model, ids, monkeypatch)
    per_layer = {p.split(".", 3)[3] for p in prepared if p.startswith("model.layers.0.")}
    assert per_layer == {"self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"}
    assert len(prepared) == 4 * n
    unlink_shared_inputs(model)
    plain, prepared, n_plain = forward_with_counts(model, ids, monkeypatch)
    assert len(prepared) == 7 * n and n_plain - n_shared == 3 * n
    torch.testing.assert_close(shared, plain, rtol=0, atol=0)
    assert torch.equal(shared.view(torch.int32), plain.view(torch.int32))
    # swapping again (idempotent) links them again
    info = swap_modules(model, {"model.layers.0.mlp.up_proj": RTN})
    assert len(info["shared_inputs"]) == 2 * n


def test_sharing_with_per_linear_rotations_is_bit_identical(stories260k, monkeypatch):
    from ptq.modules.rotation import HadamardRotation
    from ptq.passes.swap import link_shared_inputs, unlink_shared_inputs

    model, _ = rtn_swapped(stories260k)
    full, block = HadamardRotation(64), HadamardRotation(64, "block", 32)
    for i, layer in enumerate(model.model.layers):  # q, k, v: equal, partly equal or all different rotations
        a = layer.self_attn
        rots = [(full, full, full), (full, block, full), (full, full, block), (None, full, full),
                (block, block, block)][i % 5]
        for lin, rot in zip((a.q_proj, a.k_proj, a.v_proj), rots):
            lin.set_rotation(rot, "activation_only" if i == 4 else "matched")
        layer.mlp.gate_proj.set_rotation(full if i % 2 else None)
    ids = torch.tensor([[1, 5, 9, 22, 40, 7, 300, 12, 77, 3, 2, 500]])
    forward_with_counts(model, ids, monkeypatch)
    shared, prepared, _ = forward_with_counts(model, ids, monkeypatch)
    unlink_shared_inputs(model)
    plain, _, _ = forward_with_counts(model, ids, monkeypatch)
    assert torch.equal(shared.view(torch.int32), plain.view(torch.int32))
    qkv = [sum(p.startswith(f"model.layers.{i}.self_attn.") and p[-6] in "qkv" for p in prepared)
           for i in range(5)]
    assert qkv == [1, 3, 2, 2, 1]
    gate_up = [sum(p.startswith(f"model.layers.{i}.mlp.") and "down" not in p for p in prepared) for i in range(5)]
    assert gate_up == [1, 2, 1, 2, 1]
    assert len(link_shared_inputs(model)) == 10


def test_gptq_results_are_identical_with_and_without_sharing(stories260k_path, tmp_path, monkeypatch):
    """GPTQ's Hessian hooks call `prepare_input` next to the forwards: sharing must not change a single weight."""
    import ptq
    import ptq.passes.swap as swap_mod
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = tmp_path / "gptq.toml"
    recipe.write_text(
        f'extends = "{ROOT / "recipes" / "w4a4kv4.toml"}"\n'
        '[gptq]\ndataset = "tinystories"\nnsamples = 4\nseqlen = 32\ncali_batch_size = 2\n'
        '[gptq.weight_config]\nweight_block_size = 32\nweight_width = 4\n'
        "['layers\\.\\d+\\.(q|k|v|qkv|o)']\ngptq = true\n"
        "['layers\\.\\d+\\.(gate|up|gate_up|down|experts)']\ngptq = true\n")
    ids = torch.tensor([[1, 5, 9, 22, 40, 7, 300, 12]])
    results = []
    for share in (True, False):
        if not share:
            monkeypatch.setattr(swap_mod, "link_shared_inputs", lambda m: swap_mod.unlink_shared_inputs(m) or [])
        model = AutoModelForCausalLM.from_pretrained(stories260k_path, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(stories260k_path)
        model, _ = ptq.quantize_module_transform_pass(model, recipe, tokenizer=tok, device="cpu", progress=False)
        linears = {n: m for n, m in model.named_modules() if isinstance(m, LinearMX)}
        assert all(m.has_gptq_weight for m in linears.values())
        assert (linears["model.layers.0.self_attn.k_proj"].input_memo is None) is not share
        with torch.no_grad():
            results.append(({n: m.effective_weight().clone() for n, m in linears.items()}, model(ids).logits))
    (w_shared, y_shared), (w_plain, y_plain) = results
    for n in w_shared:
        assert torch.equal(w_shared[n].view(torch.int32), w_plain[n].view(torch.int32)), n
    assert torch.equal(y_shared.view(torch.int32), y_plain.view(torch.int32))
