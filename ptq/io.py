"""Atomic file writes and content digests.

Every file ptq writes goes through here: write a temporary file in the target directory, fsync it, then
``os.replace`` it over the target, so a crash leaves either the old file or the new one, never half of one.
Digests are sha256 hex strings over canonical bytes, used to fingerprint models, recipes and data.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch

TMP_PREFIX = ".ptq-tmp-"  # readers ignore files with this prefix: they are unfinished writes


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    from safetensors.torch import save

    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(path, save(clean, metadata=metadata))


def digest_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def digest_json(obj: Any) -> str:
    return digest_bytes(canonical_json(obj).encode("utf-8"))


def digest_tensors(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over (name, dtype, shape, raw bytes) of each tensor, in the order given."""
    h = hashlib.sha256()
    for name, t in named_tensors:
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            # Raw bytes via a uint8 view: works for every dtype (bf16, fp8) without a lossy conversion.
            h.update(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy())  # no bytes copy
    return h.hexdigest()


def model_fingerprint(model: torch.nn.Module, resolve=None) -> dict[str, str]:
    """Digests of the model's config and of its parameters and buffers (names, dtypes, shapes, bytes).

    Tied weights are hashed once (``state_dict`` keeps duplicates; ``named_parameters`` does not). ``resolve(name,
    tensor)``, when given, supplies each tensor's contents (a skeleton's meta tensors read from its checkpoint, one
    at a time)."""
    config = getattr(model, "config", None)
    cfg = config.to_dict() if hasattr(config, "to_dict") else {}
    for volatile in ("_name_or_path", "transformers_version", "_attn_implementation_autoset"):
        cfg.pop(volatile, None)
    named = list(model.named_parameters()) + list(model.named_buffers())
    tensors = named if resolve is None else ((n, resolve(n, t)) for n, t in named)
    return {"config": digest_json(cfg), "weights": digest_tensors(tensors)}


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
