"""The pass manager: dependency order, info with timings, unavailable passes refused, recipe forms accepted."""

from pathlib import Path

import pytest
import torch

from ptq.errors import PassUnavailableError, PtqError
from ptq.passes import base, pipeline
from ptq.passes.base import PassContext, register_pass
from ptq.passes.pipeline import plan_passes, quantize_module_transform_pass
from ptq.recipe import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
LINEAR = "['lin']\nname = \"mxint\"\nweight_width = 4\n"


@pytest.fixture
def registry(monkeypatch):
    """An empty pass registry and no built-in passes, restored after the test."""
    monkeypatch.setattr(base, "_REGISTRY", {})
    monkeypatch.setattr(pipeline, "BUILTIN_PASSES", {})
    return base._REGISTRY


def fake(name, after=(), wanted=True, log=None, result=None):
    class Fake:
        def wanted(self, recipe):
            return wanted

        def run(self, model, recipe, ctx):
            assert isinstance(ctx, PassContext)
            if log is not None:
                log.append((name, ctx.device, ctx.resume, ctx.progress))
            return {"did": name} if result is None else result

    Fake.name, Fake.after = name, tuple(after)
    return register_pass(Fake)


def test_order_follows_after_and_info_has_seconds(registry):
    log = []
    fake("c", after=("b", "a"), log=log)
    fake("b", after=("a",), log=log)
    fake("a", log=log)
    fake("skipped", wanted=False, log=log)
    model = torch.nn.Linear(4, 4)
    out, info = quantize_module_transform_pass(model, LINEAR, device="cpu", progress=False, resume=False)
    assert out is model
    assert [x[0] for x in log] == ["a", "b", "c"] == list(info)
    assert all(x[1:] == (torch.device("cpu"), False, False) for x in log)
    for name, d in info.items():
        assert d["did"] == name and isinstance(d["seconds"], float) and d["seconds"] >= 0


def test_after_on_a_pass_that_does_not_run_is_ignored(registry):
    fake("late", after=("early", "not_wanted", "nonexistent"))
    fake("not_wanted", wanted=False)
    fake("early")
    assert [p.name for p in plan_passes(load_recipe(LINEAR))] == ["early", "late"]


def test_cycle_is_an_error(registry):
    fake("x", after=("y",))
    fake("y", after=("x",))
    with pytest.raises(PtqError, match="cycle"):
        plan_passes(load_recipe(LINEAR))


def test_pass_must_return_a_dict(registry):
    fake("bad", result=[1, 2])
    with pytest.raises(PtqError, match="'bad' returned list"):
        quantize_module_transform_pass(torch.nn.Linear(2, 2), LINEAR)


def test_builtin_order_and_tie_break(registry, monkeypatch):
    # Built-ins come first in their fixed order, then other passes in registration order.
    monkeypatch.setattr(pipeline, "BUILTIN_PASSES", {
        "swap": ("ptq.errors", lambda r: True, "every recipe"),
        "gptq": ("ptq.errors", lambda r: r.gptq is not None, "[gptq]"),
    })
    fake("extra")
    fake("gptq", after=("swap", "rotation_search"), wanted=False)
    fake("swap")
    gptq_recipe = load_recipe(RECIPES / "w4a4kv4_gptq.toml")
    assert [p.name for p in plan_passes(gptq_recipe)] == ["swap", "gptq", "extra"]
    # a built-in runs exactly when its table is present, whatever its wanted() says
    assert [p.name for p in plan_passes(load_recipe(RECIPES / "w4a4kv4.toml"))] == ["swap", "extra"]


def test_missing_pass_module_is_unavailable(registry, monkeypatch):
    monkeypatch.setattr(pipeline, "BUILTIN_PASSES", {
        "gptq": ("ptq.passes._no_such_pass", lambda r: r.gptq is not None, "[gptq]")})
    with pytest.raises(PassUnavailableError, match=r"\[gptq\] asks for the gptq pass, which is not available in "
                                                   r"this version of ptq"):
        quantize_module_transform_pass(torch.nn.Linear(2, 2), RECIPES / "w4a4kv4_gptq.toml")
    # the same recipe without [gptq] does not need it
    assert plan_passes(load_recipe(RECIPES / "w4a4kv4.toml")) == []


def test_unregistered_pass_is_unavailable(registry, monkeypatch):
    monkeypatch.setattr(pipeline, "BUILTIN_PASSES", {
        "rotation_search": ("ptq.errors", lambda r: r.rotation_search is not None, "[rotation_search]")})
    with pytest.raises(PassUnavailableError, match=r"\[rotation_search\] asks for the rotation_search pass.*"
                                                   r"nothing registered"):
        plan_passes(load_recipe(RECIPES / "w4a4kv4_gptq_rot.toml"))


def test_recipe_forms_accepted(registry):
    seen = []

    class Spy:
        name, after = "spy", ()

        def wanted(self, recipe):
            return True

        def run(self, model, recipe, ctx):
            seen.append(recipe)
            return {}

    register_pass(Spy)
    path = RECIPES / "w4a4kv4.toml"
    r = load_recipe(path)
    for form in (r, path, str(path), path.read_text(), {"lin": {"config": {"name": "mxint", "weight_width": 4}}}):
        quantize_module_transform_pass(torch.nn.Linear(2, 2), form)
    assert seen[0] is r and seen[1] == r == seen[2] == seen[3]
    assert seen[4] == load_recipe(LINEAR)


def test_default_device_and_explicit_ctx(registry):
    log = []
    fake("p", log=log)
    quantize_module_transform_pass(torch.nn.Linear(2, 2), LINEAR)
    assert log[-1][1] == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ctx = PassContext(device="meta-ish", resume=False)
    quantize_module_transform_pass(torch.nn.Linear(2, 2), LINEAR, ctx=ctx)
    assert log[-1][1] == "meta-ish"


def test_real_swap_pass_on_stories260k(stories260k):
    """Integration with the real swap pass: the RTN recipe swaps exactly the selected modules."""
    pytest.importorskip("ptq.passes.swap")
    model, _ = stories260k
    recipe = load_recipe(RECIPES / "w4a4kv4.toml")
    selected = recipe.resolve(model)
    model, info = quantize_module_transform_pass(model, recipe, device="cpu", progress=False)
    assert list(info) == ["swap"] and info["swap"]["seconds"] > 0
    for name, module in model.named_modules():
        if name in selected:
            assert type(module).__name__.endswith("MX"), name
        elif isinstance(module, torch.nn.Linear):
            assert type(module) is torch.nn.Linear, name


def test_bypass_selector_over_mixed_modules_runs(stories260k):
    """A bypass selector that also matches norms / MLP containers (e.g. "leave layer 0 alone") must not break the
    swap; the later selectors still apply to the other layers, and layer 0 computes exactly as before."""
    pytest.importorskip("ptq.passes.swap")
    model, _ = stories260k
    base = (RECIPES / "w4a4kv4.toml").read_text()
    text = 'by = "role"\n' + "['layers\\.0\\..*']\nbypass = true\n\n" + base.split('by = "role"', 1)[1]
    recipe = load_recipe(text)
    assert recipe.selectors[0].bypass
    ids = torch.tensor([[1, 50, 60, 70, 80, 90, 100, 110]])
    h = torch.randn(1, 8, 64)
    pos = model.model.rotary_emb(h, torch.arange(8)[None])

    def layer0(m):
        out = m.model.layers[0](h, position_embeddings=pos)
        return out[0] if isinstance(out, tuple) else out

    want = layer0(model)
    model, info = quantize_module_transform_pass(model, recipe, device="cpu", progress=False)
    assert type(model.model.layers[1].self_attn.q_proj).__name__.endswith("MX")
    assert torch.equal(layer0(model), want)
    assert torch.isfinite(model(ids).logits).all()
