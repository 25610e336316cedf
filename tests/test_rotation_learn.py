"""rotation_learn: straight-through gradients, the [rotation_learn] table, exactness of the fused rotations across
families, orthogonality, a loss that goes down on stories260k W4A4KV4, determinism, checkpoint / resume."""

from pathlib import Path

import pytest
import torch

from ptq.errors import CheckpointError, ModelError, RecipeError

ROOT = Path(__file__).resolve().parents[1]
RTN = (ROOT / "recipes" / "w4a4kv4.toml").read_text()


# ---- straight-through gradients ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("spec_args", [dict(family="mxint", width=4, block_size=32),
                                       dict(family="mxfp", width=4, exp_bits=2, man_bits=1, block_size=32),
                                       dict(family="nvfp4", width=4, exp_bits=2, man_bits=1, block_size=16)])
def test_fake_quantize_passes_gradients_straight_through(backend, spec_args):
    from ptq.formats import QuantSpec
    from ptq.quantizers import fake_quantize

    spec = QuantSpec(**spec_args)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 3
    plain = fake_quantize(x, spec, backend=backend)
    xg = x.clone().requires_grad_(True)
    y = fake_quantize(xg, spec, backend=backend)
    assert y.requires_grad and torch.equal(y.detach().view(torch.int32), plain.view(torch.int32))  # same bits
    y.sum().backward()
    assert torch.equal(xg.grad, torch.ones_like(x))
    with torch.no_grad():  # no graph without grad mode
        assert not fake_quantize(xg, spec, backend=backend).requires_grad


@pytest.mark.parametrize("size,kind,block", [(64, "full", None), (96, "block", 32), (12, "full", None)])
def test_kernel_hadamard_rotation_has_the_transposed_gradient(size, kind, block):
    from ptq.modules.rotation import HadamardRotation

    x = torch.randn(3, size, generator=torch.Generator().manual_seed(1))
    g = torch.randn(3, size, generator=torch.Generator().manual_seed(2))
    grads = {}
    for backend in ("torch", "triton"):
        rot = HadamardRotation(size, kind, block, backend=backend)
        for inverse in (False, True):
            xg = x.clone().requires_grad_(True)
            y = rot.inverse(xg) if inverse else rot(xg)
            (y * g).sum().backward()
            grads[backend, inverse] = xg.grad
    h = HadamardRotation(size, kind, block).matrix(torch.float32)
    for backend in ("torch", "triton"):  # y = x H^T -> dx = g H ; y = x H -> dx = g H^T
        torch.testing.assert_close(grads[backend, False], g @ h, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grads[backend, True], g @ h.T, rtol=1e-5, atol=1e-5)


# ---- the recipe table -------------------------------------------------------------------------------------------

LEARN = RTN + """
[rotation_learn]
steps = 7
lr = 0.002
loss = "ce"
r1_block_size = 32
untie_embeddings = true
"""


def test_recipe_table_round_trips_and_plans_the_pass():
    from ptq.passes.pipeline import plan_passes
    from ptq.recipe import load_recipe, save_recipe

    r = load_recipe(LEARN)
    assert r.rotation_learn.steps == 7 and r.rotation_learn.r1_block_size == 32
    assert load_recipe(save_recipe(r)) == r
    assert load_recipe(save_recipe(r)).rotation_learn == r.rotation_learn
    rot = (ROOT / "recipes" / "w4a4kv4_gptq_rot.toml").as_posix()
    full = load_recipe(f'extends = "{rot}"\n[rotation_learn]\nuntie_embeddings = true\n')
    assert [p.name for p in plan_passes(full)] == ["swap", "rotation_search", "rotation_learn", "gptq"]


@pytest.mark.parametrize("bad,path", [
    ("stepz = 3", "rotation_learn.stepz"),
    ("loss = 'mse'", "rotation_learn.loss"),
    ("lr = -1.0", "rotation_learn.lr"),
    ("rotations = ['r1', 'r3']", "rotation_learn.rotations"),
    ("smooth = ['qkv', 'o']", "rotation_learn.smooth"),
    ("smooth = ['down', 'down']", "rotation_learn.smooth"),
    ("smooth_lr = 0.0", "rotation_learn.smooth_lr"),
    ("r1_block_size = 0", "rotation_learn.r1_block_size"),
])
def test_recipe_errors_name_the_key(bad, path):
    from ptq.recipe import load_recipe

    with pytest.raises(RecipeError, match=path.replace(".", r"\.")):
        load_recipe(RTN + f"\n[rotation_learn]\n{bad}\n")


def test_a_table_that_learns_nothing_is_refused():
    from ptq.recipe import load_recipe

    with pytest.raises(RecipeError, match=r"\[rotation_learn\].*nothing to learn"):
        load_recipe(RTN + "\n[rotation_learn]\nrotations = []\n")
    smooth_only = load_recipe(RTN + "\n[rotation_learn]\nrotations = []\nsmooth = ['down']\n")
    assert smooth_only.rotation_learn.smooth == ["down"]


def test_shipped_recipe_validates():
    from ptq.recipe import load_recipe

    r = load_recipe(ROOT / "recipes" / "w4a4kv4_gptq_learn.toml")
    assert r.rotation_learn is not None and r.gptq is not None and r.rotation_search is not None
    assert r.rotation_learn.rotations == ["r2"] and r.rotation_learn.r2_block_size == 1


# ---- exactness of the rotations (no quantization) ---------------------------------------------------------------

def _randomise(rots, scale=0.3, seed=1):
    from ptq.passes.rotation_learn import randomise

    randomise(rots, scale, seed)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "granite"])
def test_fused_rotations_keep_the_function(family):
    """Far from the start (a random rotation), the virtual forward and the fused model equal the original."""
    from families import tiny_model

    from ptq.config import RotationLearnConfig
    from ptq.passes.rotation_learn import LearnedRotations, discover_layout

    model = tiny_model(family)
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        rots = LearnedRotations(discover_layout(model), RotationLearnConfig(untie_embeddings=True), torch.device("cpu"))
        _randomise(rots)
        with rots.installed(model):
            virtual = model(input_ids=ids).logits
        r1 = rots.r1.matrix()
        assert not torch.allclose(r1, rots.r1.base, atol=0.1)  # really rotated away from the Hadamard start
        rots.fuse()
        fused = model(input_ids=ids).logits
    scale = ref.abs().max()
    assert (virtual - ref).abs().max() <= 1e-5 * scale
    assert (fused - ref).abs().max() <= 1e-5 * scale
    layer = model.model.layers[0]
    assert torch.equal(layer.input_layernorm.weight, torch.ones_like(layer.input_layernorm.weight))


SMOOTH_ALL = ["qkv", "gate_up", "down"]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "granite"])
@pytest.mark.parametrize("kw", [dict(rotations=[], smooth=SMOOTH_ALL), dict(rotations=["r2"], smooth=["down"]),
                                dict(rotations=["r1", "r2"], smooth=SMOOTH_ALL, untie_embeddings=True)],
                         ids=["smooth", "r2+down", "r1+r2+smooth"])
def test_fused_smoothing_keeps_the_function(family, kw):
    """Random scales (e^N(0, 0.5^2) per channel) with or without rotations: virtual and fused forward are exact, and
    the scales really moved what the norms and linears hold."""
    from families import tiny_model

    from ptq.config import RotationLearnConfig
    from ptq.passes.rotation_learn import LearnedRotations, discover_layout

    model = tiny_model(family)
    layer = model.model.layers[0]
    before = {"norm": layer.input_layernorm.weight.clone(), "up": layer.mlp.up_proj.weight.clone()}
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        rots = LearnedRotations(discover_layout(model), RotationLearnConfig(**kw), torch.device("cpu"))
        assert len(rots.smooth) == len(kw["smooth"])
        _randomise(rots, scale=0.5)
        with rots.installed(model):
            virtual = model(input_ids=ids).logits
        rots.fuse()
        fused = model(input_ids=ids).logits
    scale = ref.abs().max()
    assert (virtual - ref).abs().max() <= 1e-5 * scale
    assert (fused - ref).abs().max() <= 1e-5 * scale
    if "qkv" in kw["smooth"]:
        want = (torch.ones_like(before["norm"]) if "r1" in kw["rotations"] else before["norm"]) / \
            rots.smooth["qkv"][0].detach().exp().float()
        assert torch.allclose(layer.input_layernorm.weight, want, rtol=1e-6)
    if "down" in kw["smooth"] and "r1" not in kw["rotations"]:
        s = rots.smooth["down"][0].detach().exp().float()
        cols = rots.smooth["gate_up"][0].detach().exp().float() if "gate_up" in kw["smooth"] else 1.0
        assert torch.allclose(layer.mlp.up_proj.weight, before["up"] * cols / s[:, None], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", ["olmo2", "phi3", "cohere", "mixtral"])
def test_other_architectures_are_refused(family):
    from families import tiny_model

    from ptq.passes.rotation_learn import discover_layout

    with pytest.raises(ModelError, match="rotation_learn"):
        discover_layout(tiny_model(family))


def test_hadamard_start_is_the_hadamard_rotation():
    from ptq.modules.rotation import HadamardRotation
    from ptq.passes.rotation_learn import hadamard_start

    x = torch.randn(5, 96, dtype=torch.float64)
    r = hadamard_start(96, 32, None)
    torch.testing.assert_close(x @ r, x @ HadamardRotation(96, "block", 32).matrix().T)  # = rot(x)
    signed = hadamard_start(96, None, torch.Generator().manual_seed(0))
    torch.testing.assert_close(signed @ signed.T, torch.eye(96, dtype=torch.float64))
    with pytest.raises(ModelError, match="block_size"):
        hadamard_start(96, 40, None)


def test_block_one_starts_from_the_identity():
    from ptq.passes.rotation_learn import hadamard_start

    assert torch.equal(hadamard_start(96, 1, None), torch.eye(96, dtype=torch.float64))
    signed = hadamard_start(96, 1, torch.Generator().manual_seed(0))
    assert torch.equal(signed.abs(), torch.eye(96, dtype=torch.float64)) and (signed.diagonal() < 0).any()


@pytest.mark.parametrize("key,site", [("r1_block_size", "q_proj"), ("r2_block_size", "o_proj"),
                                      ("r2_block_size", "attention")])
def test_a_start_that_an_online_rotation_undoes_is_refused(key, site):
    """A block-32 Hadamard start under an online block-32 Hadamard (what rotation_search installs) composes to a
    +-1 permutation: refused, naming the key and the fix; the identity or a start the rotation does not undo pass."""
    from families import tiny_model

    from ptq.config import RotationLearnConfig
    from ptq.modules.rotation import HadamardRotation
    from ptq.passes.rotation_learn import discover_layout, refuse_cancelling_starts
    from ptq.passes.swap import swap_modules
    from ptq.recipe import load_recipe

    model = tiny_model("llama")  # hidden 64, head_dim 32
    swap_modules(model, load_recipe(RTN).resolve(model))
    attention = model.model.layers[1].self_attn
    if site == "attention":  # the K / V cache rotation along head_dim
        attention.set_rotations(None, HadamardRotation(32, "full"))
    else:
        linear = attention.get_submodule(site)
        linear.set_rotation(HadamardRotation(linear.in_features, "block", 32))
    layout = discover_layout(model)
    with pytest.raises(RecipeError, match=rf"{key} = 32.*layer 1 {site}.*Set {key} = 1"):
        refuse_cancelling_starts(model, layout, RotationLearnConfig(**{key: 32}))
    # the identity and block 16 leave a real rotation; so does r1's full 64-wide start (r2's full start is the
    # head_dim 32 block itself, refused too)
    for ok in (1, 16) + ((None,) if key == "r1_block_size" else ()):
        refuse_cancelling_starts(model, layout, RotationLearnConfig(**{key: ok}))
    if key == "r2_block_size":
        with pytest.raises(RecipeError, match="r2_block_size = None: the start is the block-32 Hadamard"):
            refuse_cancelling_starts(model, layout, RotationLearnConfig(r2_block_size=None))


# ---- the pass on stories260k ------------------------------------------------------------------------------------

SMALL = """
[rotation_learn]
steps = {steps}
batch_size = {batch}
lr = {lr}
loss = "{loss}"
calib_nsamples = {n}
calib_seqlen = {seqlen}
dataset = {dataset}
untie_embeddings = true
checkpoint_every = {every}
{extra}
"""


def _learn_recipe(steps=3, lr=1e-3, loss="kl", n=2, seqlen=32, batch=2, dataset='"tinystories"', every=1,
                  extra=""):
    from ptq.recipe import load_recipe

    return load_recipe(RTN + SMALL.format(steps=steps, lr=lr, loss=loss, n=n, seqlen=seqlen, batch=batch,
                                          dataset=dataset, every=every, extra=extra))


def _fresh(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _run(path, tok, recipe, **kw):
    from ptq.passes.pipeline import quantize_module_transform_pass

    return quantize_module_transform_pass(_fresh(path), recipe, tokenizer=tok, progress=False, device="cpu", **kw)


@pytest.fixture(scope="module")
def tok(stories260k_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(stories260k_path)


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("smooth", [False, True])
def test_learned_model_is_exact_without_quantization_and_orthogonal(stories260k_path, tok, data_dir, smooth):
    from ptq.passes.rotation_learn import quantization_bypassed

    ids = torch.cat([torch.ones(1, 1, dtype=torch.long), torch.randint(3, 512, (1, 63))], 1)
    with torch.no_grad():
        ref = _fresh(stories260k_path)(input_ids=ids).logits
    rots = {}
    import ptq.passes.rotation_learn as rl

    orig = rl.LearnedRotations.fuse

    def keep(self):
        rots["r"] = self
        return orig(self)

    rl.LearnedRotations.fuse = keep
    try:
        extra = "keep_best = false" + ("\nsmooth = ['qkv', 'gate_up', 'down']\nsmooth_lr = 0.01" if smooth else "")
        model, info = _run(stories260k_path, tok, _learn_recipe(steps=3, extra=extra))
    finally:
        rl.LearnedRotations.fuse = orig
    learned = rots["r"]
    assert info["rotation_learn"]["untied_embeddings"]
    assert model.lm_head.weight is not model.model.embed_tokens.weight and not model.config.tie_word_embeddings
    mats = [learned.r1.matrix()] + [r.matrix() for r in learned.r2]
    assert learned.r1.param.abs().max() > 0  # trained
    assert len(learned.smooth) == (3 if smooth else 0) and all(p.abs().max() > 0 for p in learned.smooth.parameters())
    for r in mats:  # orthogonal in float32, as the forward uses them
        r32 = r.float()
        assert (r32 @ r32.T - torch.eye(r.shape[0])).abs().max() <= 1e-5
    with torch.no_grad(), quantization_bypassed(model):
        got = model(input_ids=ids).logits
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


def _held_out_case(stories260k_path, tok, data_dir, n: int) -> dict:
    """W4A4KV4 with r1 / r2 learned for 0 and 100 steps on ``n`` windows of 128 tokens of the first half of
    TinyStories; CE and KL of each result on 64 windows of the second half."""
    import json

    from ptq.data import eval_windows, tokenize
    from ptq.passes.rotation_learn import calibration_losses

    text = (data_dir / "tinystories" / "validation.txt").read_text()
    calib, held = text[: len(text) // 2], text[len(text) // 2:]
    windows = eval_windows(tokenize(tok, held), 128, bos_id=1)[:64]
    out = {}
    for steps in (0, 100):
        recipe = _learn_recipe(steps=steps, n=n, seqlen=128, batch=4, lr=1e-3, dataset=json.dumps([calib]),
                               extra="r1_block_size = 32")
        model, info = _run(stories260k_path, tok, recipe)
        out[steps] = (info["rotation_learn"], calibration_losses(model, windows, 8, "cpu"))
    learned = out[100][0]
    print(f"\n{n} windows: calibration KL {learned['calib_kl_start']:.4f} -> {learned['calib_kl_end']:.4f} (kept step "
          f"{learned['kept_step']}); held-out KL {out[0][1]['kl']:.4f} -> {out[100][1]['kl']:.4f}, CE "
          f"{out[0][1]['ce']:.4f} -> {out[100][1]['ce']:.4f}")
    return out


@pytest.mark.slow
def test_kept_rotations_are_trained_ones_better_on_the_calibration_data(stories260k_path, tok, data_dir):
    """Real W4A4KV4 recipe: the kept rotations (lowest loss on all calibration windows, every 25 steps) are trained
    ones and better than the Hadamard start on the calibration data; step 0 is exactly the start."""
    out = _held_out_case(stories260k_path, tok, data_dir, n=32)
    learned = out[100][0]
    assert out[0][0]["calib_kl_end"] == pytest.approx(learned["calib_kl_start"], abs=1e-6)
    assert learned["kept_step"] > 0 and learned["calib_kl_end"] < learned["calib_kl_start"]


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason="known weakness (issue 18): learned rotations do not reliably generalise. "
                   "2026-12-07, 2-core CPU: held-out KL 2.1813 -> 2.1875 (16 calibration windows), -> 2.1041 (32), "
                   "-> 2.1901 (64); calibration KL improved in all three")
def test_learned_rotations_do_not_get_worse_on_held_out_text(stories260k_path, tok, data_dir):
    out = _held_out_case(stories260k_path, tok, data_dir, n=16)
    assert out[100][1]["kl"] <= out[0][1]["kl"]


@pytest.mark.slow  # eight runs of the pass (about 20 s on an idle 2-core CPU)
def test_deterministic_and_resume_equals_uninterrupted(stories260k_path, tok, data_dir, tmp_path, monkeypatch):
    import ptq.passes.rotation_learn as rl

    sm = "smooth = ['qkv', 'down']\nsmooth_lr = 0.01\n"  # scales and their own optimiser group resume too
    recipe = _learn_recipe(steps=3, extra=sm)
    a, _ = _run(stories260k_path, tok, recipe)
    b, _ = _run(stories260k_path, tok, recipe)
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    ck = tmp_path / "learn.pt"
    with_ck = _learn_recipe(steps=3, extra=f'{sm}checkpoint_path = "{ck.as_posix()}"', every=1)

    class Crash(Exception):
        pass

    def crash(step):
        if step == 2:
            raise Crash

    monkeypatch.setattr(rl, "_after_step", crash)
    with pytest.raises(Crash):
        _run(stories260k_path, tok, with_ck)
    monkeypatch.setattr(rl, "_after_step", lambda step: None)
    c, info = _run(stories260k_path, tok, with_ck)
    assert info["rotation_learn"]["resumed_at"] == 2 and info["rotation_learn"]["trained_steps"] == 1
    wc = _weights(c)
    assert all(torch.equal(wa[k], wc[k]) for k in wa)
    d, info = _run(stories260k_path, tok, with_ck)  # finished: fused from the checkpoint, nothing trained
    assert info["rotation_learn"]["trained_steps"] == 0
    assert all(torch.equal(wa[k], v) for k, v in _weights(d).items())

    with pytest.raises(CheckpointError, match="recipe"):
        _run(stories260k_path, tok, _learn_recipe(steps=3, extra=f'checkpoint_path = "{ck.as_posix()}"'))
    with pytest.raises(CheckpointError, match="resume is off"):
        _run(stories260k_path, tok, with_ck, resume=False)
    with pytest.raises(CheckpointError, match="more than"):
        _run(stories260k_path, tok, _learn_recipe(steps=2, extra=f'{sm}checkpoint_path = "{ck.as_posix()}"'))


def test_fusing_refreshes_weights_cached_before(stories260k_path, tok, data_dir):
    """A LinearMX that cached its quantized weight (e.g. during rotation_search) must not keep the stale one."""
    from ptq.passes.base import PassContext
    from ptq.passes.pipeline import quantize_module_transform_pass
    from ptq.passes.rotation_learn import RotationLearnPass
    from ptq.quantizers import fake_quantize

    model, _ = quantize_module_transform_pass(_fresh(stories260k_path), RTN, progress=False)
    with torch.no_grad():
        model(input_ids=torch.arange(1, 9).view(1, -1))  # fills every LinearMX weight cache
    RotationLearnPass().run(model, _learn_recipe(steps=1), PassContext(tokenizer=tok, device="cpu", progress=False))
    for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"):
        mod = model.model.layers[1].get_submodule(name)
        assert torch.equal(mod.effective_weight(), fake_quantize(mod.weight_to_quantize(), mod.cfg.weight)), name


def test_gptq_quantizes_the_rotated_weights(stories260k_path, tok, data_dir, monkeypatch):
    import ptq.passes.gptq as gp
    from ptq.recipe import load_recipe

    seen = []
    real = gp.gptq_quantize

    def spy(w, *a, **k):
        seen.append(w.clone())
        return real(w, *a, **k)

    monkeypatch.setattr(gp, "gptq_quantize", spy)
    text = f'extends = "{(ROOT / "recipes" / "w4a4kv4.toml").as_posix()}"\n' + SMALL.format(
        steps=2, lr=3e-3, loss="ce", n=2, seqlen=32, batch=2, dataset='"tinystories"', every=1, extra="") + """
[gptq]
dataset = "tinystories"
nsamples = 2
seqlen = 32
cali_batch_size = 2

['layers\\.\\d+\\.(gate|up|gate_up|down|experts)']
gptq = true
"""
    model, info = _run(stories260k_path, tok, load_recipe(text))
    assert list(info) == ["swap", "rotation_learn", "gptq"]
    down = model.model.layers[0].mlp.down_proj
    original = _fresh(stories260k_path).model.layers[0].mlp.down_proj.weight
    assert any(torch.equal(w, down.weight_to_quantize()) for w in seen)  # GPTQ got the fused weight R1^T W
    assert not torch.allclose(down.weight_to_quantize(), original)
    assert down.has_gptq_weight


def test_tied_model_without_untie_is_refused(stories260k_path, tok, data_dir):
    recipe = _learn_recipe(steps=1)
    from ptq.recipe import load_recipe, recipe_to_dict

    d = recipe_to_dict(recipe)
    d["rotation_learn"]["untie_embeddings"] = False
    with pytest.raises(ModelError, match="untie_embeddings"):
        _run(stories260k_path, tok, load_recipe(d))
    d["rotation_learn"]["rotations"] = ["r2"]  # r2 alone needs no untying and keeps the tie
    model, info = _run(stories260k_path, tok, load_recipe(d))
    assert model.lm_head.weight is model.model.embed_tokens.weight and not info["rotation_learn"]["untied_embeddings"]
