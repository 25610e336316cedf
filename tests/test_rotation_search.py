"""The rotation_search pass on stories260k (CPU): greedy choice, monotone loss, cache reuse / resume / refusal."""

import json
import time
from pathlib import Path

import pytest
import torch

from ptq.errors import CheckpointError, RecipeError

RTN = (Path(__file__).resolve().parents[1] / "recipes" / "w4a4kv4.toml").read_text()
CANDIDATES = '["o", "gate", "down", "kv_cache"]'


def _recipe(cache: Path, extra: str = "", candidates: str = CANDIDATES, gptq: str = ""):
    from ptq.recipe import load_recipe

    text = RTN + gptq + f"""
[rotation_search]
calib_nsamples = 4
calib_seqlen = 64
dataset = "tinystories"
candidates = {candidates}
cache_path = "{cache.as_posix()}"
{extra}
"""
    return load_recipe(text)


def _run(model, tok, recipe):
    from ptq.passes.pipeline import quantize_module_transform_pass

    t0 = time.perf_counter()
    model, info = quantize_module_transform_pass(model, recipe, tokenizer=tok, progress=False)
    return model, info["rotation_search"], time.perf_counter() - t0


def _fresh(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def searched(stories260k_path, data_dir, tmp_path_factory):
    """One full search (shared by the tests below) and its cache file."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(stories260k_path)
    cache = tmp_path_factory.mktemp("rot") / "decisions.json"
    recipe = _recipe(cache)
    model, info, seconds = _run(_fresh(stories260k_path), tok, recipe)
    return {"tok": tok, "cache": cache, "recipe": recipe, "model": model, "info": info, "seconds": seconds}


def test_search_chooses_and_loss_decreases_by_round(searched):
    info = searched["info"]
    print(f"\nsearch: chose {info['chosen']} in {searched['seconds']:.1f}s, {info['evaluations']} evaluations; "
          f"baseline {info['baseline_loss']:.4f} -> rounds {[round(x, 4) for x in info['round_losses']]}")
    assert info["searched"] and not info["cache_used"]
    assert len(info["chosen"]) >= 1
    losses = [info["baseline_loss"]] + info["round_losses"]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    # each kept round picked the best trial of that round, on top of the earlier choices
    for r in info["rounds"]:
        best = min(r["trials"], key=r["trials"].get)
        assert r["chosen"] in (best, None)
        assert set(r["trials"]).isdisjoint(r["base"])
    assert info["rounds"][-1]["chosen"] is None or len(info["chosen"]) == 4
    # the model is left with the chosen rotations installed
    layer = searched["model"].model.layers[0]
    assert (layer.mlp.down_proj.rotation is not None) == ("down" in info["chosen"])
    assert (layer.self_attn.v_rotation is not None) == ("kv_cache" in info["chosen"])


def test_second_run_reads_the_cache(searched, stories260k_path):
    model, info, seconds = _run(_fresh(stories260k_path), searched["tok"], searched["recipe"])
    print(f"\nrerun: {seconds:.2f}s (search took {searched['seconds']:.1f}s), cache used: {info['cache_used']}")
    assert info["cache_used"] and not info["searched"] and info["evaluations"] == 0
    assert info["chosen"] == searched["info"]["chosen"]
    assert seconds < searched["seconds"]
    with torch.no_grad():
        ids = torch.arange(1, 40).view(1, -1)
        assert torch.equal(model(input_ids=ids).logits, searched["model"](input_ids=ids).logits)


def test_interrupted_run_resumes_after_the_last_finished_round(searched, stories260k_path, tmp_path):
    state = json.loads(searched["cache"].read_text())
    kept = [r for r in state["rounds"] if r["chosen"] is not None]
    state["rounds"], state["decision"] = kept[:1], None  # as if killed during round 2
    cache = tmp_path / "partial.json"
    cache.write_text(json.dumps(state))
    recipe = _recipe(cache)
    _, info, _ = _run(_fresh(stories260k_path), searched["tok"], recipe)
    assert info["cache_used"] and info["rounds_loaded"] == 1
    assert info["chosen"] == searched["info"]["chosen"]
    n_cand = 4
    full = searched["info"]["evaluations"]
    assert info["evaluations"] == full - 1 - n_cand  # neither the baseline nor round 1 ran again


def test_stale_cache_is_refused(searched, stories260k_path):
    other = _recipe(searched["cache"], extra="improvement_eps = 0.5")
    with pytest.raises(CheckpointError, match="recipe") as e:
        _run(_fresh(stories260k_path), searched["tok"], other)
    assert "decisions.json" in str(e.value) and "delete" in str(e.value)
    model = _fresh(stories260k_path)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1.01)
    with pytest.raises(CheckpointError, match="model"):
        _run(model, searched["tok"], searched["recipe"])
    from ptq.passes.pipeline import quantize_module_transform_pass

    with pytest.raises(CheckpointError, match="resume is off"):
        quantize_module_transform_pass(_fresh(stories260k_path), searched["recipe"], tokenizer=searched["tok"],
                                       progress=False, resume=False)


def test_a_module_the_recipe_bypasses_is_not_rotated(stories260k_path, data_dir, tmp_path):
    """A bypassed o_proj has no MX block for kind = "block" to default to: the search leaves it alone (it used to
    stop with "has no MX block size") and rotates the quantized ones."""
    from ptq.recipe import load_recipe
    from transformers import AutoTokenizer

    head, body = RTN.split('by = "role"', 1)
    text = head + 'by = "role"\n[\'layers\\.0\\.o\']\nbypass = true\n' + body + f"""
[rotation_search]
calib_nsamples = 4
calib_seqlen = 64
dataset = "tinystories"
candidates = ["o"]
kind = "block"
cache_path = "{(tmp_path / 'd.json').as_posix()}"
"""
    tok = AutoTokenizer.from_pretrained(stories260k_path)
    model, info, _ = _run(_fresh(stories260k_path), tok, load_recipe(text))
    o = [layer.self_attn.o_proj for layer in model.model.layers]
    assert info["candidates"] == ["o"] and o[0].cfg.data_in is None and o[0].rotation is None
    # installing the candidate (whether or not this search kept it) touches exactly the quantized o_projs
    from ptq.config import RotationSearchConfig
    from ptq.passes.rotation_search import RotationBank, quantized_sites, rotation_sites

    cfg = RotationSearchConfig(kind="block")
    bank = RotationBank(quantized_sites(rotation_sites(model), cfg.mode), cfg)
    bank.prepare(["o"])
    bank.apply(["o"])
    assert o[0].rotation is None and all(m.rotation is not None for m in o[1:])
    # a rotation an earlier run left on the module the recipe now bypasses is cleared by the next run
    from ptq.modules.rotation import HadamardRotation

    o[0].set_rotation(HadamardRotation(o[0].in_features, "block", 32))
    _run(model, tok, load_recipe(text))
    assert o[0].rotation is None


def test_a_q_k_rotation_reaches_attentions_that_quantize_only_q_k_t(stories260k_path):
    """qk_matmul quantized with the KV cache left alone: choosing qk_matmul rotates Q and K of those attentions
    (and not V: that is kv_cache's rotation)."""
    from ptq.config import AttentionQuantConfig, RotationSearchConfig
    from ptq.formats import QuantSpec
    from ptq.passes.rotation_search import RotationBank, candidate_types, quantized_sites, rotation_sites
    from ptq.passes.swap import swap_modules

    model = _fresh(stories260k_path)
    qk = AttentionQuantConfig(qk_matmul=QuantSpec.mxint(4, block_size=8))
    swap_modules(model, {f"model.layers.{i}.self_attn": qk for i in range(len(model.model.layers))})
    cfg = RotationSearchConfig(kind="block", block_size=8)
    sites = quantized_sites(rotation_sites(model), cfg.mode)
    assert candidate_types(sites, cfg) == ["qk_matmul"]
    bank = RotationBank(sites, cfg)
    bank.prepare(["qk_matmul"])
    bank.apply(["qk_matmul"])
    attentions = [layer.self_attn for layer in model.model.layers]
    assert all(a.qk_rotation is not None and a.v_rotation is None for a in attentions)


def test_av_matmul_and_idle_candidates_are_refused(stories260k, tmp_path):
    model, tok = stories260k
    with pytest.raises(RecipeError, match="av_matmul"):
        _run(model, tok, _recipe(tmp_path / "a.json", candidates='["down", "av_matmul"]'))
    with pytest.raises(RecipeError, match="qk_matmul"):  # the RTN recipe does not quantize Q K^T
        _run(model, tok, _recipe(tmp_path / "b.json", candidates='["qk_matmul"]'))


def test_gptq_runs_after_the_search_on_rotated_weights(stories260k, data_dir, tmp_path):
    """With [gptq] the pipeline runs the search first; GPTQ then quantizes W H^T of the rotated linears."""
    from ptq.quantizers import fake_quantize
    from ptq.recipe import load_recipe

    base = (Path(__file__).resolve().parents[1] / "recipes" / "w4a4kv4_gptq.toml").as_posix()
    path = tmp_path / "rot_gptq.toml"
    path.write_text(f"""extends = "{base}"
[gptq]
dataset = "tinystories"
nsamples = 4
seqlen = 64
quantile_search = false
clip_search_y = false
checkpoint_dir = "{(tmp_path / 'gptq').as_posix()}"

[rotation_search]
calib_nsamples = 4
calib_seqlen = 64
dataset = "tinystories"
candidates = ["o", "down"]
cache_path = "{(tmp_path / 'rot.json').as_posix()}"
""")
    model, tok = stories260k
    from ptq.passes.pipeline import quantize_module_transform_pass

    model, info = quantize_module_transform_pass(model, load_recipe(path), tokenizer=tok, progress=False)
    assert list(info).index("rotation_search") < list(info).index("gptq")
    chosen = info["rotation_search"]["chosen"]
    assert chosen, info["rotation_search"]
    name = {"o": "self_attn.o_proj", "down": "mlp.down_proj"}[chosen[0]]
    lin = model.model.layers[1].get_submodule(name)
    assert lin.rotation is not None and lin.has_gptq_weight
    wq = lin.effective_weight().float()
    assert torch.equal(fake_quantize(wq, lin.cfg.weight), wq)  # on the MX grid
    w = lin.weight.detach().float()
    assert (wq - lin.rotation(w)).norm() < 0.5 * (wq - w).norm()  # in the rotated basis


def test_several_variants_pick_one_per_type(stories260k_path, data_dir, tmp_path):
    """kind / block_size lists: each round tries every (type, variant); the decision names the variant per type and
    the installed rotations are the chosen variants; a rerun reads the cache."""
    from ptq.modules.rotation import HadamardRotation

    recipe = _recipe(tmp_path / "rot.json", candidates='["o", "down", "kv_cache"]',
                     extra='kind = ["block", "full"]\nblock_size = [4, 8]')
    assert recipe.rotation_search.variants() == ["block4", "block8", "full"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(stories260k_path)
    model, info, _ = _run(_fresh(stories260k_path), tok, recipe)
    first = info["rounds"][0]
    # down_proj's 172 inputs are not a multiple of 8: that one variant is left out for it, and said so
    assert list(info["skipped_variants"]) == ["down@block8"]
    assert "not divisible by block_size 8" in info["skipped_variants"]["down@block8"]
    assert set(first["trials"]) == {f"{t}@{v}" for t in ("o", "down", "kv_cache")
                                    for v in ("block4", "block8", "full")} - {"down@block8"}
    assert info["chosen"] and set(info["variants"]) == set(info["chosen"])
    losses = [info["baseline_loss"]] + info["round_losses"]
    assert all(b < a for a, b in zip(losses, losses[1:]))
    layer = model.model.layers[0]
    mods = {"o": layer.self_attn.o_proj, "down": layer.mlp.down_proj}
    for t, variant in info["variants"].items():
        if t == "kv_cache":
            rot, size = layer.self_attn.v_rotation, layer.self_attn.head_dim
        else:
            rot, size = mods[t].rotation, mods[t].in_features
        assert isinstance(rot, HadamardRotation)
        want = HadamardRotation(size) if variant == "full" or int(variant[5:]) >= size else \
            HadamardRotation(size, "block", int(variant[5:]))
        x = torch.randn(3, size)
        assert torch.equal(rot(x), want(x)), (t, variant)
    for t, m in mods.items():
        assert (m.rotation is not None) == (t in info["chosen"])
    again, info2, _ = _run(_fresh(stories260k_path), tok, recipe)
    assert info2["evaluations"] == 0 and info2["variants"] == info["variants"]
