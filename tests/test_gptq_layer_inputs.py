"""GPTQ's calibration plumbing feeds every decoder layer exactly what the model gives it (issue 14 item 4).

For each family of tests/families.py (unquantized, fp32, sdpa), a normal forward records each decoder layer's true
input and output with hooks. GPTQ's capture (layer 0's inputs + every layer's own keyword arguments) followed by its
layer-by-layer replay must reproduce them bit for bit (torch.equal) for every layer. The calibration windows (40
tokens) are longer than the sliding windows (24) of mistral / qwen2 / gemma2 / gemma3, and gemma3 mixes sliding and
global layers, so a layer run with another layer's mask or RoPE table gives a different output: that is checked too,
so the exactness test can fail.
"""

import pytest
import torch
from torch import nn

from families import FAMILIES, tiny_config, tiny_model
from ptq.errors import ModelError
from ptq.passes.gptq import GPTQPass, _layer_output, find_decoder_layers

SEQLEN, NSAMPLES, BATCH = 40, 4, 2  # two calibration batches, windows longer than the sliding window (24)
CPU = torch.device("cpu")

EXPECTED_PATHS = {"gpt_neox": "gpt_neox.layers", "falcon": "transformer.h", "gpt2": "transformer.h",
                  "opt": "model.decoder.layers"}


pytestmark = pytest.mark.usefixtures("one_thread")


def build(family):
    """tiny_model(family), or its eager-attention twin where this transformers has no sdpa for the family (gemma2
    in 5.24): the plumbing under test does not depend on the attention kernel."""
    try:
        return tiny_model(family)
    except ValueError as err:
        if "scaled_dot_product_attention" not in str(err):
            raise
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def true_layer_io(model, layers, tokens):
    """[layer][batch] -> (input hidden states, output hidden states) from plain forwards."""
    ins = [[] for _ in layers]
    outs = [[] for _ in layers]
    handles = []
    for k, layer in enumerate(layers):
        def pre(m, args, kwargs, k=k):
            ins[k].append((args[0] if args else kwargs["hidden_states"]).clone())

        def post(m, args, kwargs, out, k=k):
            outs[k].append(_layer_output(out).clone())
        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad():
            for b in range(0, tokens.shape[0], BATCH):
                model(input_ids=tokens[b : b + BATCH], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return ins, outs


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_replayed_layers_reproduce_the_true_outputs_exactly(family):
    model = build(family)
    path, layers = find_decoder_layers(model)
    assert path == EXPECTED_PATHS.get(family, "model.layers")
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, model.config.vocab_size, (NSAMPLES, SEQLEN), generator=g)
    true_in, true_out = true_layer_io(model, layers, tokens)

    gptq = GPTQPass()
    with torch.no_grad():
        inputs = gptq._capture(model, layers, tokens, BATCH, CPU)
        assert len(inputs.calls) == len(layers) and all(len(c) == NSAMPLES // BATCH for c in inputs.calls)
        for k, layer in enumerate(layers):
            assert inputs.index == k
            for b, h in enumerate(inputs.hidden):
                assert torch.equal(h, true_in[k][b]), f"{family}: input of layer {k}, batch {b}"
            inputs = gptq._run_layer(layer, inputs, CPU)
            for b, h in enumerate(inputs.hidden):
                assert torch.equal(h, true_out[k][b]), f"{family}: output of layer {k}, batch {b}"

    types = getattr(model.config, "layer_types", None)
    if types and len(set(types)) > 1:
        # the layers really differ: layer k run with layer 0's keyword arguments is off (what GPTQ used to do)
        with torch.no_grad():
            inputs = gptq._capture(model, layers, tokens, BATCH, CPU)
            k = next(i for i, t in enumerate(types) if t != types[0])
            h, kw0 = true_in[k][0], inputs.calls[0][0]
            wrong = _layer_output(layers[k](h, **kw0))
        rel = float((wrong - true_out[k][0]).norm() / true_out[k][0].norm())
        assert rel > 1e-3, f"{family}: layer {k} with layer 0's mask / RoPE differs by only {rel:.2e}"


def test_keyword_tensors_are_shared_not_copied():
    """Masks / RoPE tables repeat across layers and equal batches: one object each, not one per layer and batch."""
    model = build("gemma3")
    _, layers = find_decoder_layers(model)
    tokens = torch.randint(3, 128, (NSAMPLES, SEQLEN), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        inputs = GPTQPass()._capture(model, layers, tokens, BATCH, CPU)
    ids = {id(t) for per_layer in inputs.calls for kw in per_layer for v in kw.values()
           for t in (v if isinstance(v, tuple) else (v,)) if isinstance(t, torch.Tensor)}
    per_call = {id(t) for v in inputs.calls[0][0].values() for t in (v if isinstance(v, tuple) else (v,))
                if isinstance(t, torch.Tensor)}
    # 2 layer types x (cos, sin) + position ids + at most 2 masks, whatever the number of layers and batches
    assert len(ids) <= 7 and len(per_call) >= 3
    a, b = inputs.calls[0][0]["position_embeddings"], inputs.calls[2][1]["position_embeddings"]
    assert a[0] is b[0] and a[1] is b[1]  # layers 0 and 2 are both sliding layers; batches 0 and 1 are alike


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)


class _Config:
    num_hidden_layers = 3


def test_decoder_layers_not_found_or_ambiguous_is_a_clear_error():
    m = nn.Module()
    with pytest.raises(ModelError, match="no num_hidden_layers"):
        find_decoder_layers(m)
    m.config = _Config()
    m.blocks = nn.ModuleList([_Block(), _Block()])
    with pytest.raises(ModelError, match=r"no nn.ModuleList of 3 blocks.*blocks \(2 x _Block\)"):
        find_decoder_layers(m)
    m.blocks.append(_Block())
    assert find_decoder_layers(m) == ("blocks", m.blocks)
    m.other = nn.ModuleList([_Block() for _ in range(3)])
    with pytest.raises(ModelError, match="several candidate.*blocks, other"):
        find_decoder_layers(m)
    del m.other
    m.mixed = nn.ModuleList([_Block(), _Block(), nn.Linear(2, 2)])  # not one class: not a layer stack
    assert find_decoder_layers(m) == ("blocks", m.blocks)
