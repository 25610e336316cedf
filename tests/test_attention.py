"""AttentionMX on stories260k and tiny random Llama / Mistral / Qwen2 / Qwen3 models (GQA, sliding windows).

The KV-cache emulation below is written independently of ptq.modules.attention: projections, RoPE, a causal /
sliding-window mask and softmax attention by hand, with `fake_quantize` applied to K (after RoPE) and V along
head_dim. Run against transformers' eager kernel the two agree bit for bit (same float operations); against sdpa
within fp32 rounding.
"""

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import AutoModelForCausalLM

from ptq.config import AttentionQuantConfig, LinearQuantConfig
from ptq.errors import ModelError
from ptq.formats import QuantSpec
from ptq.modules import AttentionMX
from ptq.passes.swap import swap_modules
from ptq.quantizers import fake_quantize
from rotation_stub import OrthoRotation

ARCHS = ("llama", "mistral", "qwen2", "qwen3")
KV4 = QuantSpec.mxint(4)  # block 32 > head_dim (16 tiny, 8 stories260k): one zero-padded block per head row
Q8 = QuantSpec.mxint(8)
FP8 = QuantSpec.mxfp("e4m3")


def tiny_model(arch: str, attn_implementation: str = "sdpa", seed: int = 0):
    """2 layers, hidden 64, 4 heads / 2 KV heads of 16; Mistral / Qwen with a sliding window of 8 tokens."""
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[arch]
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=128, initializer_range=0.2)
    if arch == "mistral":
        kw.update(sliding_window=8)
    if arch in ("qwen2", "qwen3"):
        kw.update(use_sliding_window=True, sliding_window=8, max_window_layers=1)
    torch.manual_seed(seed)
    cfg = cls(**kw)
    cfg._attn_implementation = attn_implementation
    return AutoModelForCausalLM.from_config(cfg).eval()


def load_model(name: str, stories_path, attn_implementation: str = "sdpa"):
    if name == "stories260k":
        return AutoModelForCausalLM.from_pretrained(stories_path, dtype=torch.float32,
                                                    attn_implementation=attn_implementation).eval()
    return tiny_model(name, attn_implementation)


@pytest.fixture(params=("stories260k",) + ARCHS)
def model_name(request):
    return request.param


@pytest.fixture
def stories_path(request, model_name):
    return request.getfixturevalue("stories260k_path") if model_name == "stories260k" else None


def tokens(model, batch: int = 2, length: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, model.config.vocab_size, (batch, length), generator=g)
    ids[:, 0] = 1
    return ids


def attention_names(model):
    return [n for n, m in model.named_modules() if n.endswith("self_attn")]


def linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


def window_of(attn) -> int | None:
    if isinstance(attn, transformers.models.mistral.modeling_mistral.MistralAttention):
        return attn.config.sliding_window
    return getattr(attn, "sliding_window", None)


def emulated_forward(attn, kv=None, qk=None, softmax=None, av=None):
    """A hand-written quantized attention forward for one (unswapped) attention module."""

    def rotate_half(t):
        h = t.shape[-1] // 2
        return torch.cat((-t[..., h:], t[..., :h]), dim=-1)

    def fq(t, spec, axis=-1):
        return t if spec is None else fake_quantize(t, spec.with_(axis=axis))

    def forward(hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        b, s, _ = hidden_states.shape
        hd = attn.head_dim
        q = F.linear(hidden_states, attn.q_proj.weight, attn.q_proj.bias).view(b, s, -1, hd)
        k = F.linear(hidden_states, attn.k_proj.weight, attn.k_proj.bias).view(b, s, -1, hd)
        v = F.linear(hidden_states, attn.v_proj.weight, attn.v_proj.bias).view(b, s, -1, hd)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = (t.unsqueeze(1) for t in position_embeddings)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k, v = fq(k, kv), fq(v, kv)  # what the cache stores: blocked along head_dim
        rep = q.shape[1] // k.shape[1]
        k = fq(k, qk).repeat_interleave(rep, dim=1)
        q = fq(q, qk)
        v = fq(v, av, axis=-2).repeat_interleave(rep, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) * attn.scaling
        i = torch.arange(s)[:, None]
        j = torch.arange(s)[None, :]
        allowed = j <= i
        if window_of(attn) is not None:
            allowed &= (i - j) < window_of(attn)
        scores = scores.masked_fill(~allowed, float("-inf"))
        p = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        p = fq(fq(p, softmax), av)
        out = torch.matmul(p, v).transpose(1, 2).reshape(b, s, -1)
        return F.linear(out, attn.o_proj.weight, attn.o_proj.bias), None

    return forward


def emulate(model, **specs):
    for n in attention_names(model):
        attn = model.get_submodule(n)
        attn.forward = emulated_forward(attn, **specs)
    return model


# ---- bypass: bit-identical ---------------------------------------------------------------------------------------
def test_all_bypassed_is_bit_identical(model_name, stories_path):
    ref = load_model(model_name, stories_path)
    model = load_model(model_name, stories_path)
    mapping = {n: LinearQuantConfig() for n in linear_names(model)}
    mapping.update({n: AttentionQuantConfig() for n in attention_names(model)})
    swap_modules(model, mapping)
    assert all(isinstance(model.get_submodule(n), AttentionMX) for n in attention_names(model))
    ids = tokens(model)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding: a real 4-D mask reaches the kernels
    torch.testing.assert_close(logits(model, ids), logits(ref, ids), rtol=0, atol=0)
    torch.testing.assert_close(logits(model, ids, attention_mask=mask), logits(ref, ids, attention_mask=mask),
                               rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_forced_eager_path_with_bypass_equals_transformers_eager(arch):
    """The quantized eager path, quantizers bypassed, is transformers' eager attention op for op, both with the
    masks built for eager (float) and for sdpa (None / bool)."""
    ref = tiny_model(arch, "eager")
    ids = tokens(ref)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    for impl in ("eager", "sdpa"):
        model = tiny_model(arch, impl)
        swap_modules(model, {n: AttentionQuantConfig() for n in attention_names(model)})
        for n in attention_names(model):
            model.get_submodule(n).force_eager = True
        torch.testing.assert_close(logits(model, ids), logits(ref, ids), rtol=0, atol=0)
        torch.testing.assert_close(logits(model, ids, attention_mask=mask), logits(ref, ids, attention_mask=mask),
                                   rtol=0, atol=0)


# ---- KV cache quantization ---------------------------------------------------------------------------------------
def test_kv_cache_only_equals_hand_written_emulation(model_name, stories_path):
    cfg = AttentionQuantConfig(kv_cache=KV4)
    emu = emulate(load_model(model_name, stories_path, "eager"), kv=KV4)
    plain = load_model(model_name, stories_path, "eager")
    ids = tokens(plain)
    want = logits(emu, ids)
    # sdpa reduces in another order than the eager emulation: a few ulp of logits ~15 (seen: 1.3e-5, 8.7e-7 relative)
    for impl, rtol, atol in (("eager", 0.0, 0.0), ("sdpa", 2e-6, 1e-5)):
        model = load_model(model_name, stories_path, impl)
        info = swap_modules(model, {n: cfg for n in attention_names(model)})
        assert info["eager_attention"] == []  # kv-only keeps the model's kernel
        torch.testing.assert_close(logits(model, ids), want, rtol=rtol, atol=atol)
    assert (want - logits(plain, ids)).abs().max() > 1e-3


def test_head_dim_smaller_than_block_is_one_padded_block():
    """stories260k has head_dim 8: a block of 32 along head_dim acts as a block of 8 (zero padding)."""
    k = torch.randn(2, 4, 6, 8) * 5
    torch.testing.assert_close(fake_quantize(k, KV4), fake_quantize(k, KV4.with_(block_size=8)), rtol=0, atol=0)


def test_kv_only_keeps_sdpa_and_qk_quant_goes_eager(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny_model("llama")
    ids = tokens(model)
    swap_modules(model, {n: AttentionQuantConfig(kv_cache=KV4, rope=FP8) for n in attention_names(model)})
    logits(model, ids)
    assert len(calls) == 2
    info = swap_modules(model, {n: AttentionQuantConfig(kv_cache=KV4, qk_matmul=Q8) for n in attention_names(model)})
    assert info["eager_attention"] == attention_names(model)
    logits(model, ids)
    assert len(calls) == 2


@pytest.mark.parametrize("arch", ARCHS)
def test_qk_softmax_av_quantization_equals_emulation(arch):
    specs = dict(kv=KV4, qk=Q8, softmax=FP8, av=QuantSpec.mxint(6, block_size=16))
    emu = emulate(tiny_model(arch, "eager"), **specs)
    ids = tokens(emu)
    cfg = AttentionQuantConfig(kv_cache=KV4, qk_matmul=Q8, softmax=FP8, av_matmul=specs["av"])
    for impl in ("eager", "sdpa"):
        model = tiny_model(arch, impl)
        swap_modules(model, {n: cfg for n in attention_names(model)})
        torch.testing.assert_close(logits(model, ids), logits(emu, ids), rtol=0, atol=0)


def test_rope_spec_quantizes_q_and_k_along_head_dim():
    model = tiny_model("llama", "eager")
    ref = emulate(tiny_model("llama", "eager"), qk=FP8)  # rope quantization = Q and K quantized after RoPE
    swap_modules(model, {n: AttentionQuantConfig(rope=FP8) for n in attention_names(model)})
    ids = tokens(model)
    torch.testing.assert_close(logits(model, ids), logits(ref, ids), rtol=0, atol=0)


# ---- generation --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,cfg", [
    ("stories260k", AttentionQuantConfig(kv_cache=KV4)),
    ("qwen3", AttentionQuantConfig(kv_cache=KV4)),
    ("mistral", AttentionQuantConfig(kv_cache=KV4, qk_matmul=Q8, av_matmul=Q8, softmax=FP8)),
])
def test_generate_with_cache_matches_no_cache_recompute(name, cfg, request):
    """The cache stores quantized K / V; a no-cache recompute quantizes the same per-token rows (blocks lie along
    head_dim), so greedy decoding gives the same tokens either way."""
    path = request.getfixturevalue("stories260k_path") if name == "stories260k" else None
    model = load_model(name, path)
    plain = load_model(name, path)
    swap_modules(model, {n: cfg for n in attention_names(model)})
    prompt = tokens(model, batch=1, length=6, seed=3)
    kw = dict(max_new_tokens=14, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **kw)
        recomputed = model.generate(prompt, use_cache=False, **kw)
        # one full forward over the generated sequence predicts every generated token
        full = model(cached[:, :-1], use_cache=True)
    assert cached.shape == (1, 20)
    assert torch.equal(cached, recomputed)
    assert torch.equal(full.logits[0, 5:].argmax(-1), cached[0, 6:])
    assert not torch.equal(full.logits, plain(cached[:, :-1]).logits)
    # the cache holds quantized keys and values: quantizing them again changes nothing
    layer0 = full.past_key_values.layers[0]
    for t in (layer0.keys, layer0.values):
        torch.testing.assert_close(fake_quantize(t, KV4), t, rtol=0, atol=0)


def test_generate_works_after_full_rtn_swap(stories260k_path):
    """W4A4 + KV4 (all linears and attentions): generate runs with and without a cache and is deterministic.
    Token-for-token equality of the two is not asserted here: 4-bit activation quantization turns fp32 summation-
    order differences between a 1-token decode step and a full recompute (~1e-6) into rounding flips now and then."""
    model = load_model("stories260k", stories260k_path)
    linear = LinearQuantConfig(weight=KV4, data_in=KV4)
    mapping = {n: linear for n in linear_names(model)}
    mapping.update({n: AttentionQuantConfig(kv_cache=KV4) for n in attention_names(model)})
    swap_modules(model, mapping)
    prompt = torch.tensor([[1]])
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        a = model.generate(prompt, use_cache=True, **kw)
        b = model.generate(prompt, use_cache=True, **kw)
        c = model.generate(prompt, use_cache=False, **kw)
    assert a.shape == c.shape == (1, 13) and torch.equal(a, b)


# ---- rotation hooks ----------------------------------------------------------------------------------------------
def test_rotations_with_bypassed_quantizers_reproduce_logits(model_name, stories_path):
    """Matched rotations on every linear input, qk and v rotations in every attention: exact in real arithmetic;
    in fp32 the logits stay within 1e-4 (|logits| <= ~20)."""
    ref = load_model(model_name, stories_path)
    model = load_model(model_name, stories_path)
    mapping = {n: LinearQuantConfig() for n in linear_names(model)}
    mapping.update({n: AttentionQuantConfig() for n in attention_names(model)})
    swap_modules(model, mapping)
    head_dim = model.get_submodule(attention_names(model)[0]).head_dim
    for i, n in enumerate(linear_names(model)):
        lin = model.get_submodule(n)
        lin.set_rotation(OrthoRotation(lin.in_features, seed=i), mode="matched" if i % 2 else "activation_only")
    for i, n in enumerate(attention_names(model)):
        model.get_submodule(n).set_rotations(qk=OrthoRotation(head_dim, 100 + i), v=OrthoRotation(head_dim, 200 + i))
    ids = tokens(model)
    want = logits(ref, ids)
    got = logits(model, ids)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert not torch.equal(got, want)  # the rotations really ran


def test_v_rotation_happens_before_kv_quantization():
    """With a V rotation the cache holds Q_kv(rot(V)); the output is de-rotated per head."""
    model = tiny_model("llama", "eager")
    swap_modules(model, {n: AttentionQuantConfig(kv_cache=KV4) for n in attention_names(model)})
    rot = OrthoRotation(16, seed=7)
    for n in attention_names(model):
        model.get_submodule(n).set_rotations(v=rot)
    attn = model.get_submodule(attention_names(model)[0])
    seen = {}

    def grab_input(module, args, kwargs):
        seen.setdefault("h", kwargs["hidden_states"])

    attn.register_forward_pre_hook(grab_input, with_kwargs=True)
    orig_update = transformers.cache_utils.DynamicCache.update

    def spy(self, k, v, layer_idx, *a, **kw):
        seen.setdefault(layer_idx, v)
        return orig_update(self, k, v, layer_idx, *a, **kw)

    ids = tokens(model)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(transformers.cache_utils.DynamicCache, "update", spy)
        with torch.no_grad():
            model(ids, use_cache=True)
            b, s, _ = seen["h"].shape
            v_raw = attn.v_proj(seen["h"]).view(b, s, -1, 16).transpose(1, 2)
    torch.testing.assert_close(seen[0], fake_quantize(rot(v_raw), KV4), rtol=0, atol=0)
    with pytest.raises(ModelError, match="inverse"):
        attn.set_rotations(v=nn.Identity())


def test_unsupported_attention_class_is_refused():
    class OtherAttention(nn.Module):
        pass

    with pytest.raises(ModelError, match="LlamaAttention"):
        AttentionMX.from_attention(OtherAttention(), AttentionQuantConfig())


def test_extra_repr_and_shared_submodules():
    model = tiny_model("qwen3")
    attn = model.model.layers[0].self_attn
    q_proj = attn.q_proj
    swap_modules(model, {"model.layers.0.self_attn": AttentionQuantConfig(kv_cache=KV4)})
    new = model.model.layers[0].self_attn
    assert new is not attn and new.q_proj is q_proj and new.q_norm is attn.q_norm and new.layer_idx == 0
    assert isinstance(new, transformers.models.qwen3.modeling_qwen3.Qwen3Attention)
    assert "kv_cache=MXINT4(block=32, axis=-1)" in repr(new) and "path=model kernel" in repr(new)
    assert set(model.state_dict()) == set(tiny_model("qwen3").state_dict())


# ---- GPU ---------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_rtn_model_triton_equals_torch_backend(stories260k_path, monkeypatch):
    """On CUDA the swapped model runs the Triton quantizer; its logits equal the torch reference backend's bit for
    bit (bf16 model, W4A4 linears, KV4 cache, plus the eager qk / softmax / av path on one layer)."""

    def build():
        model = AutoModelForCausalLM.from_pretrained(stories260k_path, dtype=torch.bfloat16).cuda().eval()
        mapping = {n: LinearQuantConfig(weight=KV4, data_in=KV4) for n in linear_names(model)}
        mapping.update({n: AttentionQuantConfig(kv_cache=KV4) for n in attention_names(model)})
        mapping["model.layers.2.self_attn"] = AttentionQuantConfig(kv_cache=KV4, qk_matmul=Q8, softmax=FP8,
                                                                   av_matmul=Q8)
        swap_modules(model, mapping)
        return model

    ids = tokens(build(), batch=2, length=64).cuda()
    monkeypatch.setenv("PTQ_BACKEND", "auto")
    fast = build()
    got = logits(fast, ids)
    monkeypatch.setenv("PTQ_BACKEND", "torch")
    want = logits(build(), ids)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    monkeypatch.setenv("PTQ_BACKEND", "auto")
    with torch.no_grad():
        out = fast.generate(ids[:1, :4], max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 12)
