"""Export a quantized model as packed weights, and load it back.

``export_quantized(model, out_dir, format=...)``: ``"compressed-tensors"`` (the default) is written by
`ptq.export_ct`; ``"ptq"``, ptq's own format that expresses every ptq quantizer, writes a directory:

- ``model.safetensors``: every `LinearMX` with a packable weight spec (mxint, mxfp up to 8 bits, nvfp4) as a
  `PackedLinear` (``<name>.qweight`` codes, ``<name>.scales`` (uint8 E8M0, or float8_e4m3fn for NVFP4),
  ``<name>.global_scale`` (fp32, NVFP4), ``<name>.bias``), everything else (embeddings, norms, unpacked layers) as is.
  Tensors that share storage (tied embeddings) are written once; the config records which key to copy where.
- ``config.json``: the Hugging Face model config (minus a loader's ``quantization_config``, e.g. GGUF's).
- ``ptq_quant_config.json``: ``format_version``, the per-module quantization (packed linears, LinearMX layers that
  stay fake-quantized, AttentionMX configs, ExpertsMX configs), rotations, tied keys, the dtype.

Fused MoE experts (`ExpertsMX`) are not packed: they stay fake-quantized under their own state-dict keys. A
projection with GPTQ weights (``"gptq_weights"`` in its entry) is written as its effective weights (every expert on
the grid, in the stored layout), which the loader installs as the experts' GPTQ weights, so they are used as is;
other projections keep their float weights and are re-quantized by RTN on load (deterministic, same bits).
- the tokenizer's files when a tokenizer is given.

The directory is written to a temporary sibling and renamed into place, so a crash never leaves half an export.

``load_quantized(dir, device=None, dtype=None)`` builds the model from ``config.json`` with its parameters on the
meta device (buffers such as RoPE's ``inv_freq`` are computed as usual), swaps in `PackedLinear` / `LinearMX` /
`AttentionMX` from the quantization config (via ``ptq.passes.swap.swap_modules`` for the latter two), and assigns the
stored tensors. ``dtype`` changes the compute dtype only: packed codes and scales are never converted.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ptq.errors import ModelError, PtqError
from ptq.io import TMP_PREFIX, atomic_save_safetensors, atomic_write_json, atomic_write_text
from ptq.modules.packed import (PackedLinear, check_packable, rotation_from_dict, rotation_to_dict, spec_from_dict,
                                spec_to_dict)

FORMAT_VERSION = 1
QUANT_CONFIG = "ptq_quant_config.json"
WEIGHTS = "model.safetensors"


# ---- configs <-> JSON ------------------------------------------------------------------------------------------------
def _linear_cfg_to_dict(cfg) -> dict:
    return {"weight": spec_to_dict(cfg.weight), "data_in": spec_to_dict(cfg.data_in), "bias": spec_to_dict(cfg.bias),
            "gptq": bool(cfg.gptq)}


def _linear_cfg_from_dict(d: dict):
    from ptq.config import LinearQuantConfig

    return LinearQuantConfig(weight=spec_from_dict(d.get("weight")), data_in=spec_from_dict(d.get("data_in")),
                             bias=spec_from_dict(d.get("bias")), gptq=bool(d.get("gptq", False)))


_ATTN_FIELDS = ("kv_cache", "qk_matmul", "av_matmul", "softmax", "rope")


def _attn_cfg_to_dict(cfg) -> dict:
    return {f: spec_to_dict(getattr(cfg, f)) for f in _ATTN_FIELDS}


def _attn_cfg_from_dict(d: dict):
    from ptq.config import AttentionQuantConfig

    return AttentionQuantConfig(**{f: spec_from_dict(d.get(f)) for f in _ATTN_FIELDS})


def _is_packable(spec) -> bool:
    try:
        check_packable(spec)
    except ModelError:
        return False
    return True


# ---- export ---------------------------------------------------------------------------------------------------------
def packed_modules(model: nn.Module, *, progress: bool = False) -> dict[str, PackedLinear]:
    """A `PackedLinear` for every `LinearMX` of ``model`` whose weight spec can be packed (the model is unchanged)."""
    from tqdm.auto import tqdm

    from ptq.modules.linear import LinearMX

    todo = [(n, m) for n, m in model.named_modules() if isinstance(m, LinearMX) and _is_packable(m.cfg.weight)]
    out = {}
    for name, m in tqdm(todo, desc="packing", disable=not progress, leave=False):
        try:
            out[name] = PackedLinear.from_linear_mx(m)
        except PtqError as exc:
            raise type(exc)(f"{name}: {exc}") from None
    return out


def _quant_config(model: nn.Module, packed: dict[str, PackedLinear]) -> dict[str, Any]:
    from ptq.modules.attention import AttentionMX
    from ptq.modules.experts import PROJECTIONS, ExpertsMX
    from ptq.modules.linear import LinearMX

    modules: dict[str, dict] = {}
    for name, m in model.named_modules():
        if name in packed:
            modules[name] = packed[name].config()
        elif isinstance(m, ExpertsMX):
            modules[name] = {"type": "ExpertsMX", "config": _linear_cfg_to_dict(m.cfg),
                             "gptq_weights": [p for p in PROJECTIONS if m.gptq_experts(p)]}
        elif isinstance(m, LinearMX):
            if m.has_gptq_weight:
                raise ModelError(
                    f"{name}: its GPTQ weight uses {m.cfg.weight}, which cannot be packed, and a fake-quant GPTQ "
                    f"weight is not part of the state dict; export supports mxint / mxfp (<= 8 bits) / nvfp4 weights")
            modules[name] = {"type": "LinearMX", "config": _linear_cfg_to_dict(m.cfg),
                             "rotation": rotation_to_dict(m.rotation), "rotation_mode": m.rotation_mode}
        elif isinstance(m, AttentionMX):
            modules[name] = {"type": "AttentionMX", "config": _attn_cfg_to_dict(m.cfg),
                             "qk_rotation": rotation_to_dict(m.qk_rotation),
                             "v_rotation": rotation_to_dict(m.v_rotation)}
    return modules


def _export_state_dict(model: nn.Module, packed: dict[str, PackedLinear]) -> tuple[dict, dict]:
    """The tensors to write and the tied keys ({dropped key: kept key}) of tensors that share storage."""
    from ptq.modules.experts import PROJECTIONS, ExpertsMX

    tensors: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        owner = name.rpartition(".")[0]
        if any(owner == p or owner.startswith(p + ".") for p in packed):
            continue  # replaced by the packed module's own entries
        tensors[name] = t.detach()
    for name, m in model.named_modules():
        if isinstance(m, ExpertsMX):  # GPTQ experts: their effective weights, installed as GPTQ weights on load
            for p in PROJECTIONS:
                if m.gptq_experts(p):
                    tensors[f"{name}.{m.param_name(p)}"] = m.effective_weight(p).detach()
    for pname, pm in packed.items():
        for k, t in pm.state_dict().items():
            tensors[f"{pname}.{k}"] = t.detach()
    seen: dict[tuple, str] = {}
    tied: dict[str, str] = {}
    for name in list(tensors):
        t = tensors[name]
        if t.numel() == 0:
            continue
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in seen:
            tied[name] = seen[key]
            del tensors[name]
        else:
            seen[key] = name
    return tensors, tied


def _model_dtype(model: nn.Module) -> str:
    for p in model.parameters():
        if p.is_floating_point():
            return str(p.dtype).replace("torch.", "")
    return "float32"


FORMATS = ("compressed-tensors", "ptq")


def export_quantized(model: nn.Module, out_dir: str | os.PathLike, *, tokenizer: Any = None, overwrite: bool = False,
                     progress: bool = True, format: str = "compressed-tensors", strict: bool = False,
                     calibration: Any = None, max_shard_bytes: int | None = None) -> dict:
    """Write ``model`` (after the ptq passes) to ``out_dir``.

    ``format="compressed-tensors"`` (default): a Hugging Face directory that transformers / vLLM load with
    compressed-tensors installed (see `ptq.export_ct`; ``strict``, ``calibration`` and ``max_shard_bytes`` are its
    options).
    ``format="ptq"``: ptq's own packed format (see the module docstring), which expresses every ptq quantizer.

    Returns a summary: ``packed`` (names), ``kept`` (layers not packed), ``experts`` (ExpertsMX modules, ptq format:
    fake-quantized), ``bytes`` (weight file size),
    ``packed_weight_bytes`` / ``packed_weights`` (codes + scales bytes and weight count of the packed layers) and
    ``bits_per_weight`` (their ratio x 8).
    """
    if format not in FORMATS:
        raise PtqError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if format == "compressed-tensors":
        from ptq.export_ct import DEFAULT_MAX_SHARD_BYTES, export_compressed_tensors

        return export_compressed_tensors(model, out_dir, tokenizer=tokenizer, overwrite=overwrite, strict=strict,
                                         calibration=calibration, progress=progress,
                                         max_shard_bytes=max_shard_bytes or DEFAULT_MAX_SHARD_BYTES)
    if strict or calibration is not None or max_shard_bytes is not None:
        raise PtqError("strict=, calibration= and max_shard_bytes= apply to format='compressed-tensors' only (the ptq format "
                       "expresses every quantizer exactly)")
    return _export_ptq(model, out_dir, tokenizer=tokenizer, overwrite=overwrite, progress=progress)


def check_export_target(model: nn.Module, out_dir: str | os.PathLike, overwrite: bool) -> tuple[Path, Any]:
    """The output path and the model's HF config, refusing an existing directory (unless ``overwrite``) and a model
    without a config before any work."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise PtqError(f"{out} already exists; choose another --out directory or pass overwrite=True (--overwrite)")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ModelError(f"export needs a Hugging Face model with a .config, got {type(model).__name__}")
    return out, config


def _export_ptq(model: nn.Module, out_dir: str | os.PathLike, *, tokenizer: Any, overwrite: bool,
                progress: bool) -> dict:
    from ptq import __version__

    out, config = check_export_target(model, out_dir, overwrite)
    with torch.no_grad():
        packed = packed_modules(model, progress=progress)
        modules = _quant_config(model, packed)
        tensors, tied = _export_state_dict(model, packed)
    n_weights = sum(p.in_features * p.out_features for p in packed.values())
    n_bytes = sum(p.packed_nbytes for p in packed.values())
    qcfg = {
        "format_version": FORMAT_VERSION,
        "ptq_version": __version__,
        "model_class": type(model).__name__,
        "dtype": _model_dtype(model),
        "modules": modules,
        "tied": tied,
    }
    cfg_dict = config.to_dict()
    cfg_dict.pop("quantization_config", None)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=out.parent))
    try:
        atomic_save_safetensors(tensors, tmp / WEIGHTS, metadata={"format": "pt", "ptq_format": str(FORMAT_VERSION)})
        atomic_write_text(tmp / "config.json", json.dumps(cfg_dict, indent=2, sort_keys=True, default=str) + "\n")
        atomic_write_json(tmp / QUANT_CONFIG, qcfg)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "out_dir": str(out),
        "format": "ptq",
        "packed": sorted(packed),
        "kept": sorted(n for n, c in modules.items() if c["type"] == "LinearMX"),
        "experts": sorted(n for n, c in modules.items() if c["type"] == "ExpertsMX"),
        "bytes": (out / WEIGHTS).stat().st_size,
        "packed_weights": n_weights,
        "packed_weight_bytes": n_bytes,
        "bits_per_weight": 8.0 * n_bytes / n_weights if n_weights else None,
    }


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the finished directory ``src`` to ``dst``, replacing an existing ``dst`` only after ``src`` is complete."""
    old = None
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + "old-", dir=dst.parent))
        os.replace(dst, old / "d")
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---- load -----------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _parameters_on_meta():
    """Parameters created inside are put on the meta device (no memory, no init); buffers stay real, so values
    computed at construction (RoPE's inv_freq) are correct."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def read_quant_config(path: str | os.PathLike) -> dict:
    """The parsed ``ptq_quant_config.json`` of an exported directory (format version checked)."""
    p = Path(path) / QUANT_CONFIG
    if not p.is_file():
        raise PtqError(f"{path}: no {QUANT_CONFIG}, so this is not a directory written by ptq export")
    try:
        qcfg = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise PtqError(f"{p}: not valid JSON ({exc}); re-export the model") from None
    version = qcfg.get("format_version")
    if version != FORMAT_VERSION:
        raise PtqError(f"{p}: format_version {version!r} is not supported by this ptq (reads {FORMAT_VERSION}); "
                       f"re-export the model with this version")
    return qcfg


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def _install_expert_gptq_weights(m: nn.Module, projections: list[str]) -> None:
    """The stored values of these projections are GPTQ's effective weights: use them as is (no RTN on top)."""
    for p in projections:
        w = getattr(m, m.param_name(p)).detach()
        for e in range(m.num_experts):
            m.set_quantized_weight(p, e, w[e].t() if m.is_transposed else w[e])


def load_quantized(path: str | os.PathLike, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None, backend: str | None = None) -> nn.Module:
    """Rebuild a model written by `export_quantized` (eval mode). ``device``: where to put it (default CPU);
    ``dtype``: compute dtype of the floating parameters (default: the exported one); ``backend``: the packed
    layers' forward backend (default: automatic, see `ptq.modules.packed`)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from ptq.passes.swap import swap_modules

    path = Path(path)
    qcfg = read_quant_config(path)
    if not (path / WEIGHTS).is_file():
        raise PtqError(f"{path}: {WEIGHTS} is missing; the export is incomplete, export again")
    config = AutoConfig.from_pretrained(path)
    stored_dtype = getattr(torch, qcfg.get("dtype", "float32"))
    with _parameters_on_meta(), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=stored_dtype)

    modules = qcfg["modules"]
    mapping = {}
    for name, entry in modules.items():
        if entry["type"] == "AttentionMX":
            mapping[name] = _attn_cfg_from_dict(entry["config"])
        elif entry["type"] in ("LinearMX", "ExpertsMX"):
            mapping[name] = _linear_cfg_from_dict(entry["config"])
    if mapping:
        swap_modules(model, mapping)
    for name, entry in modules.items():
        kind = entry["type"]
        if kind == "PackedLinear":
            _set_module(model, name, PackedLinear.from_config(entry, device="meta", dtype=stored_dtype,
                                                              backend=backend))
        elif kind == "LinearMX":
            rot = rotation_from_dict(entry.get("rotation"))
            if rot is not None:
                model.get_submodule(name).set_rotation(rot, entry.get("rotation_mode", "matched"))
        elif kind == "AttentionMX":
            qk, v = rotation_from_dict(entry.get("qk_rotation")), rotation_from_dict(entry.get("v_rotation"))
            if qk is not None or v is not None:
                model.get_submodule(name).set_rotations(qk=qk, v=v)
        elif kind == "ExpertsMX":
            pass  # its GPTQ weights are installed once the tensors are loaded (below)
        else:
            raise PtqError(f"{path / QUANT_CONFIG}: module {name!r} has unknown type {kind!r}")

    tensors = load_file(str(path / WEIGHTS), device="cpu")
    for dropped, kept in qcfg.get("tied", {}).items():
        if kept not in tensors:
            raise PtqError(f"{path / WEIGHTS}: tied key {dropped!r} refers to {kept!r}, which the file lacks")
        tensors[dropped] = tensors[kept]
    result = model.load_state_dict(tensors, strict=False, assign=True)
    missing = [k for k in result.missing_keys]
    if missing or result.unexpected_keys:
        raise PtqError(f"{path / WEIGHTS} does not match the model built from config.json: missing "
                       f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected "
                       f"{result.unexpected_keys[:5]}; the export is corrupt or from another model")
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:
        raise PtqError(f"{path}: parameters without stored values: {still_meta[:5]}")
    for name, entry in modules.items():
        if entry["type"] == "ExpertsMX":
            _install_expert_gptq_weights(model.get_submodule(name), entry.get("gptq_weights", []))
    if hasattr(model, "tie_weights"):
        with contextlib.suppress(Exception):
            model.tie_weights()
    return placed(model, dtype, device)


def placed(model: nn.Module, dtype, device) -> nn.Module:
    """A loaded model cast to ``dtype`` and moved to ``device`` (None: as stored), in eval mode."""
    if dtype is not None:
        model.to(dtype)
    if device is not None:
        model.to(device)
    return model.eval()
