"""CUDA-graph replay of the evaluation forward (ptq.cuda_graph): same logits as eager, clean fallback."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from ptq.cuda_graph import GraphedForward, call_logits
from ptq.eval import MIN_BATCHES_FOR_GRAPH, evaluate_windows
from ptq.passes.base import PassContext
from ptq.passes.swap import SwapPass
from ptq.recipe import load_recipe
from ptq.table import resolve_recipe_path


def _ids(vocab: int, batch: int, length: int, seed: int, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g).to(device)


def test_cpu_inputs_run_eagerly(stories260k):
    model, _ = stories260k
    ids = _ids(model.config.vocab_size, 2, 16, 0)
    fwd = GraphedForward(model)
    with torch.no_grad():
        assert torch.equal(fwd(ids), call_logits(model, ids))
    assert fwd.n_graphs == 0


def test_decision_tape_replays_the_eager_mask_decisions(stories260k):
    """The attention-mask decisions recorded in an eager forward are handed back, in order, to the next forward."""
    from ptq.cuda_graph import _DecisionTape

    model, _ = stories260k
    ids = _ids(model.config.vocab_size, 2, 16, 0)
    tape = _DecisionTape()
    with torch.no_grad():
        with tape.recording():
            want = call_logits(model, ids)
        assert [name for name, _ in tape._answers] == ["find_packed_sequence_indices", "_ignore_causal_mask_sdpa"]
        assert [answer for _, answer in tape._answers] == [None, True]  # no packing, flash-friendly is_causal
        with tape.replaying():
            assert torch.equal(call_logits(model, ids), want)
        with pytest.raises(RuntimeError, match="fewer attention-mask decisions"), tape.replaying():
            pass


# ---- GPU ---------------------------------------------------------------------------------------------------------
def _rtn_model(path, dtype=torch.bfloat16):
    """stories260k on CUDA with the shipped W4A4KV4 recipe swapped in (Triton fake-quant kernels)."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).cuda().eval()
    SwapPass().run(model, load_recipe(resolve_recipe_path("w4a4kv4")), PassContext(progress=False))
    return model


@pytest.mark.gpu
def test_graph_replay_is_bit_identical(stories260k_path):
    model = _rtn_model(stories260k_path)
    fwd = GraphedForward(model, max_graphs=1)
    vocab = model.config.vocab_size
    with torch.inference_mode():
        for seed in range(3):  # new data in the same static input: the graph must read it
            ids = _ids(vocab, 4, 128, seed, "cuda")
            assert torch.equal(fwd(ids).clone(), call_logits(model, ids))
        assert fwd.n_graphs == 1
        other = _ids(vocab, 2, 64, 9, "cuda")  # past max_graphs: eager, still right
        assert torch.equal(fwd(other), call_logits(model, other))
        assert fwd.n_graphs == 1


@pytest.mark.gpu
def test_evaluation_with_graphs_equals_eager(stories260k_path):
    model = _rtn_model(stories260k_path)
    ref = AutoModelForCausalLM.from_pretrained(stories260k_path, dtype=torch.bfloat16).cuda().eval()
    n = 2 * (MIN_BATCHES_FOR_GRAPH + 1) + 1  # enough full batches to graph, plus a partial one (eager)
    windows = _ids(model.config.vocab_size, n, 96, 1)
    kw = dict(ref_model=ref, batch_size=2, progress=False)
    graphed = evaluate_windows(model, windows, cuda_graph=True, **kw)
    eager = evaluate_windows(model, windows, cuda_graph=False, **kw)
    assert graphed == eager


class _SyncingModel(torch.nn.Module):
    """A forward that reads a value back to the host: not capturable."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, use_cache=False):
        out = self.inner(input_ids=input_ids, use_cache=use_cache)
        if out.logits.abs().max().item() < 0:  # the host sync is the point
            raise AssertionError
        return out


@pytest.mark.gpu
def test_capture_failure_falls_back_to_eager_with_a_warning(stories260k_path):
    model = _SyncingModel(AutoModelForCausalLM.from_pretrained(stories260k_path).cuda().eval())
    ids = _ids(512, 2, 32, 0, "cuda")
    fwd = GraphedForward(model)
    with torch.no_grad():
        with pytest.warns(UserWarning, match=r"could not capture a CUDA graph .*\(2, 32\).*running it eagerly"):
            got = fwd(ids)
        assert torch.equal(got, call_logits(model, ids))
        assert fwd.n_graphs == 0
        assert torch.equal(fwd(ids), call_logits(model, ids))  # no second attempt, no second warning
    # the failed capture left the device's random generator usable, with its seed and sequence intact
    torch.cuda.manual_seed(3)
    a = torch.randn(8, device="cuda")
    torch.cuda.manual_seed(3)
    assert torch.equal(a, torch.randn(8, device="cuda"))
