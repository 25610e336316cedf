"""ExpertsMX (fused MoE experts) and per-expert GPTQ on tiny random Mixtral / Qwen2-MoE / Qwen3-MoE models (CPU, fp32).

What is checked: bypass == original bit for bit (whatever ``_experts_implementation``), the quantized loop == the
class's eager forward when nothing is quantized, every expert weight on the grid along its reduction axis (both
stored layouts), input quantization before routing == after routing, coverage of all experts of all layers, the
router left alone, GPTQ per expert (on grid, lower proxy loss than RTN, the pooled-Hessian policy, checkpoint resume).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from ptq.config import LinearQuantConfig
from ptq.errors import ModelError
from ptq.formats import QuantSpec
from ptq.modules.experts import PROJECTIONS, ExpertsMX, is_experts_module
from ptq.passes.swap import swap_modules
from ptq.quantizers import fake_quantize
from tests.families import tiny_model

MOE = ["mixtral", "qwen2_moe", "qwen3_moe"]
W4 = QuantSpec.mxint(4, block_size=32)
A8 = QuantSpec.mxint(8, block_size=32)
EXPERTS = r"model\.layers\.\d+\.mlp\.experts"


pytestmark = pytest.mark.usefixtures("one_thread")


def tokens(n=2, t=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (n, t), generator=g)


def experts_names(model):
    return [n for n, m in model.named_modules() if is_experts_module(m)]


def swap_experts(model, cfg):
    return swap_modules(model, {n: cfg for n in experts_names(model)})


def matmul_view(module, which, e, w=None):
    """Expert e's [out, in] matrix of a stored [E, out, in] / transposed [E, in, out] tensor."""
    w = getattr(module, module.param_name(which)) if w is None else w
    return w[e].t() if module.is_transposed else w[e]


# ---- bypass / eager equivalence -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", MOE)
def test_bypass_is_bit_identical_with_the_default_implementation(family):
    model = tiny_model(family)
    assert model.config._experts_implementation not in (None, "eager")  # the fused kernels transformers picks
    ids = tokens()
    ref = model(ids).logits
    info = swap_experts(model, LinearQuantConfig())
    assert len(info["swapped"]) == model.config.num_hidden_layers
    assert all(isinstance(model.get_submodule(n), ExpertsMX) for n in info["swapped"])
    assert torch.equal(model(ids).logits, ref)


@pytest.mark.parametrize("family", MOE)
def test_loop_equals_eager_forward_when_nothing_is_quantized(family):
    """The explicit loop (forced by a no-op collector) reproduces the class's eager forward bit for bit."""
    model = tiny_model(family)
    model.set_experts_implementation("eager")
    ids = tokens()
    ref = model(ids).logits
    swap_experts(model, LinearQuantConfig())
    calls = []
    for n in experts_names(model):
        model.get_submodule(n).collector = lambda e, which, x: calls.append((e, which, x.shape))
    out = model(ids).logits
    assert calls and {w for _, w, _ in calls} == set(PROJECTIONS)
    assert torch.equal(out, ref)


def reference_moe(module, hidden, top_k_index, top_k_weights, spec_w, spec_in):
    """Quantize AFTER routing: each expert's gathered rows, each expert's own [out, in] matrices along in."""
    out = torch.zeros_like(hidden)
    for e in range(module.num_experts):
        top_k_pos, token_idx = torch.where(top_k_index.T == e)
        if token_idx.numel() == 0:
            continue
        x = fake_quantize(hidden[token_idx], spec_in)
        w1 = fake_quantize(matmul_view(module, "gate_up", e).contiguous(), spec_w)
        h = module._apply_gate(F.linear(x, w1))
        w2 = fake_quantize(matmul_view(module, "down", e).contiguous(), spec_w)
        y = F.linear(fake_quantize(h, spec_in), w2) * top_k_weights[token_idx, top_k_pos, None]
        out.index_add_(0, token_idx, y)
    return out


@pytest.mark.parametrize("family", MOE)
def test_quantized_forward_equals_quantizing_after_routing(family):
    """Input blocks are per token, so the module's quantize-once-before-routing equals quantizing each expert's
    gathered rows; and the weights are blocked per expert along the reduction axis."""
    model = tiny_model(family)
    experts = model.model.layers[0].mlp.experts
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(40, model.config.hidden_size, generator=g)
    idx = torch.stack([torch.randperm(experts.num_experts, generator=g)[:2] for _ in range(40)])
    weights = torch.rand(40, 2, generator=g)
    before = experts(hidden, idx, weights)
    mx = ExpertsMX.from_experts(experts, LinearQuantConfig(weight=W4, data_in=A8))
    got = mx(hidden, idx, weights)
    want = reference_moe(mx, hidden, idx, weights, W4, A8)
    assert torch.allclose(got, want, rtol=0, atol=1e-6)
    assert (got - want).abs().max() < 1e-3 * (got - before).abs().max()  # the check can tell quantized from not
    # the two placements of the input quantizer, directly: equal for every routing
    assert torch.equal(fake_quantize(hidden, A8)[idx[:, 1]], fake_quantize(hidden[idx[:, 1]], A8))


@pytest.mark.parametrize("family", MOE)
def test_quantization_changes_the_logits_and_runs_under_any_implementation(family):
    model = tiny_model(family)
    ids = tokens()
    ref = model(ids).logits
    swap_experts(model, LinearQuantConfig(weight=W4, data_in=A8))
    grouped = model(ids).logits
    assert not torch.allclose(grouped, ref, atol=1e-4)
    model.set_experts_implementation("eager")  # ExpertsMX's own forward runs in both cases
    assert torch.equal(model(ids).logits, grouped)


# ---- weights on grid, coverage -------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", MOE)
def test_every_expert_of_every_layer_is_quantized_on_its_reduction_axis(family):
    model = tiny_model(family)
    info = swap_modules(model, {n: LinearQuantConfig(weight=W4) for n in experts_names(model)})
    originals = {n: {p: getattr(model.get_submodule(n), model.get_submodule(n).param_name(p)).detach().clone()
                     for p in PROJECTIONS} for n in info["swapped"]}
    assert len(info["swapped"]) == model.config.num_hidden_layers
    n_checked = 0
    for name, orig in originals.items():
        m = model.get_submodule(name)
        for which in PROJECTIONS:
            eff = m.effective_weight(which)
            assert eff.shape == orig[which].shape
            for e in range(m.num_experts):
                w = matmul_view(m, which, e, orig[which])  # [out, in]
                q = m.quantized_expert_weight(which, e)
                assert q.shape[-1] == m.in_features(which) == (model.config.hidden_size if which == "gate_up"
                                                                 else q.shape[-1])
                assert torch.equal(q, fake_quantize(w.contiguous(), W4))  # blocked along in (the reduction axis)
                assert torch.equal(fake_quantize(q.contiguous(), W4), q)  # on the grid
                assert not torch.equal(q, w)
                assert not torch.equal(q, fake_quantize(w.t().contiguous(), W4).t())  # the other axis differs
                n_checked += 1
    assert n_checked == 2 * model.config.num_hidden_layers * m.num_experts
    # every 3-D parameter of the model belongs to a swapped experts module
    fused = {n for n, p in model.named_parameters() if p.dim() == 3}
    covered = {f"{n}.{m.param_name(w)}" for n, m in model.named_modules() if isinstance(m, ExpertsMX)
               for w in PROJECTIONS}
    assert fused and fused == covered


def test_transposed_biased_interleaved_layout_gpt_oss():
    """GPT-OSS stores experts [E, in, out] with biases and an interleaved, clamped gate: the loop matches its eager
    forward when unquantized, and weights are blocked along the stored dim -2 (the reduction axis)."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    cfg = GptOssConfig(hidden_size=64, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    cfg._experts_implementation = "eager"
    torch.manual_seed(0)
    experts = GptOssExperts(cfg)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    assert experts.is_transposed and experts.has_bias and not experts.is_concatenated
    hidden = torch.randn(30, 64)
    idx = torch.stack([torch.randperm(4)[:2] for _ in range(30)])
    weights = torch.rand(30, 2)
    ref = experts(hidden, idx, weights)
    mx = ExpertsMX.from_experts(experts, LinearQuantConfig())
    mx.collector = lambda *a: None
    assert torch.equal(mx(hidden, idx, weights), ref)
    mx.collector = None
    mx.set_config(LinearQuantConfig(weight=W4))
    for which in PROJECTIONS:
        stored = getattr(experts, mx.param_name(which))
        assert mx.effective_weight(which).shape == stored.shape
        for e in range(4):
            assert torch.equal(mx.quantized_expert_weight(which, e), fake_quantize(stored[e].t().contiguous(), W4))
            assert torch.equal(mx.effective_weight(which)[e], fake_quantize(stored[e], W4.with_(axis=-2)))
    assert not torch.equal(mx(hidden, idx, weights), ref)


def test_cache_follows_parameter_edits_and_state_dict_is_unchanged():
    model = tiny_model("mixtral")
    keys = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    swap_experts(model, LinearQuantConfig(weight=W4))
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == keys
    m = model.model.layers[0].mlp.experts
    first = m.effective_weight("down")
    assert m.effective_weight("down") is first  # cached
    with torch.no_grad():
        m.down_proj.mul_(2.0)
    assert torch.equal(m.effective_weight("down"), fake_quantize(m.down_proj.detach(), W4))
    twin = copy.deepcopy(model)  # the dynamic class is importable / copyable
    ids = tokens()
    assert torch.equal(twin(ids).logits, model(ids).logits)


def test_router_is_not_an_experts_module():
    mix = tiny_model("mixtral")
    with pytest.raises(ModelError, match="MixtralTopKRouter"):
        swap_modules(mix, {"model.layers.0.mlp.gate": LinearQuantConfig(weight=W4)})
    qwen = tiny_model("qwen2_moe")  # its shared-expert gate is an nn.Linear: quantized like any linear
    info = swap_modules(qwen, {"model.layers.0.mlp.shared_expert_gate": LinearQuantConfig(weight=W4)})
    assert info["counts"] == {"Linear -> LinearMX": 1}


def test_unsupported_layout_is_refused_by_name():
    model = tiny_model("mixtral")
    model.model.layers[0].mlp.experts.has_post_expert_norm = True
    with pytest.raises(ModelError, match="MixtralExperts.*post-expert norm"):
        swap_experts(model, LinearQuantConfig(weight=W4))
    assert not any(isinstance(m, ExpertsMX) for m in model.modules())  # checked before anything was swapped


def test_recipe_selector_addresses_experts_and_bypass():
    import ptq

    model = tiny_model("qwen3_moe")
    recipe = {EXPERTS: {"config": {"name": "mxint", "weight_width": 4, "data_in_width": 8}}}
    model, info = ptq.quantize_module_transform_pass(model, recipe, device="cpu", progress=False)
    assert info["swap"]["counts"] == {"Qwen3MoeExperts -> Qwen3MoeExpertsMX": 2}
    m = model.model.layers[1].mlp.experts
    assert m.cfg.weight == W4 and m.cfg.data_in == A8
    model, info = ptq.quantize_module_transform_pass(model, {EXPERTS: {"config": {"bypass": True}}}, device="cpu",
                                                     progress=False)
    assert info["swap"]["reconfigured"] and m.cfg.bypassed and not m.quantizes


# ---- GPTQ ------------------------------------------------------------------------------------------------------------
def calibration_ctx(n=8, seqlen=32, seed=0):
    """A pass context whose calibration windows are random token ids (the tiny models have a 128-token vocab)."""
    from ptq.data import calibration_key
    from ptq.passes.base import PassContext

    ctx = PassContext(tokenizer=SimpleNamespace(bos_token_id=1), device="cpu", progress=False)
    ctx.calibration[calibration_key("tinystories", n, seqlen, 0, 1)] = tokens(n, seqlen, seed)
    return ctx


def gptq_recipe(**gptq):
    return {"gptq": {"dataset": "tinystories", "nsamples": 8, "seqlen": 32, "cali_batch_size": 4, **gptq},
            EXPERTS: {"config": {"name": "mxint", "weight_width": 4, "data_in_width": 8, "gptq": True}}}


def test_gptq_pass_quantizes_every_expert_on_grid_and_resumes(tmp_path):
    import ptq

    model = tiny_model("qwen2_moe")
    recipe = gptq_recipe(checkpoint_dir=str(tmp_path / "ck"))
    model, info = ptq.quantize_module_transform_pass(model, recipe, ctx=calibration_ctx())
    g = info["gptq"]
    names = experts_names(model)
    assert sorted(g["experts"]) == sorted(names)
    for name in names:
        m = model.get_submodule(name)
        rep = g["experts"][name]
        assert rep["min_tokens"] == {w: m.in_features(w) for w in PROJECTIONS}  # the default threshold
        for which in PROJECTIONS:
            assert m.gptq_experts(which) == list(range(m.num_experts))
            assert sum(rep["tokens"][which]) == 8 * 32 * model.config.num_experts_per_tok
            pooled = [e for e, n in enumerate(rep["tokens"][which]) if n < rep["min_tokens"][which]]
            assert rep["pooled_hessian"][which] == pooled
            assert f"{name}.{m.param_name(which)}" in g["proxy_loss"]
            for e in range(m.num_experts):
                q = m.quantized_expert_weight(which, e)
                assert torch.equal(fake_quantize(q.contiguous(), W4), q)
    # a second run resumes from the per-layer checkpoints (experts stacked [E, out, in]) to the same weights
    fresh = tiny_model("qwen2_moe")
    fresh, info2 = ptq.quantize_module_transform_pass(fresh, recipe, ctx=calibration_ctx())
    assert info2["gptq"]["loaded"] == [0, 1] and not info2["gptq"]["computed"]
    for name in names:
        for which in PROJECTIONS:
            assert torch.equal(fresh.get_submodule(name).effective_weight(which),
                               model.get_submodule(name).effective_weight(which))


def test_gptq_per_expert_beats_rtn_on_its_own_hessian():
    from ptq.gptq import proxy_loss
    from ptq.gptq.experts import collect_hessians, gptq_experts

    model = tiny_model("mixtral")
    swap_experts(model, LinearQuantConfig(weight=W4, data_in=A8, gptq=True))
    m = model.model.layers[0].mlp.experts
    ids = tokens(8, 32)

    def run():
        model.model(ids[:4])
        model.model(ids[4:])

    h_gate_up = collect_hessians(m, "gate_up", run)
    report = gptq_experts(m, run, min_tokens=1)
    assert report.pooled == {"gate_up": [], "down": []}
    h_down = collect_hessians(m, "down", run)  # after gate_up's GPTQ, as the down GPTQ saw it
    ratios = []
    for which, sums in (("gate_up", h_gate_up), ("down", h_down)):
        assert sums.counts == report.tokens[which]
        for e in range(m.num_experts):
            h = sums.hessian(e)
            w = m.weight_to_quantize(which, e)
            q = m.quantized_expert_weight(which, e)
            rtn = fake_quantize(w, W4)
            assert torch.equal(fake_quantize(q.contiguous(), W4), q)
            loss = proxy_loss(w, q, h)
            assert loss == pytest.approx(report.proxy_loss[which][e], rel=1e-5)
            ratios.append(loss / proxy_loss(w, rtn, h))
    print("GPTQ / RTN proxy loss per expert:", [round(r, 3) for r in ratios])
    assert sum(ratios) / len(ratios) < 0.9, ratios


def test_rarely_routed_experts_use_the_pooled_hessian():
    """Expert 2 gets 5 tokens and expert 3 none: both are quantized with the Hessian pooled over all experts."""
    from ptq.gptq import gptq_quantize
    from ptq.gptq.experts import gptq_experts

    model = tiny_model("mixtral")
    m = ExpertsMX.from_experts(model.model.layers[0].mlp.experts, LinearQuantConfig(weight=W4, gptq=True))
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(200, 64, generator=g)
    hidden[100:] *= 3.0  # expert 1's tokens differ from expert 0's, so their Hessians differ from the pooled one
    idx = torch.tensor([[0]] * 100 + [[1]] * 95 + [[2]] * 5)  # top-1 routing
    weights = torch.rand(200, 1, generator=g)
    report = gptq_experts(m, lambda: m(hidden, idx, weights))
    assert report.tokens["gate_up"] == [100, 95, 5, 0]
    assert report.min_tokens == {"gate_up": 64, "down": 128}
    assert report.pooled == {"gate_up": [2, 3], "down": [0, 1, 2, 3]}
    pooled = hidden.T @ hidden * (2.0 / hidden.shape[0])
    for e in (2, 3):
        want = gptq_quantize(m.weight_to_quantize("gate_up", e), pooled, W4).weight
        assert torch.allclose(m.quantized_expert_weight("gate_up", e), want, rtol=0, atol=1e-7)
    for e in (0, 1):  # their own Hessians, which give other weights than the pooled one
        own = hidden[:100].T @ hidden[:100] * (2.0 / 100) if e == 0 else hidden[100:195].T @ hidden[100:195] * (2 / 95)
        q = m.quantized_expert_weight("gate_up", e)
        assert torch.allclose(q, gptq_quantize(m.weight_to_quantize("gate_up", e), own, W4).weight, rtol=0, atol=1e-7)
        assert not torch.equal(q, gptq_quantize(m.weight_to_quantize("gate_up", e), pooled, W4).weight)
    # a high threshold pools everything; the report says so
    report = gptq_experts(m, lambda: m(hidden, idx, weights), min_tokens=10_000)
    assert report.pooled == {"gate_up": [0, 1, 2, 3], "down": [0, 1, 2, 3]}


# ---- native export ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gptq", [False, True])
def test_export_round_trip_keeps_expert_quantization(tmp_path, gptq):
    import ptq
    from ptq.export import export_quantized, load_quantized

    model = tiny_model("mixtral")
    recipe = gptq_recipe(experts_min_tokens=100) if gptq else {EXPERTS: {"config": {"name": "mxint", "weight_width": 4,
                                                                                   "data_in_width": 8}}}
    recipe[r"model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj"] = {"config": {"name": "mxint", "weight_width": 4}}
    model, info = ptq.quantize_module_transform_pass(model, recipe, ctx=calibration_ctx())
    if gptq:  # the recipe's threshold reached the experts GPTQ
        assert {r["min_tokens"]["down"] for r in info["gptq"]["experts"].values()} == {100}
    summary = export_quantized(model, tmp_path / "out", progress=False, format="ptq")
    assert summary["experts"] == experts_names(model) and len(summary["packed"]) == 8
    loaded = load_quantized(tmp_path / "out")
    ids = tokens()
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    for name in experts_names(model):
        got, want = loaded.get_submodule(name), model.get_submodule(name)
        assert isinstance(got, ExpertsMX) and got.cfg == want.cfg
        for which in PROJECTIONS:
            assert got.gptq_experts(which) == want.gptq_experts(which)
            assert torch.equal(got.effective_weight(which), want.effective_weight(which))
