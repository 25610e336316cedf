"""Replay a causal LM's forward from a CUDA graph: the fixed-shape evaluation loop without per-kernel launch cost.

A fake-quantized model launches one or two extra kernels per linear and attention module. On a small model such as
SmolLM2-135M the GPU finishes those kernels faster than Python can issue them, so an eager forward is bound by the
host, not the GPU. A CUDA graph records every kernel of one forward once and replays them with a single launch:
the forward then costs its GPU time only. The kernels replayed are the ones the eager forward runs, on the same
inputs, so the logits are bit-identical (checked by the GPU tests).

`GraphedForward(model)` is callable like ``model(input_ids=ids, use_cache=False).logits`` for a batch of token ids.
It captures one graph per input shape (at most ``max_graphs``; further shapes run eagerly) and is meant to live
for one evaluation loop: a graph keeps the weights it was captured with, so build a new one after the model
changes (quantization, GPTQ, rotations), and drop it to free its memory pool. The returned logits live in the
graph's memory and are overwritten by the next call with the same shape: consume (or clone) them first.

When capture fails (e.g. a module synchronises with the host, or draws stochastic-rounding noise from a generator),
the shape falls back to the eager forward with a warning that says why; nothing is silently ignored.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch

__all__ = ["GraphedForward", "call_logits"]


def call_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``model``'s logits for token ids [batch, seq]; use_cache=False because a scoring pass keeps no KV cache
    (quantized K / V are read within the forward)."""
    out = model(input_ids=ids, use_cache=False)
    return out.logits if hasattr(out, "logits") else out[0]


# transformers functions whose answer depends on tensor data in general (padding, packed sequences) but is fixed for
# one input shape when, as here, neither an attention mask nor position ids are passed. Under stream capture
# transformers cannot read the data, so it takes the conservative branch and builds an explicit causal mask: other
# attention kernels (other rounding) and a forward measured ~25% slower on SmolLM2-135M at 8 x 2048 on the H100.
# The graph instead replays the answers the eager warm-up forward got.
_MASK_DECISIONS = ("find_packed_sequence_indices", "_ignore_causal_mask_sdpa")


class _DecisionTape:
    """Records the eager answers of `_MASK_DECISIONS` during a warm-up forward and hands them back, in call order,
    during the capture of the same forward. Only ``None`` / bool answers are replayed; a tensor answer (e.g. a real
    packed-sequence mask) is recomputed by the original function during capture."""

    _RECOMPUTE = object()

    def __init__(self) -> None:
        self._answers: list[tuple[str, object]] = []

    @contextlib.contextmanager
    def recording(self):
        def wrap(name, original):
            def recorded(*args, **kwargs):
                out = original(*args, **kwargs)
                self._answers.append((name, out if out is None or isinstance(out, bool) else self._RECOMPUTE))
                return out
            return recorded

        self._answers.clear()
        with _patched(wrap):
            yield

    @contextlib.contextmanager
    def replaying(self):
        pending = list(self._answers)

        def wrap(name, original):
            def replayed(*args, **kwargs):
                if not pending or pending[0][0] != name:
                    raise RuntimeError(f"the captured forward asked transformers.masking_utils.{name} something the "
                                       "eager warm-up did not")
                answer = pending.pop(0)[1]
                return original(*args, **kwargs) if answer is self._RECOMPUTE else answer
            return replayed

        with _patched(wrap):
            yield
        if pending:
            raise RuntimeError("the captured forward made fewer attention-mask decisions than the eager warm-up")


@contextlib.contextmanager
def _patched(wrap):
    """Replace each `_MASK_DECISIONS` function of transformers.masking_utils by ``wrap(name, original)`` meanwhile."""
    try:
        from transformers import masking_utils
    except ImportError:
        yield
        return
    originals = {n: getattr(masking_utils, n) for n in _MASK_DECISIONS if hasattr(masking_utils, n)}
    for name, original in originals.items():
        setattr(masking_utils, name, wrap(name, original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(masking_utils, name, original)


def _release_rng_from_capture(device: torch.device) -> None:
    """Put the device's default random generator back into normal mode after a failed capture.

    A capture that fails ends without its epilogue, which leaves the generator believing it is still being
    captured: every later random op on that device then raises "Offset increment outside graph capture". A fresh
    copy of its state (same seed and offset) is not in capture mode.
    """
    index = device.index if device.index is not None else torch.cuda.current_device()
    gen = torch.cuda.default_generators[index]
    gen.graphsafe_set_state(gen.clone_state())


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    ids: torch.Tensor  # the static input the graph reads
    logits: torch.Tensor  # the static output it writes


class GraphedForward:
    """``model``'s logits for token ids, replayed from one CUDA graph per input shape (see the module docstring).

    Args:
        model: a causal LM on a CUDA device.
        warmup: eager forwards before each capture (fills every lazily built cache, e.g. the quantized weights,
            and lets lazily compiled kernels compile outside the graph); the last one also records transformers'
            attention-mask decisions for the capture (at least one is always run).
        max_graphs: shapes captured at most; later shapes run eagerly.
    """

    def __init__(self, model: torch.nn.Module, warmup: int = 1, max_graphs: int = 2) -> None:
        self.model = model
        self.warmup = warmup
        self.max_graphs = max_graphs
        self._graphs: dict[tuple, _Captured | None] = {}  # None: capture failed, run that shape eagerly

    @staticmethod
    def usable(ids: torch.Tensor) -> bool:
        """Graphs need CUDA tensors, and are only replayed outside an ongoing capture."""
        return ids.is_cuda and not torch.cuda.is_current_stream_capturing()

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.usable(ids):
            return call_logits(self.model, ids)
        key = (tuple(ids.shape), ids.dtype, ids.device, torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        if key not in self._graphs:
            if len(self._graphs) >= self.max_graphs:
                return call_logits(self.model, ids)
            self._graphs[key] = self._capture(ids)
        captured = self._graphs[key]
        if captured is None:
            return call_logits(self.model, ids)
        captured.ids.copy_(ids)
        captured.graph.replay()
        return captured.logits

    @property
    def n_graphs(self) -> int:
        """Shapes replayed from a graph (failed captures not counted)."""
        return sum(c is not None for c in self._graphs.values())

    def _capture(self, ids: torch.Tensor) -> _Captured | None:
        static_ids = ids.clone()
        # warm-up on a side stream, as torch.cuda.graph requires of code that allocates lazily
        side = torch.cuda.Stream(device=ids.device)
        side.wait_stream(torch.cuda.current_stream(ids.device))
        tape = _DecisionTape()
        with torch.cuda.stream(side):
            for _ in range(max(self.warmup - 1, 0)):
                call_logits(self.model, static_ids)
            with tape.recording():
                call_logits(self.model, static_ids)
        torch.cuda.current_stream(ids.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with tape.replaying(), torch.cuda.graph(graph):
                logits = call_logits(self.model, static_ids)
        except Exception as err:  # noqa: BLE001 - any capture failure means: run this shape eagerly
            torch.cuda.synchronize(ids.device)
            _release_rng_from_capture(ids.device)
            warnings.warn(
                f"ptq: could not capture a CUDA graph of {type(self.model).__name__}'s forward for input shape "
                f"{tuple(ids.shape)} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                "running it eagerly instead (same results, more host time). Pass cuda_graph=False to skip the "
                "attempt.", stacklevel=3)
            return None
        return _Captured(graph, static_ids, logits)
