"""The GPTQ pass: decoder layer by decoder layer, true-sequential, with per-layer crash-safe checkpoints.

Flow (``GPTQPass.run``):

1. Calibration windows (``ptq.data.calibration_windows``, memoised in ``ctx.calibration``).
2. Capture the inputs of decoder layer 0 and the keyword arguments of EVERY decoder layer (mask, position
   embeddings, cache arguments: they differ between layers, e.g. Gemma 3's sliding and global layers) by running the
   model in ``cali_batch_size`` batches with each decoder layer replaced by a recorder that stores its call and
   passes the hidden states on without computing the layer (``_capture``). Only the modules outside the decoder
   layers and layer 0 are moved to ``ctx.device`` for this. The decoder layers are found by structure
   (``find_decoder_layers``).
3. Open the checkpoint store (``checkpoint_dir``); finished layers are loaded and REPLAYED (run on the calibration
   inputs) to regenerate the inputs of the first unfinished layer: a resume never trusts stored activations.
4. Per remaining layer, on ``ctx.device`` (the other layers stay where they were): find the groups of targeted
   linears that share an input, in execution order (a probe forward: for Llama q,k,v -> o -> gate,up -> down). For
   each group: accumulate H = 2/N sum x x^T over all calibration tokens from ``LinearMX.prepare_input(x)`` (what the
   matmul really sees: rotated, quantized input), stopping the forward right after the group; run
   ``ptq.gptq.gptq_quantize`` on ``weight_to_quantize()``; ``set_quantized_weight``. Later groups therefore see the
   quantized earlier ones. Then run the finished layer to produce the next layer's inputs, save the checkpoint and
   move the layer back.

Under torchrun (``ptq.distributed``): each rank captures and runs its own share of the calibration batches; the
per-batch x^T x are summed in fp64 and all-reduced, so every rank holds the Hessian one process would have; each
GPTQ solve is split by rows over the ranks (rows are independent given H) and the slices are broadcast, so every rank
ends each group with the same weights; rank 0 writes the checkpoints. A collective that fails (a dead rank) raises
``PeerFailure`` naming the layer to resume from.

Layer by layer (``ctx.weights``, see ``ptq.layerwise``): the model is a meta-device skeleton; `_resident` reads each
decoder layer from the checkpoint shards onto the work device when its turn comes (replays included) and drops it
after its checkpoint is written, so finished layers live only in the checkpoint store.

Which linears: ``LinearMX`` modules whose config has ``gptq = true`` and a weight spec. Linears in one group with
the same Hessian and spec are quantized in one call (rows are independent given H); nvfp4 weights are not merged
because their global scale is per tensor.

Fused MoE experts (``ExpertsMX`` with ``gptq = true``) form a group of their own, at their place in the execution
order: each expert's gate_up and down get their own Hessian from the tokens routed to it, gate_up before down
(``ptq.gptq.experts``). Experts routed fewer than ``[gptq].experts_min_tokens`` tokens (default: the projection's
in_features) use the Hessian pooled over all experts of that projection in the layer; ``info["experts"]`` lists, per
experts module, the routed token counts and which experts used the pooled Hessian. Their checkpoint entries are
``<module>.gate_up_proj`` / ``<module>.down_proj`` with all experts stacked [E, out, in].

Asymmetric calibration (``[gptq].asymmetric``, see ``ptq.gptq.asymmetric``): a second stream of hidden states runs
through an unquantized copy of each decoder layer (every quantizer bypassed, GPTQ weights dropped, rotations kept),
from the same captured layer-0 inputs. Each group then also accumulates C = 2/N sum x_q x^T (x: the unquantized
stream's input of the same linear, in the same basis), and GPTQ quantizes W + s (W* - W) instead of W, W* the
(damped) least-squares fit of the unquantized model's output on the quantized input and s = ``asymmetric``. A resume
replays both streams.

Clip search: ``[gptq].clip_search_y`` -> objective "output" (least output error, using H); else
``quantile_search`` -> "weight"; with both, "output" wins: it is the error GPTQ itself minimises.

Test hook: ``PTQ_TEST_KILL_AT=mid_layer:<k>`` SIGKILLs the process after the first group of layer k is quantized
(crash-safety tests only; see ``ptq.passes.checkpoint._test_hook``).
"""

from __future__ import annotations

import copy
import inspect
import time
import warnings
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from ptq import distributed
from ptq.errors import CheckpointError, ModelError, PtqError
from ptq.gptq import HessianError, gptq_quantize
from ptq.gptq.asymmetric import asymmetric_target, cross_gram
from ptq.gptq.core import gram
from ptq.gptq.experts import ExpertsProjection, experts_targets, gptq_experts
from ptq.passes.base import PassContext, register_pass
from ptq.passes.checkpoint import BackgroundWriter, CheckpointStore, _test_hook

if TYPE_CHECKING:  # pragma: no cover
    from ptq.recipe import Recipe


class _Stop(Exception):
    """Raised from a hook to end a forward early (the rest of the model is not needed)."""


@dataclass
class LayerInputs:
    """The inputs of decoder layer ``index`` for every calibration batch, and every layer's own keyword arguments.

    ``calls[k][b]`` holds what the model passed decoder layer ``k`` for batch ``b`` besides the hidden states (mask,
    position embeddings, cache arguments ...; positional extras are turned into keywords). Layers differ there (Gemma
    3 sliding vs global layers get other masks and RoPE tables), so layer ``k`` is always run with its own. Tensors
    shared between layers stay one object, and batches with equal contents share one copy (see `_SharedTensors`).
    """

    hidden: list[torch.Tensor]  # one tensor per batch, on the work device
    calls: list[list[dict]]  # [layer][batch] -> keyword arguments of that layer's call
    index: int = 0  # the decoder layer these hidden states are the input of
    moved: dict = field(default_factory=dict)  # id(captured tensor) -> (captured, copy on the work device)

    def batches(self, device: torch.device):
        """(hidden, keyword arguments) of layer ``index``, batch by batch, on ``device``."""
        for h, kw in zip(self.hidden, self.calls[self.index]):
            yield h, _to_device(kw, device, self.moved)

    def advance(self, hidden: list[torch.Tensor]) -> "LayerInputs":
        """The inputs of the next layer, given this layer's outputs."""
        return LayerInputs(hidden, self.calls, self.index + 1, self.moved)


def _to_device(obj: Any, device: torch.device, moved: dict) -> Any:
    """``obj`` with its tensors on ``device``; a tensor moved once is reused by identity (``moved``)."""
    if isinstance(obj, torch.Tensor):
        if obj.device == device:
            return obj
        hit = moved.get(id(obj))
        if hit is None or hit[0] is not obj:
            hit = moved[id(obj)] = (obj, obj.to(device))
        return hit[1]
    if isinstance(obj, tuple):
        return tuple(_to_device(o, device, moved) for o in obj)
    if isinstance(obj, list):
        return [_to_device(o, device, moved) for o in obj]
    if isinstance(obj, dict):
        return {k: _to_device(v, device, moved) for k, v in obj.items()}
    return obj


class _SharedTensors:
    """Keeps one copy of equal keyword-argument tensors across calibration batches (masks, RoPE tables and position
    ids usually repeat batch after batch). Only bit-identical tensors (``torch.equal``, same dtype / shape / device)
    are merged, so every layer still gets exactly what the model gave it."""

    def __init__(self) -> None:
        self._by_id: dict[int, torch.Tensor] = {}
        self._by_shape: dict[tuple, list[torch.Tensor]] = defaultdict(list)

    def __call__(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            known = self._by_id.get(id(obj))
            if known is obj:
                return obj
            pool = self._by_shape[(obj.dtype, tuple(obj.shape), obj.stride(), obj.device)]
            for t in pool:
                if torch.equal(t, obj):
                    return t
            pool.append(obj)
            self._by_id[id(obj)] = obj
            return obj
        if isinstance(obj, tuple):
            return tuple(self(o) for o in obj)
        if isinstance(obj, list):
            return [self(o) for o in obj]
        if isinstance(obj, dict):
            return {k: self(v) for k, v in obj.items()}
        return obj


def _num_layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        n = getattr(text, attr, None)
        if isinstance(n, int) and n > 0:
            return n
    return None


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of decoder layers, found by structure: the outermost ``nn.ModuleList`` of blocks of one
    class whose length is the config's number of layers (``num_hidden_layers`` / ``n_layer``), anywhere in the model
    (``model.layers``, ``gpt_neox.layers``, ``transformer.h`` ...). Raises ``ModelError`` when there is none or more
    than one."""
    n = _num_layers(model)
    if n is None:
        raise ModelError(
            f"GPTQ cannot find the decoder layers of {type(model).__name__}: its config has no num_hidden_layers / "
            "n_layer to recognise them by; GPTQ supports Hugging Face causal LMs whose config has one")
    stacks = [(name, m) for name, m in model.named_modules()
              if isinstance(m, nn.ModuleList) and len(m) == n and len({type(c) for c in m}) == 1]
    outer = [(name, m) for name, m in stacks
             if not any(other != name and name.startswith(other + ".") for other, _ in stacks)]
    if len(outer) == 1:
        return outer[0]
    lists = [f"{name} ({len(m)} x {type(m[0]).__name__ if len(m) else '-'})" for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList)]
    if not outer:
        raise ModelError(
            f"GPTQ cannot find the decoder layers of {type(model).__name__}: no nn.ModuleList of {n} blocks of one "
            f"class (config: {n} layers); module lists in the model: {', '.join(lists) or 'none'}")
    raise ModelError(
        f"GPTQ found several candidate decoder-layer stacks in {type(model).__name__} "
        f"({', '.join(name for name, _ in outer)}; each {n} blocks of one class) and cannot tell which one the "
        "language model runs; quantize the text model on its own")


class _LayerRecorder(nn.Module):
    """Stands in for decoder layer ``index`` during the capture: hands its call to ``on_call`` (which records it and
    returns the hidden states unchanged in the layer's output structure) without computing the layer. Attribute
    reads fall through to the real layer, so model code that asks a layer for e.g. its ``attention_type`` works."""

    def __init__(self, layer: nn.Module, index: int, on_call) -> None:
        super().__init__()
        self.__dict__["_real"] = layer  # not a submodule: .to() / named_modules() must not see it twice
        self.__dict__["_on_call"] = on_call
        self.index = index

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_real"], name)

    def forward(self, *args, **kwargs):
        return self._on_call(self.index, args, kwargs)


def _hidden_and_keywords(layer: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, dict]:
    """Split a decoder layer call into its hidden states and keyword arguments (positional extras named by the
    layer's forward signature, e.g. GPT-2 passes the mask positionally)."""
    kwargs = dict(kwargs)
    if not args:
        if "hidden_states" not in kwargs:
            raise ModelError(f"{type(layer).__name__} was called without hidden states (no positional argument and "
                             "no hidden_states=); GPTQ cannot tell which argument is the layer input")
        return kwargs.pop("hidden_states"), kwargs
    if len(args) > 1:
        params = list(inspect.signature(layer.forward).parameters.values())
        named = params[1 : len(args)]
        if len(named) < len(args) - 1 or any(p.kind not in (p.POSITIONAL_OR_KEYWORD,) for p in named):
            raise ModelError(
                f"{type(layer).__name__}.forward takes {len(args)} positional arguments that cannot all be passed "
                "by name; GPTQ needs the decoder layer's extra arguments as keywords")
        for p, value in zip(named, args[1:]):
            kwargs[p.name] = value
    return args[0], kwargs


def _output_template(out: Any) -> Any:
    """What a decoder layer returns besides the hidden states: None for a bare tensor, else (type, the rest)."""
    if isinstance(out, torch.Tensor):
        return None
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return type(out), tuple(out[1:])
    raise ModelError(f"a decoder layer returned {type(out).__name__}; GPTQ expects a tensor or a tuple whose first "
                     "element is the hidden states")


def _in_structure(hidden: torch.Tensor, template: Any) -> Any:
    if template is None:
        return hidden
    kind, rest = template
    return kind((hidden, *rest))


def _is_target(m: nn.Module) -> bool:
    from ptq.modules.linear import LinearMX

    return isinstance(m, LinearMX) and m.cfg.gptq and m.cfg.weight is not None


def targeted_linears(layer: nn.Module) -> list[tuple[str, nn.Module | ExpertsProjection]]:
    """The linears of ``layer`` that GPTQ quantizes: LinearMX with ``gptq = true`` and a weight spec, and the two
    projections of every such ExpertsMX (as `ExpertsProjection` entries, see ``ptq.gptq.experts``)."""
    from ptq.modules.experts import ExpertsMX

    out: list[tuple[str, nn.Module | ExpertsProjection]] = []
    for n, m in layer.named_modules():
        if _is_target(m):
            out.append((n, m))
        elif isinstance(m, ExpertsMX) and m.cfg.gptq and m.cfg.weight is not None:
            out += experts_targets(n, m)
    return out


def _hooked_module(target) -> nn.Module:
    return target.module if isinstance(target, ExpertsProjection) else target


def _module_devices(module: nn.Module) -> torch.device | None:
    for t in list(module.parameters(recurse=True)) + list(module.buffers(recurse=True)):
        return t.device
    return None


def _move_outside_layers(model: nn.Module, layers: nn.ModuleList, device) -> list[tuple[nn.Module, torch.device]]:
    """Move every module outside the decoder layers to ``device``; return (module, old device) to undo it."""
    moved: list[tuple[nn.Module, torch.device]] = []
    ancestors = {id(m) for m in model.modules() if any(x is layers for x in m.modules())}

    def visit(m: nn.Module) -> None:
        for child in m.children():
            if child is layers:
                continue
            if id(child) in ancestors:
                visit(child)
            else:
                old = _module_devices(child)
                if old is not None and old != device:
                    child.to(device)
                    moved.append((child, old))

    visit(model)
    return moved


def _layer_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _resolve_device(ctx: PassContext) -> torch.device:
    device = torch.device(ctx.device if ctx.device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None:  # under torchrun: this rank's GPU (set by the launcher code)
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _ptq_version() -> str:
    import ptq

    return str(getattr(ptq, "__version__", "unknown"))


def clip_objective(cfg) -> str | None:
    """The per-block clip search GPTQ runs: "output" (clip_search_y), "weight" (quantile_search) or None."""
    if cfg.clip_search_y:
        return "output"
    if cfg.quantile_search:
        return "weight"
    return None


@register_pass
class GPTQPass:
    """GPTQ for the linears whose config says ``gptq = true`` (see the module docstring)."""

    name = "gptq"
    after = ("swap", "rotation_search", "rotation_learn")

    def wanted(self, recipe: "Recipe") -> bool:
        return recipe.gptq is not None

    def __init__(self) -> None:
        self._device = torch.device("cpu")
        self._times: dict[str, float] = defaultdict(float)
        self._weights = None  # ptq.layerwise.ShardedWeights in layer-by-layer mode (ctx.weights), else None
        self._layers_path = ""

    # ---- entry ------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, model: nn.Module, recipe: "Recipe", ctx: PassContext) -> dict:
        homes = [(t, t.device) for t in list(model.parameters()) + list(model.buffers())]
        try:
            return self._run(model, recipe, ctx)
        finally:
            # Module.to() can rebind tied parameters (embed_tokens / lm_head) so that moving one module back leaves
            # the shared tensor behind; put every tensor back where it was, by identity.
            for t, dev in homes:
                if t.device != dev:
                    t.data = t.data.to(dev)

    def _run(self, model: nn.Module, recipe: "Recipe", ctx: PassContext) -> dict:
        cfg = recipe.gptq
        if cfg is None:
            raise PtqError("the gptq pass needs a [gptq] table in the recipe")
        t_start = time.perf_counter()
        device = _resolve_device(ctx)
        self._device = device
        self._times = defaultdict(float)
        self._experts_report: dict[str, dict] = {}
        self._weights = getattr(ctx, "weights", None)
        layers_path, layers = find_decoder_layers(model)
        self._layers_path = layers_path
        targets = {i: targeted_linears(layer) for i, layer in enumerate(layers)}
        n_targets = sum(len(t) for t in targets.values())
        inside = {id(m) for t in targets.values() for _, m in t}
        outside = [f"{n}" for n, m in model.named_modules() if id(m) not in inside and _is_target(m)]
        if outside:
            raise ModelError(
                f"GPTQ quantizes linears inside the decoder layers ({layers_path}.N) only, but {', '.join(outside)} "
                f"also has gptq = true; set gptq = false for it (its weight is then quantized by RTN)")
        if n_targets == 0:
            raise ModelError(
                "[gptq] is set but no swapped linear has gptq = true and a weight spec: add `gptq = true` (and "
                "weight_width) to the selectors of the linears GPTQ should quantize, or remove [gptq]")
        lazy = self._weights is not None
        if lazy and not cfg.checkpoint_dir:
            raise PtqError("layer-by-layer GPTQ keeps no finished layer in memory: its results live only in the "
                           "checkpoint store, so [gptq].checkpoint_dir must be set")
        if not lazy and any(p.is_meta for p in model.parameters()):
            raise ModelError("the model has weights on the meta device (a skeleton): load it with "
                             "ptq.layerwise.load_skeleton and pass its weights as PassContext(weights=...)")
        with self._timed("calibration_data"):
            tokens, data_fp = self._calibration(model, cfg, ctx)
        bs = cfg.cali_batch_size
        n_batches = -(-tokens.shape[0] // bs)
        world = distributed.world_size()
        if n_batches < world:
            raise PtqError(f"GPTQ has {n_batches} calibration batches (nsamples {tokens.shape[0]} / cali_batch_size "
                           f"{bs}) for {world} ranks; every rank needs one: raise [gptq].nsamples or lower "
                           "cali_batch_size or the number of ranks")
        has_experts = any(isinstance(t, ExpertsProjection) for ts in targets.values() for _, t in ts)
        if cfg.asymmetric > 0 and has_experts:
            raise PtqError("[gptq].asymmetric does not cover fused MoE experts (their per-expert Hessians have no "
                           "cross term yet): set asymmetric = 0, or gptq = false for the experts")
        if world > 1 and has_experts:
            raise PtqError("data-parallel GPTQ of fused MoE experts is not implemented (their per-expert Hessians are "
                           "not all-reduced): run this recipe in one process, or set gptq = false for the experts")
        mine = distributed.my_share(n_batches)
        my_tokens = torch.cat([tokens[b * bs : (b + 1) * bs] for b in mine])
        store = self._open_store(model, cfg, ctx, data_fp, len(layers)) if cfg.checkpoint_dir else None
        start = store.finished if store is not None else 0
        info: dict[str, Any] = {"layers": len(layers), "modules": n_targets, "loaded": [], "computed": [],
                                "checkpoint_dir": cfg.checkpoint_dir, "resumed_at": start,
                                "clip_search": clip_objective(cfg), "asymmetric": cfg.asymmetric,
                                "proxy_loss": {}, "world_size": world,
                                "layer_by_layer": lazy,
                                "tokens_per_rank": distributed.all_gather_object(int(my_tokens.numel()),
                                                                                 "sharing the calibration counts")}
        try:
            self._layers(model, layers, targets, store, start, my_tokens, cfg, ctx, info)
        except distributed.PeerFailure as err:
            done = start + len(info["computed"])
            where = f"the checkpoints in {cfg.checkpoint_dir}" if store is not None else "nothing (no checkpoint_dir)"
            raise distributed.PeerFailure(
                f"{err}. GPTQ stopped at layer {done}; {done} finished layers are kept in {where}: run the same "
                "command again to resume from there") from err
        if self._experts_report:
            info["experts"] = {f"{layers_path}.{k}": v for k, v in self._experts_report.items()}
        info["gptq_seconds"] = time.perf_counter() - t_start
        info["time_breakdown"] = {k: round(v, 3) for k, v in self._times.items()}
        if device.type == "cuda":
            info["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated(device)
        return info

    def _open_store(self, model, cfg, ctx, data_fp, n_layers) -> CheckpointStore:
        """Rank 0 creates or verifies the checkpoint directory; the other ranks then open what it vouched for."""
        if distributed.is_main():
            try:
                with self._timed("fingerprint"):
                    fingerprint = {
                        "model": (self._weights.digest_like(model) if self._weights is not None
                                  else self._model_fingerprint(model)),
                        "recipe": self._recipe_fingerprint(model, cfg),
                        "data": data_fp,
                        "version": _ptq_version(),
                    }
                    store = CheckpointStore.open(cfg.checkpoint_dir, fingerprint, n_layers, resume=ctx.resume)
            except PtqError as err:
                distributed.broadcast_object(("error", str(err)), 0, "opening the checkpoint store")
                raise
            distributed.broadcast_object(("ok", fingerprint), 0, "opening the checkpoint store")
            return store
        status, payload = distributed.broadcast_object(None, 0, "opening the checkpoint store")
        if status == "error":
            raise CheckpointError(f"rank 0 refused the checkpoint store: {payload}")
        return CheckpointStore.open(cfg.checkpoint_dir, payload, n_layers, resume=True)

    def _layers(self, model, layers, targets, store, start, tokens, cfg, ctx, info) -> None:
        """Load or replay the finished layers, then quantize the others one by one."""
        from tqdm.auto import tqdm

        device, path, lazy = self._device, self._layers_path, self._weights is not None
        show = ctx.progress and distributed.is_main()
        if not lazy:
            for i in range(start):
                self._apply_saved(store, i, targets[i], cfg)
                info["loaded"].append(i)
        if start == len(layers):
            if lazy:
                info["loaded"] = list(range(start))
            return
        with self._timed("capture"):
            inputs = self._capture(model, layers, tokens, cfg.cali_batch_size, device)
        # the unquantized model's hidden states (asymmetric calibration); layer 0's inputs are the same
        reference = inputs if cfg.asymmetric > 0 else None
        # replay: regenerate the first unfinished layer's inputs from the stored weights, never from stored activations
        for i in tqdm(range(start), desc=f"GPTQ: replaying {start} checkpointed layers", unit="layer",
                      disable=not show or not start):
            with self._timed("replay"), self._resident(layers[i], i):
                if lazy:
                    self._apply_saved(store, i, targets[i], cfg)
                    info["loaded"].append(i)
                if reference is not None:
                    reference = self._run_layer(unquantized_copy(layers[i]), reference, device)
                inputs = self._run_layer(layers[i], inputs, device)
        bar = tqdm(total=len(layers), initial=start, disable=not show, unit="layer",
                   desc="GPTQ" + (f" (resumed at layer {start})" if start else ""))
        writer = BackgroundWriter(store) if store is not None and distributed.is_main() else None
        with writer if writer is not None else nullcontext():
            for i in range(start, len(layers)):
                layer = layers[i]
                with self._resident(layer, i):
                    plain = unquantized_copy(layer) if reference is not None else None
                    results = self._quantize_layer(i, layer, targets[i], inputs, cfg, device, plain, reference)
                    if i + 1 < len(layers):
                        with self._timed("layer_outputs"):
                            inputs = self._run_layer(layer, inputs, device)
                            if plain is not None:
                                reference = self._run_layer(plain, reference, device)
                    del plain
                    for name, (m, loss) in results.items():
                        info["proxy_loss"][f"{path}.{i}.{name}"] = loss
                    if writer is not None:
                        with self._timed("checkpoint"):
                            writer.save_layer(i, {f"{path}.{i}.{n}": m.effective_weight()
                                                  for n, (m, _) in results.items()})
                info["computed"].append(i)
                bar.update(1)
        bar.close()

    def _apply_saved(self, store, i, targets, cfg) -> None:
        saved = store.load_layer(i)
        for name, m in targets:
            key = f"{self._layers_path}.{i}.{name}"
            if key not in saved:
                raise CheckpointError(
                    f"checkpoint layer {i} in {cfg.checkpoint_dir} has no weights for {key}: it does not "
                    f"match this model. Delete {cfg.checkpoint_dir} or set [gptq].checkpoint_dir to a new "
                    "directory to start over")
            m.set_quantized_weight(saved[key])

    @contextmanager
    def _resident(self, layer: nn.Module, index: int):
        """Decoder layer ``index`` on the work device for the duration: moved there and back, or in layer-by-layer
        mode read from the checkpoint shards onto the device and dropped afterwards (its parameters back on meta;
        its GPTQ weights are in the checkpoint store by then)."""
        if self._weights is None:
            old = _module_devices(layer)
            layer.to(self._device)
            try:
                yield layer
            finally:
                if old is not None:
                    layer.to(old)
            return
        from ptq.layerwise import release

        with self._timed("load_layer"):
            self._weights.load_into(layer, f"{self._layers_path}.{index}.", self._device)
        # buffers computed at construction (kept on the CPU by the skeleton) visit the device with the layer
        visiting = [(mod, n, b) for mod in layer.modules() for n, b in mod._buffers.items()
                    if b is not None and not b.is_meta and b.device != self._device]
        for mod, n, b in visiting:
            mod._buffers[n] = b.to(self._device)
        try:
            yield layer
        finally:
            release(layer)
            for mod, n, b in visiting:
                mod._buffers[n] = b

    @contextmanager
    def _timed(self, what: str):
        """Accumulate wall time per phase (synchronising CUDA so the split is honest) for info["time_breakdown"]."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self._device.type == "cuda":
                torch.cuda.synchronize(self._device)
            self._times[what] += time.perf_counter() - t0

    # ---- calibration ------------------------------------------------------------------------------------------------
    def _calibration(self, model: nn.Module, cfg, ctx: PassContext) -> tuple[torch.Tensor, dict]:
        from ptq import data
        from ptq.io import digest_json, digest_tensors

        tok = ctx.tokenizer
        if tok is None:
            name = cfg.model_name or getattr(getattr(model, "config", None), "_name_or_path", None)
            if not name:
                raise PtqError("GPTQ needs a tokenizer for its calibration text: pass tokenizer=... or set "
                               "[gptq].model_name to a model whose tokenizer should be used")
            try:
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(name)
            except Exception as err:  # noqa: BLE001 - any loading failure gets the same advice
                raise PtqError(f"GPTQ could not load a tokenizer from {name!r} ([gptq].model_name or the model's "
                               f"_name_or_path): {err}. Pass tokenizer=... instead") from None
            ctx.tokenizer = tok
        tokens, bos = data.shared_calibration_windows(ctx.calibration, tok, cfg.dataset, cfg.nsamples, cfg.seqlen,
                                                      seed=cfg.seed, data_dir=ctx.data_dir)
        src = cfg.dataset if isinstance(cfg.dataset, str) else f"list of {len(cfg.dataset)} strings " \
            f"({digest_json(list(cfg.dataset))[:16]})"
        fp = {"dataset": src, "nsamples": cfg.nsamples, "seqlen": cfg.seqlen, "seed": cfg.seed, "bos_id": bos,
              "tokens": digest_tensors([("tokens", tokens)])}
        return tokens, fp

    # ---- fingerprints -----------------------------------------------------------------------------------------------
    @staticmethod
    def _model_fingerprint(model: nn.Module) -> dict:
        from ptq.io import model_fingerprint

        return model_fingerprint(model)

    @staticmethod
    def _recipe_fingerprint(model: nn.Module, cfg) -> dict:
        """GPTQ settings and every quantization config in the model (all of them shape the calibration inputs)."""
        from ptq.io import digest_json

        settings = cfg.model_dump(mode="json", exclude={"checkpoint_dir", "model_name"})
        texts = settings.get("dataset")
        if isinstance(texts, list):  # keep the manifest small: the text itself is not needed
            settings["dataset"] = f"list of {len(texts)} strings, sha256 {digest_json(texts)}"
        modules = {}
        for name, m in model.named_modules():
            mcfg = getattr(m, "cfg", None)
            if mcfg is None:
                continue
            entry = {"config": repr(mcfg)}
            for attr in ("rotation", "rotation_mode", "qk_rotation", "v_rotation"):
                if getattr(m, attr, None) is not None:
                    entry[attr] = repr(getattr(m, attr))
            modules[name] = entry
        return {"gptq": settings, "modules": modules}

    # ---- layer plumbing ---------------------------------------------------------------------------------------------
    def _capture(self, model, layers, tokens, batch_size, device) -> LayerInputs:
        """The inputs of decoder layer 0 for every calibration batch, and every layer's keyword arguments.

        Each decoder layer is replaced by a `_LayerRecorder` for the duration: the model runs its embeddings and
        whatever it computes per layer (masks, RoPE tables), each recorder stores its call and passes the hidden
        states on untouched, and the last one ends the forward. The layers themselves are not computed, except layer
        0 once on the first batch to learn the output structure (tensor or tuple) the model expects back."""
        n = len(layers)
        hidden: list[torch.Tensor] = []
        calls: list[list[dict]] = [[] for _ in range(n)]
        shared = _SharedTensors()
        first = layers[0]
        state: dict[str, Any] = {"template": "unknown", "passed": None}

        def on_call(k: int, args: tuple, kwargs: dict):
            h, kw = _hidden_and_keywords(first, args, kwargs)
            if k == 0:
                hidden.append(h.detach())
                if state["template"] == "unknown":
                    state["template"] = _output_template(first(h, **kw))
            elif h is not state["passed"]:
                raise ModelError(
                    f"{type(model).__name__} changes the hidden states between decoder layers {k - 1} and {k} (layer "
                    f"{k} did not get layer {k - 1}'s output); GPTQ runs the layers one after the other and cannot "
                    "reproduce that")
            calls[k].append(shared(kw))
            if k == n - 1:
                raise _Stop
            state["passed"] = h
            return _in_structure(h, state["template"])

        moved = _move_outside_layers(model, layers, device)
        real = list(layers)
        for k in range(n):
            layers[k] = _LayerRecorder(real[k], k, on_call)
        try:
            with self._resident(first, 0):
                for b in range(0, tokens.shape[0], batch_size):
                    state["passed"] = None
                    try:
                        model(input_ids=tokens[b : b + batch_size].to(device), use_cache=False)
                    except _Stop:
                        pass
        finally:
            for k in range(n):
                layers[k] = real[k]
            for m, dev in moved:
                m.to(dev)
        batches = -(-tokens.shape[0] // batch_size)
        reached = [k for k in range(n) if len(calls[k]) != batches]
        if len(hidden) != batches or reached:
            raise ModelError(f"{type(model).__name__}'s forward did not call every decoder layer once per "
                             f"calibration batch (layers {reached or [0]} were not reached {batches} times)")
        return LayerInputs(hidden, calls)

    def _run_layer(self, layer, inputs: LayerInputs, device) -> LayerInputs:
        """The layer's outputs for every batch (the layer is already on ``device``: see `_resident`)."""
        return inputs.advance([_layer_output(layer(h, **kw)).detach() for h, kw in inputs.batches(device)])

    def _groups(self, layer, targets, inputs: LayerInputs, device) -> list[list[tuple[str, nn.Module]]]:
        """Targeted linears grouped by shared input, in execution order (probe forward on one batch). The two
        projections of an experts module are one group of their own."""
        calls: list[tuple[list, nn.Module, torch.Tensor]] = []
        seen: set[int] = set()
        entries: dict[int, tuple[nn.Module, list]] = {}
        for n, t in targets:
            mod = _hooked_module(t)
            entries.setdefault(id(mod), (mod, []))[1].append((n, t))

        def hook_for(members):
            def hook(module, args):
                if id(module) not in seen:
                    seen.add(id(module))
                    calls.append((members, module, args[0]))  # holding the tensor keeps `is` comparisons valid
            return hook

        handles = [mod.register_forward_pre_hook(hook_for(members)) for mod, members in entries.values()]
        try:
            h, kw = next(iter(inputs.batches(device)))
            layer(h, **kw)
        finally:
            for hd in handles:
                hd.remove()
        missing = [n for n, t in targets if id(_hooked_module(t)) not in seen]
        if missing:
            raise ModelError(f"GPTQ: linears {missing} were not called by their decoder layer's forward, so they "
                             f"have no calibration inputs; set gptq = false for them")
        groups: list[list[tuple[str, nn.Module]]] = []
        prev = None
        for members, m, x in calls:
            experts = isinstance(members[0][1], ExpertsProjection)
            if prev is not None and x is prev and not experts:
                groups[-1] += members
            else:
                groups.append(list(members))
            prev = None if experts else x
        return groups

    def _run_through(self, layer, module: nn.Module, inputs: LayerInputs, device) -> None:
        """Run ``layer`` on every calibration batch, stopping right after ``module``'s forward."""
        def stop(*_):
            raise _Stop

        handle = module.register_forward_hook(stop)
        try:
            for h, kw in inputs.batches(device):
                try:
                    layer(h, **kw)
                except _Stop:
                    pass
        finally:
            handle.remove()

    def _quantize_experts(self, index, layer, group, inputs, cfg, device) -> dict[str, tuple]:
        """GPTQ per expert for one experts module (``group``: its two `ExpertsProjection` targets)."""
        module = group[0][1].module
        name = group[0][0].rpartition(".")[0]
        with self._timed("experts"):
            report = gptq_experts(module, lambda: self._run_through(layer, module, inputs, device),
                                  percdamp=cfg.percdamp, act_order=cfg.act_order, clip=clip_objective(cfg),
                                  min_tokens=cfg.experts_min_tokens, where=f"layer {index} {name}")
        self._experts_report[f"{index}.{name}"] = report.as_dict()
        return {n: (t, float(sum(report.proxy_loss[t.which]))) for n, t in group}

    def _hessians(self, layer, group, inputs: LayerInputs, device, plain=None, reference=None
                  ) -> tuple[dict[tuple, torch.Tensor], dict[tuple, torch.Tensor]]:
        """H = 2/N sum x x^T of each distinct prepared input of the group, over every calibration token of every rank,
        and with ``plain`` (the layer's unquantized copy) and ``reference`` (its inputs from the unquantized stream)
        the cross term C = 2/N sum x x_ref^T per input as well (else an empty dict).

        Each batch's x^T x is an fp32 GEMM (`gram`: bf16 inputs on the tensor cores, exact products); the batches
        are summed in fp64 (exact for the magnitudes that occur), so the result does not depend on how batches are
        split over ranks or in which order they are summed, and the ranks' sums are all-reduced before scaling."""
        sums: dict[tuple, torch.Tensor] = {}
        cross: dict[tuple, torch.Tensor] = {}
        counts: dict[tuple, int] = {}
        keys = {id(m): self._input_key(m) for _, m in group}
        last = group[-1][1]
        state: dict[str, Any] = {"done": set(), "ref": {}}

        def hook(module, args):
            k = keys[id(module)]
            if k not in state["done"]:  # q, k, v usually share one prepared input: use it once per batch
                state["done"].add(k)
                x = module.prepare_input(args[0]).reshape(-1, args[0].shape[-1])
                if k not in sums:
                    sums[k] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
                    counts[k] = 0
                    if plain is not None:
                        cross[k] = torch.zeros_like(sums[k])
                sums[k] += gram(x)
                counts[k] += x.shape[0]
                if plain is not None:
                    cross[k] += cross_gram(x, state["ref"].pop(k))
            if module is last:
                raise _Stop

        ref_hooks = []
        if plain is not None:
            # the copy's module of each group member (same names): record its input, unquantized, in the same basis
            twins = {id(plain.get_submodule(name)): keys[id(m)] for name, m in group}
            last_twin = plain.get_submodule(group[-1][0])

            def ref_hook(module, args):
                k = twins[id(module)]
                if k not in state["ref"]:
                    state["ref"][k] = module.prepare_input(args[0]).reshape(-1, args[0].shape[-1])
                if module is last_twin:
                    raise _Stop

            ref_hooks = [plain.get_submodule(name).register_forward_pre_hook(ref_hook) for name, _ in group]
        handles = [m.register_forward_pre_hook(hook) for _, m in group]
        try:
            refs = reference.batches(device) if reference is not None else None
            for h, kw in inputs.batches(device):
                state["done"] = set()
                if refs is not None:
                    state["ref"] = {}
                    rh, rkw = next(refs)
                    try:
                        plain(rh, **rkw)
                    except _Stop:
                        pass
                try:
                    layer(h, **kw)
                except _Stop:
                    pass
        finally:
            for hd in handles + ref_hooks:
                hd.remove()
        out, out_cross = {}, {}
        for k, total in sums.items():  # same insertion order on every rank: the same forward ran
            n = distributed.all_reduce_sum(torch.tensor([counts[k]], dtype=torch.float64, device=total.device),
                                           f"summing calibration token counts (layer {inputs.index})")
            distributed.all_reduce_sum(total, f"summing Hessians (layer {inputs.index})")
            out[k] = (total * (2.0 / float(n[0]))).to(torch.float32)
            if k in cross:
                distributed.all_reduce_sum(cross[k], f"summing cross terms (layer {inputs.index})")
                out_cross[k] = (cross[k] * (2.0 / float(n[0]))).to(torch.float32)
        return out, out_cross

    def _solve(self, weight: torch.Tensor, hessian: torch.Tensor, spec, cfg, clip) -> torch.Tensor:
        """GPTQ of ``weight`` (the quantized weight). Rows are independent given H, so under torchrun each rank
        solves its own slice of rows (nvfp4's per-tensor scale taken from the whole weight) and broadcasts it."""
        kw = dict(percdamp=cfg.percdamp, act_order=cfg.act_order, clip=clip)
        world = distributed.world_size()
        rows = weight.shape[0]
        if world == 1 or rows < world:
            return gptq_quantize(weight, hessian, spec, **kw).weight
        if spec.family == "nvfp4":
            from ptq.quantizers import nvfp4_global_scale

            kw["global_scale"] = nvfp4_global_scale(weight.float())
        cuts = [rows * r // world for r in range(world + 1)]
        out = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
        me = distributed.rank()
        out[cuts[me] : cuts[me + 1]] = gptq_quantize(weight[cuts[me] : cuts[me + 1]], hessian, spec, **kw).weight
        for src in range(world):
            distributed.broadcast(out[cuts[src] : cuts[src + 1]], src, f"sharing GPTQ rows {cuts[src]}-{cuts[src + 1]}")
        return out

    @staticmethod
    def _input_key(m) -> tuple:
        """Linears with equal keys see the same prepared input (same data_in spec and rotation)."""
        return (m.cfg.data_in, id(getattr(m, "rotation", None)), getattr(m, "rotation_mode", None))

    def _quantize_layer(self, index, layer, targets, inputs, cfg, device, plain=None, reference=None
                        ) -> dict[str, tuple[nn.Module, float]]:
        results: dict[str, tuple[nn.Module, float]] = {}
        if not targets:
            return results
        with self._timed("hessians"):
            groups = self._groups(layer, targets, inputs, device)
        clip = clip_objective(cfg)
        for gi, group in enumerate(groups):
            if isinstance(group[0][1], ExpertsProjection):
                results.update(self._quantize_experts(index, layer, group, inputs, cfg, device))
                if gi == 0:
                    _test_hook("mid_layer", index)
                continue
            with self._timed("hessians"):
                hs, cross = self._hessians(layer, group, inputs, device, plain, reference)
            # merge linears sharing H and spec into one GPTQ call (rows are independent given H)
            batches: dict[tuple, list[tuple[str, nn.Module]]] = {}
            for name, m in group:
                spec = m.cfg.weight
                merge = spec.family != "nvfp4"
                key = (self._input_key(m), spec, name if not merge else None)
                batches.setdefault(key, []).append((name, m))
            for key, mods in batches.items():
                w = torch.cat([m.weight_to_quantize().to(device) for _, m in mods], 0)
                rows = [m.out_features for _, m in mods]
                try:
                    if cfg.asymmetric > 0:
                        with self._timed("asymmetric_target"):
                            w = asymmetric_target(w, hs[key[0]], cross[key[0]], cfg.percdamp, cfg.asymmetric)
                    with self._timed("solve"):
                        qw = self._solve(w, hs[key[0]], key[1], cfg, clip)
                except HessianError as err:
                    names = ", ".join(f"layer {index} {n}" for n, _ in mods)
                    raise HessianError(f"{names}: {err}") from None
                for (name, m), qi, wi in zip(mods, qw.split(rows, 0), w.split(rows, 0)):
                    m.set_quantized_weight(qi)
                    d = (wi - qi)
                    results[name] = (m, float(torch.einsum("ri,ij,rj->", d, hs[key[0]], d)))
            if gi == 0:
                _test_hook("mid_layer", index)
        return results


def unquantized_copy(layer: nn.Module) -> nn.Module:
    """A copy of ``layer`` that computes what the unquantized model computes: every LinearMX / AttentionMX / ExpertsMX
    quantizer bypassed and their GPTQ weights dropped; online rotations stay (they cancel without quantization)."""
    from ptq.modules.bypass import bypass_quantizers

    plain = copy.deepcopy(layer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "dropping the GPTQ-quantized weight": intended here
        bypass_quantizers(plain)
    return plain
