"""Per-layer checkpoints that survive a crash: ``CheckpointStore``.

Layout of a checkpoint directory::

    manifest.json            fingerprint of the run + the finished layers (index, file, sha256)
    layer_000.safetensors    the quantized weights of decoder layer 0
    layer_001.safetensors    ...

Write order for layer i: the layer file is written to a temporary file, fsynced and renamed (``ptq.io``); only then is
the manifest rewritten (same atomic way) to list it with its sha256. A crash at any point therefore leaves either
(a) a temporary file (``.ptq-tmp-*``: never read), (b) a complete layer file the manifest does not list yet (ignored
and overwritten on resume), or (c) a listed layer whose bytes match the digest in the manifest. Anything else
(a listed file missing, truncated or altered; a gap in the listed layers; a manifest that does not parse) is refused
with ``CheckpointError``, never used.

The fingerprint has four parts, compared one by one so a mismatch names what changed: ``model`` (config and weight
digests), ``recipe`` (the GPTQ settings and the weight specs of the targeted modules), ``data`` (the calibration
request and a digest of its tokens) and ``version`` (of ptq).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ptq.errors import CheckpointError
from ptq.io import TMP_PREFIX, atomic_write_bytes, atomic_write_json, digest_bytes

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
FINGERPRINT_PARTS = ("model", "recipe", "data", "version")


def layer_file(index: int) -> str:
    return f"layer_{index:03d}.safetensors"


def _start_over(directory: Path) -> str:
    return (f"To start over, delete {directory} or set [gptq].checkpoint_dir to a new directory "
            f"(the CLI's --no-resume refuses to touch an existing one)")


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Human-readable leaf differences between two JSON-like values (at most a few)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            p = f"{prefix}.{k}" if prefix else str(k)
            if k not in old:
                out.append(f"{p} is new ({new[k]!r})")
            elif k not in new:
                out.append(f"{p} was {old[k]!r}, now absent")
            else:
                out.extend(_differences(old[k], new[k], p))
        return out
    if old != new:
        return [f"{prefix or 'value'}: checkpoint has {old!r}, this run has {new!r}"]
    return []


class CheckpointStore:
    """The checkpoint directory of one GPTQ run. Open it with :meth:`open`."""

    def __init__(self, directory: Path, fingerprint: dict, n_layers: int, layers: list[dict]):
        self.directory = directory
        self.fingerprint = fingerprint
        self.n_layers = n_layers
        self._layers = layers  # manifest entries of finished layers, in order 0..k-1

    # ---- opening ----------------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, directory: str | os.PathLike, fingerprint: dict, n_layers: int, resume: bool = True
             ) -> "CheckpointStore":
        """Create ``directory`` for a new run, or verify the one there and resume from it.

        ``fingerprint`` maps each of ``FINGERPRINT_PARTS`` to JSON-able data. Raises ``CheckpointError`` when the
        directory holds a checkpoint of another run (naming the parts that differ), a gap or a corrupt layer file,
        or anything when ``resume`` is False."""
        missing = [p for p in FINGERPRINT_PARTS if p not in fingerprint]
        if missing:
            raise ValueError(f"fingerprint lacks parts {missing}")
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise CheckpointError(f"checkpoint_dir {directory} exists and is not a directory. {_start_over(directory)}")
        entries = [p for p in directory.iterdir() if not p.name.startswith(TMP_PREFIX)] if directory.exists() else []
        if not entries:
            store = cls(directory, fingerprint, n_layers, [])
            store._write_manifest()
            return store
        if not resume:
            raise CheckpointError(
                f"checkpoint_dir {directory} is not empty and resuming is off. {_start_over(directory)}, "
                "or allow resuming (drop --no-resume / pass resume=True)")
        manifest_path = directory / MANIFEST
        if not manifest_path.is_file():
            raise CheckpointError(
                f"checkpoint_dir {directory} holds files but no {MANIFEST}: it is not a ptq GPTQ checkpoint "
                f"(or its first write was interrupted). {_start_over(directory)}")
        try:
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"manifest format {manifest.get('format')!r}, expected {MANIFEST_FORMAT}")
            old_fp, layers, old_n = manifest["fingerprint"], list(manifest["layers"]), int(manifest["n_layers"])
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{manifest_path} cannot be read ({err}). {_start_over(directory)}") from None
        cls._verify_fingerprint(directory, old_fp, fingerprint)
        if old_n != n_layers:
            raise CheckpointError(
                f"{manifest_path} was written for {old_n} decoder layers, this model has {n_layers}. "
                f"{_start_over(directory)}")
        cls._verify_layers(directory, layers, n_layers)
        return cls(directory, fingerprint, n_layers, layers)

    @staticmethod
    def _verify_fingerprint(directory: Path, old: dict, new: dict) -> None:
        differing = [p for p in FINGERPRINT_PARTS if old.get(p) != new.get(p)]
        if not differing:
            return
        what = {"model": "a different model (config or weights)", "recipe": "a different GPTQ recipe",
                "data": "different calibration data", "version": "a different ptq version"}
        details = []
        for p in differing:
            diffs = _differences(old.get(p), new.get(p), p)
            details.append(f"{what[p]}: " + "; ".join(diffs[:4]) + (" ..." if len(diffs) > 4 else ""))
        raise CheckpointError(
            f"checkpoint_dir {directory} belongs to another run; it was written for "
            + " and ".join(details) + f". {_start_over(directory)}")

    @staticmethod
    def _verify_layers(directory: Path, layers: list[dict], n_layers: int) -> None:
        for pos, entry in enumerate(layers):
            idx = entry.get("index")
            if idx != pos:
                raise CheckpointError(
                    f"{directory / MANIFEST} lists layers {[e.get('index') for e in layers]}: layer {pos} is missing "
                    f"(a gap). {_start_over(directory)}")
            if idx >= n_layers:
                raise CheckpointError(f"{directory / MANIFEST} lists layer {idx} but the model has {n_layers}. "
                                      f"{_start_over(directory)}")
            path = directory / entry["file"]
            if not path.is_file():
                raise CheckpointError(f"layer {idx}'s file {path} is missing. {_start_over(directory)}")
            if digest_bytes(path.read_bytes()) != entry["sha256"]:
                raise CheckpointError(
                    f"layer {idx}'s file {path} does not match the digest in {MANIFEST} (truncated or altered). "
                    f"{_start_over(directory)}")

    # ---- use --------------------------------------------------------------------------------------------------------
    @property
    def finished(self) -> int:
        """Number of finished layers (they are 0 .. finished-1)."""
        return len(self._layers)

    def load_layer(self, index: int) -> dict[str, torch.Tensor]:
        """The tensors saved for finished layer ``index`` (bytes verified against the manifest digest)."""
        from safetensors.torch import load

        if not 0 <= index < self.finished:
            raise CheckpointError(f"layer {index} is not finished in {self.directory} (finished: {self.finished})")
        entry = self._layers[index]
        data = (self.directory / entry["file"]).read_bytes()
        if digest_bytes(data) != entry["sha256"]:
            raise CheckpointError(f"layer {index}'s file {self.directory / entry['file']} changed since it was "
                                  f"verified. {_start_over(self.directory)}")
        return load(data)

    def save_layer(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        """Record layer ``index`` (the next unfinished one): layer file first, then the manifest."""
        from safetensors.torch import save

        if index != self.finished:
            raise CheckpointError(f"layer {index} saved out of order: {self.finished} layers are finished")
        data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                    metadata={"layer": str(index)})
        name = layer_file(index)
        atomic_write_bytes(self.directory / name, data)
        _test_hook("after_layer_file", index)
        self._layers.append({"index": index, "file": name, "sha256": digest_bytes(data),
                             "tensors": sorted(tensors)})
        self._write_manifest()

    def _write_manifest(self) -> None:
        atomic_write_json(self.directory / MANIFEST, {
            "format": MANIFEST_FORMAT,
            "fingerprint": self.fingerprint,
            "n_layers": self.n_layers,
            "layers": self._layers,
        })


class BackgroundWriter:
    """Saves layers to a `CheckpointStore` on one worker thread, so that serialising, hashing and fsyncing a layer
    (about 1.5 s for a Llama-3-8B layer) overlaps the next layer's GPTQ instead of adding to it.

    At most one layer is in flight: `save_layer` takes a CPU copy of the tensors, waits for the previous write and
    hands this one over; the store's own write order (layer file, then manifest) is unchanged, so a crash loses at
    most the layer being written, which the next run recomputes. Use it as a context manager: leaving the block
    waits for the last write, also when the block raised (what was computed is kept; a write error is then
    reported as a warning so it does not hide the original one)."""

    def __init__(self, store: CheckpointStore):
        from concurrent.futures import ThreadPoolExecutor

        self.store = store
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ptq-checkpoint")
        self._pending = None

    def save_layer(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        cpu = {k: v.detach().cpu() for k, v in tensors.items()}
        self.wait()
        self._pending = self._pool.submit(self.store.save_layer, index, cpu)

    def wait(self) -> None:
        """Block until the layer in flight is written; raise its error, if any."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.wait()
            else:
                try:
                    self.wait()
                except Exception as err:  # the original error is the one to see
                    import warnings

                    warnings.warn(f"writing a checkpoint layer to {self.store.directory} failed too: {err}",
                                  stacklevel=2)
        finally:
            self._pool.shutdown(wait=True)


def _test_hook(point: str, layer: int) -> None:
    """TEST HOOK: ``PTQ_TEST_KILL_AT=<point>:<layer>`` SIGKILLs this process there (crash-safety tests only);
    ``<point>:<layer>@<rank>`` kills only that torchrun rank.

    Points: ``mid_layer`` (ptq.passes.gptq, after the first group of a layer is quantized) and ``after_layer_file``
    (here, between the layer file's rename and the manifest update)."""
    want = os.environ.get("PTQ_TEST_KILL_AT")
    if not want:
        return
    from ptq import distributed

    if want in (f"{point}:{layer}", f"{point}:{layer}@{distributed.rank()}"):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
