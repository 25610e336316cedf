"""The GPTQ pass: decoder layer by decoder layer, true-sequential, with per-layer crash-safe checkpoints.

Flow (``GPTQPass.run``):

1. Calibration windows (``ptq.data.calibration_windows``, memoised in ``ctx.calibration``).
2. Capture the inputs of decoder layer 0 (and its keyword arguments: position embeddings, mask, ...) by running the
   model in ``cali_batch_size`` batches with a pre-hook on layer 0 that stops the forward there. Only the modules
   outside the decoder layers and layer 0 are moved to ``ctx.device`` for this.
3. Open the checkpoint store (``checkpoint_dir``); finished layers are loaded and REPLAYED (run on the calibration
   inputs) to regenerate the inputs of the first unfinished layer: a resume never trusts stored activations.
4. Per remaining layer, on ``ctx.device`` (the other layers stay where they were): find the groups of targeted
   linears that share an input, in execution order (a probe forward: for Llama q,k,v -> o -> gate,up -> down). For
   each group: accumulate H = 2/N sum x x^T over all calibration tokens from ``LinearMX.prepare_input(x)`` (what the
   matmul really sees: rotated, quantized input), stopping the forward right after the group; run
   ``ptq.gptq.gptq_quantize`` on ``weight_to_quantize()``; ``set_quantized_weight``. Later groups therefore see the
   quantized earlier ones. Then run the finished layer to produce the next layer's inputs, save the checkpoint and
   move the layer back.

Which linears: ``LinearMX`` modules whose config has ``gptq = true`` and a weight spec. Linears in one group with
the same Hessian and spec are quantized in one call (rows are independent given H); nvfp4 weights are not merged
because their global scale is per tensor.

Clip search: ``[gptq].clip_search_y`` -> objective "output" (least output error, using H); else
``quantile_search`` -> "weight"; with both, "output" wins: it is the error GPTQ itself minimises.

Test hook: ``PTQ_TEST_KILL_AT=mid_layer:<k>`` SIGKILLs the process after the first group of layer k is quantized
(crash-safety tests only; see ``ptq.passes.checkpoint._test_hook``).
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from ptq.errors import CheckpointError, ModelError, PtqError
from ptq.gptq import HessianError, gptq_quantize
from ptq.passes.base import PassContext, register_pass
from ptq.passes.checkpoint import CheckpointStore, _test_hook

if TYPE_CHECKING:  # pragma: no cover
    from ptq.recipe import Recipe


class _Stop(Exception):
    """Raised from a hook to end a forward early (the rest of the model is not needed)."""


@dataclass
class LayerInputs:
    """Inputs of the current decoder layer for every calibration batch, and the layer's keyword arguments."""

    hidden: list[torch.Tensor]  # one tensor per batch, on the work device
    kwargs: dict[int, dict]  # batch size -> keyword arguments captured for that batch size
    kwarg_device: dict[int, dict] = field(default_factory=dict)

    def batches(self, device: torch.device):
        for h in self.hidden:
            b = h.shape[0]
            if b not in self.kwarg_device:
                self.kwarg_device[b] = _to_device(self.kwargs[b], device)
            yield h, self.kwarg_device[b]


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of decoder layers (``model.model.layers`` for the Llama family)."""
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "layers"):
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return path, obj
    raise ModelError(
        f"GPTQ cannot find the decoder layers of {type(model).__name__} (looked for model.layers, "
        f"model.decoder.layers, transformer.h, layers); supported: Hugging Face Llama-family causal LMs")


def _is_target(m: nn.Module) -> bool:
    from ptq.modules.linear import LinearMX

    return isinstance(m, LinearMX) and m.cfg.gptq and m.cfg.weight is not None


def targeted_linears(layer: nn.Module) -> list[tuple[str, nn.Module]]:
    """The linears of ``layer`` that GPTQ quantizes: LinearMX with ``gptq = true`` and a weight spec."""
    return [(n, m) for n, m in layer.named_modules() if _is_target(m)]


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
    if ctx.device is not None:
        return torch.device(ctx.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
        self._times: dict[str, float] = defaultdict(float)
        layers_path, layers = find_decoder_layers(model)
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
        with self._timed("calibration_data"):
            tokens, data_fp = self._calibration(model, cfg, ctx)
        store = None
        if cfg.checkpoint_dir:
            with self._timed("fingerprint"):
                fingerprint = {
                    "model": self._model_fingerprint(model),
                    "recipe": self._recipe_fingerprint(model, cfg),
                    "data": data_fp,
                    "version": _ptq_version(),
                }
                store = CheckpointStore.open(cfg.checkpoint_dir, fingerprint, len(layers), resume=ctx.resume)
        start = store.finished if store is not None else 0
        info: dict[str, Any] = {"layers": len(layers), "modules": n_targets, "loaded": [], "computed": [],
                                "checkpoint_dir": cfg.checkpoint_dir, "resumed_at": start,
                                "clip_search": clip_objective(cfg), "proxy_loss": {}}
        from tqdm.auto import tqdm

        for i in range(start):
            saved = store.load_layer(i)
            for name, m in targets[i]:
                key = f"{layers_path}.{i}.{name}"
                if key not in saved:
                    raise CheckpointError(
                        f"checkpoint layer {i} in {cfg.checkpoint_dir} has no weights for {key}: it does not "
                        f"match this model. Delete {cfg.checkpoint_dir} or set [gptq].checkpoint_dir to a new "
                        "directory to start over")
                m.set_quantized_weight(saved[key])
            info["loaded"].append(i)
        if start == len(layers):
            info["gptq_seconds"] = time.perf_counter() - t_start
            return info
        with self._timed("capture"):
            inputs = self._capture(model, layers, tokens, cfg.cali_batch_size, device)
        # replay: regenerate the first unfinished layer's inputs from the stored weights, never from stored activations
        if start:
            for i in tqdm(range(start), desc=f"GPTQ: replaying {start} checkpointed layers", unit="layer",
                          disable=not ctx.progress):
                with self._timed("replay"):
                    inputs = self._run_layer(layers[i], inputs, device)
        bar = tqdm(total=len(layers), initial=start, disable=not ctx.progress, unit="layer",
                   desc="GPTQ" + (f" (resumed at layer {start})" if start else ""))
        for i in range(start, len(layers)):
            layer = layers[i]
            old = _module_devices(layer)
            layer.to(device)
            try:
                results = self._quantize_layer(i, layer, targets[i], inputs, cfg, device)
                if i + 1 < len(layers):
                    with self._timed("layer_outputs"):
                        inputs = self._run_layer(layer, inputs, device)
            finally:
                if old is not None:
                    layer.to(old)
            for name, (m, loss) in results.items():
                info["proxy_loss"][f"{layers_path}.{i}.{name}"] = loss
            if store is not None:
                with self._timed("checkpoint"):
                    store.save_layer(i, {f"{layers_path}.{i}.{n}": m.effective_weight()
                                         for n, (m, _) in results.items()})
            info["computed"].append(i)
            bar.update(1)
        bar.close()
        info["gptq_seconds"] = time.perf_counter() - t_start
        info["time_breakdown"] = {k: round(v, 3) for k, v in self._times.items()}
        if device.type == "cuda":
            info["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated(device)
        return info

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
        """Inputs and keyword arguments of decoder layer 0 for every calibration batch."""
        hidden: list[torch.Tensor] = []
        kwargs: dict[int, dict] = {}

        def grab(module, args, kw):
            h = args[0] if args else kw["hidden_states"]
            hidden.append(h.detach())
            rest = {k: v for k, v in kw.items() if k != "hidden_states"}
            kwargs.setdefault(h.shape[0], rest)
            raise _Stop

        moved = _move_outside_layers(model, layers, device)
        first = layers[0]
        old = _module_devices(first)
        first.to(device)
        handle = first.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            for b in range(0, tokens.shape[0], batch_size):
                try:
                    model(input_ids=tokens[b : b + batch_size].to(device), use_cache=False)
                except _Stop:
                    pass
        finally:
            handle.remove()
            if old is not None:
                first.to(old)
            for m, dev in moved:
                m.to(dev)
        if len(hidden) != -(-tokens.shape[0] // batch_size):
            raise ModelError(f"{type(model).__name__}'s forward did not reach decoder layer 0 for every batch")
        return LayerInputs(hidden, kwargs)

    def _run_layer(self, layer, inputs: LayerInputs, device) -> LayerInputs:
        old = _module_devices(layer)
        layer.to(device)
        try:
            outs = [_layer_output(layer(h, **kw)).detach() for h, kw in inputs.batches(device)]
        finally:
            if old is not None:
                layer.to(old)
        return LayerInputs(outs, inputs.kwargs, inputs.kwarg_device)

    def _groups(self, layer, targets, inputs: LayerInputs, device) -> list[list[tuple[str, nn.Module]]]:
        """Targeted linears grouped by shared input, in execution order (probe forward on one batch)."""
        calls: list[tuple[str, nn.Module, torch.Tensor]] = []
        seen: set[int] = set()

        def hook_for(name):
            def hook(module, args):
                if id(module) not in seen:
                    seen.add(id(module))
                    calls.append((name, module, args[0]))  # holding the tensor keeps `is` comparisons valid
            return hook

        handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in targets]
        try:
            h, kw = next(iter(inputs.batches(device)))
            layer(h, **kw)
        finally:
            for hd in handles:
                hd.remove()
        missing = [n for n, m in targets if id(m) not in seen]
        if missing:
            raise ModelError(f"GPTQ: linears {missing} were not called by their decoder layer's forward, so they "
                             f"have no calibration inputs; set gptq = false for them")
        groups: list[list[tuple[str, nn.Module]]] = []
        prev = None
        for name, m, x in calls:
            if prev is not None and x is prev:
                groups[-1].append((name, m))
            else:
                groups.append([(name, m)])
            prev = x
        return groups

    def _hessians(self, layer, group, inputs: LayerInputs, device) -> dict[tuple, torch.Tensor]:
        """H = 2/N sum x x^T of each distinct prepared input of the group, over every calibration token."""
        sums: dict[tuple, torch.Tensor] = {}
        counts: dict[tuple, int] = {}
        keys = {id(m): self._input_key(m) for _, m in group}
        last = group[-1][1]
        state: dict[str, set] = {"done": set()}

        def hook(module, args):
            k = keys[id(module)]
            if k not in state["done"]:  # q, k, v usually share one prepared input: use it once per batch
                state["done"].add(k)
                x = module.prepare_input(args[0]).reshape(-1, args[0].shape[-1]).float()
                if k not in sums:
                    sums[k] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
                    counts[k] = 0
                sums[k].addmm_(x.T, x)
                counts[k] += x.shape[0]
            if module is last:
                raise _Stop

        handles = [m.register_forward_pre_hook(hook) for _, m in group]
        try:
            for h, kw in inputs.batches(device):
                state["done"] = set()
                try:
                    layer(h, **kw)
                except _Stop:
                    pass
        finally:
            for hd in handles:
                hd.remove()
        return {k: s * (2.0 / counts[k]) for k, s in sums.items()}

    @staticmethod
    def _input_key(m) -> tuple:
        """Linears with equal keys see the same prepared input (same data_in spec and rotation)."""
        return (m.cfg.data_in, id(getattr(m, "rotation", None)), getattr(m, "rotation_mode", None))

    def _quantize_layer(self, index, layer, targets, inputs, cfg, device) -> dict[str, tuple[nn.Module, float]]:
        results: dict[str, tuple[nn.Module, float]] = {}
        if not targets:
            return results
        with self._timed("hessians"):
            groups = self._groups(layer, targets, inputs, device)
        clip = clip_objective(cfg)
        for gi, group in enumerate(groups):
            with self._timed("hessians"):
                hs = self._hessians(layer, group, inputs, device)
            # merge linears sharing H and spec into one GPTQ call (rows are independent given H)
            batches: dict[tuple, list[tuple[str, nn.Module]]] = {}
            for name, m in group:
                spec = m.cfg.weight
                merge = spec.family != "nvfp4"
                key = (self._input_key(m), spec, name if not merge else None)
                batches.setdefault(key, []).append((name, m))
            for key, mods in batches.items():
                ws = [m.weight_to_quantize().to(device) for _, m in mods]
                try:
                    with self._timed("solve"):
                        res = gptq_quantize(torch.cat(ws, 0), hs[key[0]], key[1], percdamp=cfg.percdamp,
                                            act_order=cfg.act_order, clip=clip)
                except HessianError as err:
                    names = ", ".join(f"layer {index} {n}" for n, _ in mods)
                    raise HessianError(f"{names}: {err}") from None
                q = res.weight.split([w.shape[0] for w in ws], 0)
                for (name, m), qi, wi in zip(mods, q, ws):
                    m.set_quantized_weight(qi)
                    d = (wi - qi)
                    results[name] = (m, float(torch.einsum("ri,ij,rj->", d, hs[key[0]], d)))
            if gi == 0:
                _test_hook("mid_layer", index)
        return results
