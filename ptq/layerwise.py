"""Models larger than memory: a skeleton on the meta device whose decoder layers are read from the safetensors
shards only while a pass works on them.

``load_skeleton(path)`` builds the model with every parameter on the meta device (no memory), then loads what lives
outside the decoder layers (embeddings, final norm, head) and recomputes the non-persistent buffers (RoPE tables).
``ShardedWeights.load_into(layer, prefix, device)`` reads one layer's tensors straight onto the work device;
``release(layer)`` puts its parameters back on meta. The GPTQ pass does both around each layer
(``PassContext(weights=...)``) and keeps finished layers only in its checkpoint store, so peak CPU memory is about
the embeddings and head plus the layer in flight (and the one whose file is being read).

Limits: checkpoint keys must equal the model's parameter names (checkpoints that transformers converts while loading,
e.g. per-expert MoE tensors for fused expert parameters, are refused with a clear error); only swap + GPTQ run on a
skeleton (the rotation search, RTN evaluation and export need the whole model).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ptq.errors import ModelError, PtqError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class ShardedWeights:
    """The tensors of a Hugging Face safetensors checkpoint (one file or shards + index), read on demand."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX
        if index.is_file():
            self.files = {k: self.directory / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        elif (self.directory / SINGLE).is_file():
            from safetensors import safe_open

            with safe_open(str(self.directory / SINGLE), framework="pt") as f:
                self.files = {k: self.directory / SINGLE for k in f.keys()}
        else:
            raise ModelError(f"{self.directory}: no {INDEX} or {SINGLE}; layer-by-layer loading reads safetensors "
                             "checkpoints only")

    def nbytes(self) -> int:
        """Bytes of the shard files (about the model's size in its stored dtype)."""
        return sum(f.stat().st_size for f in set(self.files.values()))

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, on the CPU; each shard file is opened once and closed again (its pages unmapped)."""
        from safetensors import safe_open

        missing = [n for n in names if n not in self.files]
        if missing:
            raise ModelError(
                f"{self.directory}: the checkpoint has no tensor {missing[0]!r}"
                f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}. Layer-by-layer loading needs the "
                "checkpoint keys to equal the model's parameter names; checkpoints that transformers converts while "
                "loading (e.g. per-expert MoE weights) need the whole-model mode (--layer-by-layer off)")
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n], []).append(n)
        out = {}
        for file, ns in by_file.items():
            with safe_open(str(file), framework="pt") as f:
                for n in ns:
                    out[n] = f.get_tensor(n)
        return out

    def load_into(self, module: nn.Module, prefix: str, device: torch.device | str, exclude: str | None = None
                  ) -> None:
        """Give every meta parameter / persistent buffer of ``module`` its stored value (checkpoint key ``prefix +
        name``), on ``device``, in the dtype the skeleton declares; names starting with ``exclude`` are left alone.
        Parameters shared by several modules (tied weights) get one tensor."""
        slots = {k: v for k, v in _meta_slots(module).items()
                 if exclude is None or not all(n.startswith(exclude) for n in v[0])}
        if not slots:
            return
        wanted = {names[0]: names for names, _ in slots.values()}
        # a tied tensor may be stored under any of its names
        pick = {first: next((prefix + n for n in names if prefix + n in self.files), prefix + first)
                for first, names in wanted.items()}
        data = self.read(sorted(set(pick.values())))
        for (names, old) in slots.values():
            t = data[pick[names[0]]]
            if tuple(t.shape) != tuple(old.shape):
                raise ModelError(f"{pick[names[0]]}: checkpoint shape {tuple(t.shape)}, model expects "
                                 f"{tuple(old.shape)}")
            t = t.to(device=device, dtype=old.dtype)
            if isinstance(old, nn.Parameter):
                t = nn.Parameter(t, requires_grad=False)  # one object for every name: ties stay tied
            for name in names:
                _set_tensor(module, name, t)

    def digest_like(self, model: nn.Module) -> dict[str, str]:
        """``ptq.io.model_fingerprint(model)`` as if the skeleton's meta tensors were loaded: each one is read from
        the checkpoint alone (one tensor in memory at a time), so a checkpoint store written in whole-model mode is
        resumed in layer-by-layer mode and vice versa."""
        from ptq.io import model_fingerprint

        def real(name: str, t: torch.Tensor) -> torch.Tensor:
            return self.read([name])[name].to(t.dtype) if t.is_meta else t

        return model_fingerprint(model, resolve=real)


def _meta_slots(module: nn.Module) -> dict[int, tuple[list[str], torch.Tensor]]:
    """id(tensor) -> (every name it has under ``module``, the tensor) for meta parameters and persistent buffers."""
    slots: dict[int, tuple[list[str], torch.Tensor]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if p.is_meta:
            slots.setdefault(id(p), ([], p))[0].append(name)
    for mod_name, mod in module.named_modules(remove_duplicate=False):
        for leaf, b in mod._buffers.items():
            if b is not None and b.is_meta and leaf not in mod._non_persistent_buffers_set:
                slots.setdefault(id(b), ([], b))[0].append(f"{mod_name}.{leaf}" if mod_name else leaf)
    return slots


def _set_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = root.get_submodule(owner_name)
    if isinstance(value, nn.Parameter):
        owner._parameters[leaf] = value
    else:
        owner._buffers[leaf] = value


def release(module: nn.Module) -> None:
    """Put ``module``'s parameters back on the meta device (freeing their memory) and drop what LinearMX modules
    derived from them (cached quantized weights, GPTQ weights: by now those are in the checkpoint store)."""
    from ptq.modules.linear import LinearMX

    for m in module.modules():
        if isinstance(m, LinearMX):
            m.clear_quantized_weight()
            if m.input_memo is not None:
                m.input_memo.clear()
    seen: dict[int, torch.Tensor] = {}
    for mod in module.modules():
        for leaf, p in list(mod._parameters.items()):
            if p is None or p.is_meta:
                continue
            if id(p) not in seen:
                seen[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False)
            mod._parameters[leaf] = seen[id(p)]
        for leaf, b in list(mod._buffers.items()):  # persistent buffers came from the checkpoint: drop them too
            if b is not None and not b.is_meta and leaf not in mod._non_persistent_buffers_set:
                mod._buffers[leaf] = seen.setdefault(id(b), torch.empty(b.shape, dtype=b.dtype, device="meta"))


def _outer_parameter_names(model: nn.Module, layers_path: str) -> Iterator[str]:
    for name, _ in model.named_parameters():
        if not name.startswith(layers_path + "."):
            yield name


def load_skeleton(path: str | os.PathLike, dtype: Any = "auto") -> tuple[nn.Module, Any, ShardedWeights]:
    """``(model, tokenizer, weights)``: the model at ``path`` with its decoder layers on the meta device and every
    other weight loaded (CPU), plus the shards to read the layers from (``PassContext(weights=...)``)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ptq.models import parse_dtype
    from ptq.passes.gptq import find_decoder_layers

    path = Path(path)
    weights = ShardedWeights(path)
    config = AutoConfig.from_pretrained(path)
    torch_dtype = parse_dtype(dtype)
    if torch_dtype == "auto":
        torch_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        if isinstance(torch_dtype, str):
            torch_dtype = getattr(torch, torch_dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    _rebuild_non_persistent_buffers(model)
    layers_path, _ = find_decoder_layers(model)
    weights.load_into(model, "", "cpu", exclude=layers_path + ".")
    still = [n for n in _outer_parameter_names(model, layers_path) if model.get_parameter(n).is_meta]
    if still:
        raise ModelError(f"{path}: {still} stayed on the meta device after loading the weights outside the decoder "
                         "layers; this model is not supported layer by layer")
    return model.eval(), AutoTokenizer.from_pretrained(path), weights


def _rebuild_non_persistent_buffers(model: nn.Module) -> None:
    """Buffers computed in ``__init__`` (RoPE inverse frequencies ...) are not in the checkpoint; built on meta they
    have no values. Recompute them on the CPU through the model's own weight initialisation."""
    targets = []
    for mod in model.modules():
        names = [n for n in mod._non_persistent_buffers_set if mod._buffers.get(n) is not None
                 and mod._buffers[n].is_meta]
        for n in names:
            b = mod._buffers[n]
            mod._buffers[n] = torch.empty(b.shape, dtype=b.dtype, device="cpu")
        if names:
            targets.append((mod, names))
    init = getattr(model, "_init_weights", None)
    for mod, names in targets:
        if init is None:
            raise ModelError(f"{type(model).__name__} has buffers computed at construction ({names}) and no "
                             "_init_weights to recompute them; it is not supported layer by layer")
        init(mod)
        for n in names:
            if not torch.isfinite(mod._buffers[n].float()).all():
                raise ModelError(f"{type(mod).__name__}.{n} could not be recomputed for the skeleton")


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def needs_layer_by_layer(path: str | os.PathLike, processes: int = 1, headroom: float = 0.8) -> bool:
    """True when ``processes`` copies of the checkpoint at ``path`` would not fit in ``headroom`` of the available
    CPU memory (False when that cannot be told: not a local safetensors checkpoint, or no /proc/meminfo)."""
    try:
        size = ShardedWeights(path).nbytes()
    except (ModelError, PtqError, OSError):
        return False
    free = available_memory_bytes()
    return free is not None and size * processes > headroom * free
