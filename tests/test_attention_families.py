"""AttentionMX on a tiny random model of every decoder family of tests/families.py (CPU, fp32).

The family's own attention forward runs unchanged; AttentionMX intercepts the KV-cache write and (for rope / rotations /
qk, softmax and av quantization) the attention function. Checked per family: decode with a cache equals a no-cache
full forward, cached and uncached greedy generation agree, the cache stores values on the MX grid, a bypassed swap is
bit-identical to the original model (also when routed through ptq's attention function), and qk / softmax / av
quantization runs where the family dispatches attention through transformers (refused with a ModelError where not).
"""

import inspect

import pytest
import torch
import transformers
from families import FAMILIES, tiny_model
from packaging.version import Version
from torch import nn
from transformers import DynamicCache

from ptq.config import AttentionQuantConfig
from ptq.errors import ModelError
from ptq.formats import QuantSpec
from ptq.modules import AttentionMX
from ptq.modules.attention import attention_support, is_attention_module
from ptq.passes.swap import swap_modules
from ptq.quantizers import fake_quantize

KV4 = QuantSpec.mxint(4, block_size=32)  # along head_dim (32 in every tiny family)
KV_CFG = AttentionQuantConfig(kv_cache=KV4)
QK_CFG = AttentionQuantConfig(kv_cache=KV4, qk_matmul=QuantSpec.mxint(8), softmax=QuantSpec.mxfp("e4m3"))
ALL_CFG = AttentionQuantConfig(kv_cache=KV4, qk_matmul=QuantSpec.mxint(8), softmax=QuantSpec.mxfp("e4m3"),
                               av_matmul=QuantSpec.mxint(6, block_size=16))
SEQ = 40  # longer than the sliding window (24) of mistral / qwen2 / gemma2 / gemma3 / starcoder2; decoding crosses it
FAMILY_NAMES = list(FAMILIES)


def attention_names(model) -> list[str]:
    names = [n for n, m in model.named_modules() if is_attention_module(m)]
    assert len(names) == model.config.num_hidden_layers, names  # one per layer, nothing else
    return names


def swapped(family: str, cfg: AttentionQuantConfig, impl: str | None = None):
    model = tiny_model(family)
    if impl is not None:
        model.set_attn_implementation(impl)
    swap_modules(model, {n: cfg for n in attention_names(model)})
    return model


def tokens(batch: int = 1, length: int = SEQ, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (batch, length), generator=g)
    ids[:, 0] = 1
    return ids


def supports_attention_points(model) -> bool:
    attn = model.get_submodule(attention_names(model)[0])
    return attention_support(type(attn)).attention_points


@torch.no_grad()
def incremental_logits(model, ids: torch.Tensor, prefill: int = 20) -> tuple[torch.Tensor, DynamicCache]:
    """Prefill ``prefill`` tokens, then one token at a time with a DynamicCache; the logits of every position."""
    cache = DynamicCache(config=model.config)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # 5.24 / 5.17
    out = [model(ids[:, :prefill], use_cache=True, **{name: cache}).logits]
    for t in range(prefill, ids.shape[1]):
        out.append(model(ids[:, t:t + 1], use_cache=True, **{name: cache}).logits)
    return torch.cat(out, dim=1), cache


def assert_generate_agrees_with_no_cache(model, prompt: torch.Tensor, **kw) -> None:
    """Greedy `generate` with a cache gives the tokens of `generate` without one, for a model that quantizes
    activations. Such a model is not exactly invariant to the sequence length: torch may pick another fp32 kernel for
    another length (differences ~1e-7), and a 4-bit rounding can flip on that. The first generated token comes from
    the same prefill either way and must always agree; where later tokens part, the full forward itself must be shown
    length-sensitive (prefix logits at some length differ from the longest forward's by > 1e-4), else the cache is
    wrong."""
    kw = dict(do_sample=False, pad_token_id=0, **kw)
    cached = model.generate(prompt, use_cache=True, **kw)
    plain = model.generate(prompt, use_cache=False, **kw)
    n = prompt.shape[1]
    assert torch.equal(cached[:, :n + 1], plain[:, :n + 1]), "the first generated token differs: same prefill"
    if torch.equal(cached, plain):
        return
    full = model(plain, use_cache=False).logits
    shift = max((model(plain[:, :length], use_cache=False).logits - full[:, :length]).abs().max().item()
                for length in range(n, plain.shape[1]))
    assert shift > 1e-4, f"generate with a cache parts from generate without one ({cached.tolist()} vs " \
        f"{plain.tolist()}) although the full forward is length-invariant (max shift {shift:.2g}): the cache is wrong"


class IdentityRotation(nn.Module):
    """A rotation that changes nothing: routes the module through ptq's attention function without changing math."""

    def forward(self, t):
        return t

    def inverse(self, t):
        return t


# ---- 1. decode with a cache == full forward without one ---------------------------------------------------------
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_kv4_decode_with_cache_equals_full_forward(family):
    if family == "gemma3":  # the sequence must cross the window on sliding layers and global layers must exist
        types = tiny_model(family).config.layer_types
        assert {"sliding_attention", "full_attention"} <= set(types) and SEQ > 24
    model = swapped(family, KV_CFG)
    plain = tiny_model(family)
    ids = tokens()
    with torch.no_grad():
        full = model(ids, use_cache=False).logits  # no cache: the pass-through stand-in quantizes K / V
        reference = plain(ids, use_cache=False).logits
    step, _ = incremental_logits(model, ids)
    torch.testing.assert_close(step, full, rtol=0, atol=1e-5)
    assert (full - reference).abs().max() > 1e-3  # the KV quantization really ran without a cache


# ---- 2. generate with and without a cache -----------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_kv4_generate_with_and_without_cache_agree(family):
    model = swapped(family, KV_CFG)
    prompt = tokens(length=6, seed=3)
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **kw)
        recomputed = model.generate(prompt, use_cache=False, **kw)
    assert cached.shape == (1, 18)
    assert torch.equal(cached, recomputed)


# ---- 3. the cache stores values on the MX grid ------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_kv4_cache_stores_values_on_the_mx_grid(family):
    ids = tokens(length=SEQ)
    _, cache = incremental_logits(swapped(family, KV_CFG), ids, prefill=SEQ - 3)
    _, plain_cache = incremental_logits(tiny_model(family), ids, prefill=SEQ - 3)
    assert len(cache.layers) == tiny_model(family).config.num_hidden_layers
    for layer, plain_layer in zip(cache.layers, plain_cache.layers):
        for t, p in ((layer.keys, plain_layer.keys), (layer.values, plain_layer.values)):
            assert t.shape == p.shape and t.abs().max() > 0
            torch.testing.assert_close(fake_quantize(t, KV4), t, rtol=0, atol=0)
            assert not torch.equal(fake_quantize(p, KV4), p)  # an unquantized cache is not on the grid


# ---- 4. bypass is bit-identical -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_bypass_is_bit_identical(family):
    ref = tiny_model(family)
    model = swapped(family, AttentionQuantConfig())
    assert all(isinstance(model.get_submodule(n), AttentionMX) for n in attention_names(model))
    ids = tokens(batch=2)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding: a real mask reaches the kernels
    with torch.no_grad():
        for kw in (dict(use_cache=False), dict(use_cache=True), dict(attention_mask=mask, use_cache=False)):
            assert torch.equal(model(ids, **kw).logits, ref(ids, **kw).logits), kw
    ref_step, _ = incremental_logits(ref, ids[:1], prefill=SEQ - 4)
    step, _ = incremental_logits(model, ids[:1], prefill=SEQ - 4)
    assert torch.equal(step, ref_step)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_routed_through_ptq_attention_with_nothing_quantized_is_bit_identical(family, monkeypatch):
    """Identity rotations send every call through the registered "ptq_mx" function, which delegates to the model's
    own implementation: the logits stay bit-identical. Families computing attention themselves refuse rotations."""
    ref = tiny_model(family)
    model = swapped(family, AttentionQuantConfig())
    names = attention_names(model)
    if not supports_attention_points(model):
        with pytest.raises(ModelError, match=type(ref.get_submodule(names[0])).__name__ + ".*kv_cache"):
            model.get_submodule(names[0]).set_rotations(qk=IdentityRotation(), v=IdentityRotation())
        return
    calls = []
    real = AttentionMX._attend
    monkeypatch.setattr(AttentionMX, "_attend", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    for n in names:
        model.get_submodule(n).set_rotations(qk=IdentityRotation(), v=IdentityRotation())
    ids = tokens(batch=2)
    with torch.no_grad():
        assert torch.equal(model(ids, use_cache=False).logits, ref(ids, use_cache=False).logits)
    assert len(calls) == len(names)
    assert all(model.get_submodule(n).config is model.config for n in names)  # the routing view is gone
    step, _ = incremental_logits(model, ids[:1], prefill=SEQ - 4)
    ref_step, _ = incremental_logits(ref, ids[:1], prefill=SEQ - 4)
    assert torch.equal(step, ref_step)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_quantized_eager_with_bypassed_quantizers_equals_the_family_eager_attention(family):
    """`force_eager` with nothing quantized runs ptq's eager attention: op for op the family's eager attention (Gemma
    2's softcap included), so bit-identical to the model loaded with attn_implementation='eager'."""
    ref = tiny_model(family)
    ref.set_attn_implementation("eager")
    model = swapped(family, AttentionQuantConfig(), impl="eager")
    attn = model.get_submodule(attention_names(model)[0])
    support = attention_support(type(attn))
    if not support.attention_points or "eager" in support.self_checked_impls:
        with pytest.raises(ModelError, match=type(ref.get_submodule(attention_names(ref)[0])).__name__):
            attn.force_eager = True
        return
    for n in attention_names(model):
        model.get_submodule(n).force_eager = True
    ids = tokens(batch=2)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        for kw in (dict(use_cache=False), dict(attention_mask=mask, use_cache=False)):
            assert torch.equal(model(ids, **kw).logits, ref(ids, **kw).logits), kw


# ---- 5. qk / softmax / av quantization --------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_qk_softmax_av_quantization_runs_or_is_refused(family):
    model = tiny_model(family)
    names = attention_names(model)
    cls_name = type(model.get_submodule(names[0])).__name__
    if not supports_attention_points(model):
        with pytest.raises(ModelError, match=f"{cls_name}.*kv_cache"):
            swap_modules(model, {n: ALL_CFG for n in names})
        assert not any(isinstance(m, AttentionMX) for m in model.modules())  # refused before any work
        return
    info = swap_modules(model, {n: ALL_CFG for n in names})
    assert info["eager_attention"] == names
    bypass = swapped(family, KV_CFG)
    ids = tokens()
    with torch.no_grad():
        got = model(ids, use_cache=False).logits
        want = bypass(ids, use_cache=False).logits
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() > 1e-3


# Falcon computed attention itself up to transformers 5.24 (kv_cache only there); 5.25 dispatches it like the others.
FALCON_DISPATCHES = Version(transformers.__version__) >= Version("5.25")


@pytest.mark.parametrize("family", [f for f in FAMILY_NAMES if f != "falcon" or FALCON_DISPATCHES])
def test_qk_softmax_quantized_decode_equals_full_forward(family):
    """Q K^T operands along head_dim and probabilities along the key axis are blocked per query row, with the key
    blocks aligned to absolute positions (also once a sliding-window cache has dropped keys: gemma3, mistral ...),
    so decoding with a cache sees what a full forward sees. (av_matmul is not: V is blocked along the sequence, so a
    full forward's V blocks hold later tokens too.)"""
    model = swapped(family, QK_CFG)
    ids = tokens()
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    step, _ = incremental_logits(model, ids)
    torch.testing.assert_close(step, full, rtol=0, atol=1e-5)


# ---- support detection and refusals -------------------------------------------------------------------------------
def test_support_table_of_the_families():
    """Every family dispatches attention through transformers (Falcon only from 5.25: before, kv_cache only)."""
    for family in FAMILY_NAMES:
        model = tiny_model(family)
        support = attention_support(type(model.get_submodule(attention_names(model)[0])))
        computes_itself = family == "falcon" and not FALCON_DISPATCHES
        assert support.kv_cache, support.describe()
        assert support.attention_points == (not computes_itself), support.describe()
        assert support.eager_refusal is None or computes_itself, support.describe()


def test_unsupported_attention_class_is_refused_before_any_work():
    class WeirdAttention(nn.Module):
        def forward(self, hidden_states, past_key_values=None):
            return hidden_states

    model = tiny_model("llama")
    model.model.layers[0].self_attn = WeirdAttention()
    assert not is_attention_module(model.model.layers[0].self_attn)
    with pytest.raises(ModelError, match="WeirdAttention.*Cache"):
        AttentionMX.from_attention(model.model.layers[0].self_attn, KV_CFG)
    with pytest.raises(ModelError, match="WeirdAttention"):
        swap_modules(model, {"model.layers.0.self_attn": KV_CFG, "model.layers.1.self_attn": KV_CFG})
    assert not any(isinstance(m, AttentionMX) for m in model.modules())


def test_flash_attention_model_refuses_eager_quantization():
    model = tiny_model("qwen3")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ModelError, match="flash_attention_2.*sdpa"):
        swap_modules(model, {n: QK_CFG for n in attention_names(model)})
    assert not any(isinstance(m, AttentionMX) for m in model.modules())
