"""Calibration and evaluation text: local files, the copies embedded in the package, the hub only when named.

Sources:
- ``"wikitext2"``: WikiText-2; split ``test`` -> ``wikitext-2/wiki.test.raw`` (use for perplexity),
  ``validation`` -> ``wikitext-2/wiki.valid.tokens`` (use for calibration: the train split is not shipped).
- ``"tinystories"``: ``tinystories/validation.txt`` (both splits read the same file).
- ``"hf:NAME"`` / ``"hf:NAME:CONFIG"``: a Hugging Face dataset's ``text`` column (needs ``datasets`` and the network).
- a path to a text file (or a directory of ``*.txt`` files, read in sorted order).
- a list of strings, joined by blank lines.

A named source is read from the first place that has it: ``data_dir`` (else ``$PTQ_DATA_DIR``), then the copy
embedded in the package (``ptq/_data``, xz-compressed, byte-identical to the originals; licences in its README), and
only then the Hugging Face hub. So the defaults never touch the network. The hub is asked only after a quick
reachability probe (a few seconds at most): an unreachable hub is one clear error, never minutes of retries.

Windows: evaluation uses the whole text as one string, tokenized once and cut into non-overlapping windows (the
last partial one dropped); calibration draws ``nsamples`` windows at offsets from a seeded generator, so the same
request gives the same tokens in every run and every pass.
"""

from __future__ import annotations

import lzma
import os
import socket
from pathlib import Path
from typing import Sequence

import torch

from ptq.errors import PtqError
from ptq.io import digest_bytes, digest_json

_LOCAL_FILES = {
    ("wikitext2", "test"): "wikitext-2/wiki.test.raw",
    ("wikitext2", "validation"): "wikitext-2/wiki.valid.tokens",
    ("tinystories", "test"): "tinystories/validation.txt",
    ("tinystories", "validation"): "tinystories/validation.txt",
}
_HUB = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "text", "\n"),
    "tinystories": ("roneneldan/TinyStories", None, "text", "\n\n"),
}
_EMBEDDED = {
    ("wikitext2", "test"): "wiki.test.raw.xz",
    ("wikitext2", "validation"): "wiki.valid.tokens.xz",
    ("tinystories", "test"): "tinystories.validation.txt.xz",
    ("tinystories", "validation"): "tinystories.validation.txt.xz",
}
EMBEDDED_DIR = Path(__file__).resolve().parent / "_data"
HUB_PREFIX = "hf:"
HUB_PROBE_SECONDS = 3.0
NAMED_SOURCES = tuple(sorted(_HUB))
SPLITS = ("test", "validation")


def _resolve_dir(data_dir: str | os.PathLike | None) -> Path | None:
    d = data_dir if data_dir is not None else os.environ.get("PTQ_DATA_DIR")
    return Path(d) if d else None


def local_path(source: str, split: str = "validation", data_dir: str | os.PathLike | None = None) -> Path | None:
    """The local file that holds a named source's split, or None when it is not on disk."""
    if split not in SPLITS:
        raise PtqError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    rel = _LOCAL_FILES.get((source, split))
    root = _resolve_dir(data_dir)
    if rel is None or root is None:
        return None
    p = root / rel
    return p if p.is_file() else None


def embedded_path(source: str, split: str = "validation") -> Path | None:
    """The compressed copy of a named source's split inside the package, or None (not embedded / not installed)."""
    if split not in SPLITS:
        raise PtqError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    name = _EMBEDDED.get((source, split))
    p = EMBEDDED_DIR / name if name else None
    return p if p is not None and p.is_file() else None


def read_embedded(path: Path) -> str:
    """The text of an embedded file, newlines translated as ``Path.read_text`` does for the local files."""
    return lzma.decompress(path.read_bytes()).decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")


def _named_file(source: str, split: str, data_dir) -> tuple[Path, bool] | None:
    """(file, is_embedded) holding a named source's split: data_dir / $PTQ_DATA_DIR first, then the package's copy."""
    p = local_path(source, split, data_dir)
    if p is not None:
        return p, False
    e = embedded_path(source, split)
    return (e, True) if e is not None else None


def text_origin(source: str | Sequence[str], split: str = "validation", data_dir=None) -> str:
    """Where ``load_text`` reads ``source`` from, in words (for reports): a file, the embedded copy or the hub."""
    if not isinstance(source, str):
        return "a list of strings"
    if source in _HUB:
        found = _named_file(source, split, data_dir)
        if found is None:
            return "the Hugging Face hub"
        path, embedded = found
        return f"the copy embedded in ptq ({path.name})" if embedded else str(path)
    return "the Hugging Face hub" if source.startswith(HUB_PREFIX) else source


def load_text(
    source: str | Sequence[str], split: str = "validation", data_dir: str | os.PathLike | None = None
) -> str:
    """The whole text of a source as one string (see the module docstring for what ``source`` may be)."""
    if not isinstance(source, str):
        texts = list(source)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise PtqError("a text source given as a list must be a non-empty list of strings")
        return "\n\n".join(texts)
    if source in _HUB:
        found = _named_file(source, split, data_dir)
        if found is None:
            return _load_from_hub(source, split, data_dir)
        path, embedded = found
        return read_embedded(path) if embedded else path.read_text(encoding="utf-8")
    if source.startswith(HUB_PREFIX):
        return _load_from_hub(source, split, data_dir)
    p = Path(source).expanduser()
    if p.is_file():
        return p.read_text(encoding="utf-8")
    if p.is_dir():
        files = sorted(p.glob("*.txt"))
        if not files:
            raise PtqError(f"text directory {p} holds no *.txt files")
        return "\n\n".join(f.read_text(encoding="utf-8") for f in files)
    raise PtqError(
        f"unknown text source {source!r}: use one of {', '.join(NAMED_SOURCES)}, {HUB_PREFIX}NAME[:CONFIG] for a "
        "Hugging Face dataset, a path to a text file or directory, or a list of strings")


def _hub_switched_off() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def hub_unreachable(timeout: float = HUB_PROBE_SECONDS) -> str | None:
    """Why the Hugging Face hub cannot be used right now (None when a TCP connection to it opens within
    ``timeout`` seconds). One short probe, so an offline machine gets an answer in seconds instead of the minutes
    of retries ``datasets`` spends before giving up."""
    if _hub_switched_off():
        return "the hub is switched off (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE)"
    from urllib.parse import urlsplit

    url = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{host}:{port} is not reachable ({e.__class__.__name__}: {e})"
    return None


def _load_from_hub(source: str, split: str, data_dir) -> str:
    if source.startswith(HUB_PREFIX):
        name, _, config = source[len(HUB_PREFIX):].partition(":")
        if not name:
            raise PtqError(f"text source {source!r} names no dataset: write {HUB_PREFIX}NAME or {HUB_PREFIX}NAME:CONFIG")
        config, field, joiner = config or None, "text", "\n"
        hint = f"text source {source!r} lives on the Hugging Face hub"
        fix = "give a local text file or directory instead (or a named source: " + ", ".join(NAMED_SOURCES) + ")"
    else:
        name, config, field, joiner = _HUB[source]
        where = _resolve_dir(data_dir)
        hint = (f"no local copy of {source!r} ({split}) under {where} and none embedded in ptq" if where else
                f"no local copy of {source!r} ({split}): none embedded in ptq and no data_dir / PTQ_DATA_DIR")
        fix = f"pass --data-dir (or set PTQ_DATA_DIR) to a folder holding {_LOCAL_FILES[(source, split)]}"
    why = hub_unreachable()
    if why is not None:
        raise PtqError(f"{hint}, and {why}; {fix}")
    try:
        import datasets
    except ImportError as e:
        raise PtqError(f"{hint}, and the `datasets` package is not installed (pip install datasets); {fix}") from e
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # network errors come in many types
        raise PtqError(f"{hint}, and loading {name!r} from the hub failed: {e}; {fix}") from e
    if field not in ds.column_names:
        raise PtqError(f"hub dataset {name!r} ({split}) has no {field!r} column (columns: {ds.column_names}); {fix}")
    return joiner.join(ds[field])


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of the whole text at once, without special tokens (1-D LongTensor)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def eval_windows(tokens: torch.Tensor, seqlen: int, bos_id: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of ``seqlen`` tokens, the last partial window dropped.

    With ``bos_id`` each window is BOS followed by ``seqlen - 1`` text tokens."""
    if seqlen < 2:
        raise PtqError(f"seqlen must be >= 2, got {seqlen}")
    step = seqlen - 1 if bos_id is not None else seqlen
    n = tokens.numel() // step
    if n == 0:
        raise PtqError(f"the text has {tokens.numel()} tokens, fewer than one window of {seqlen}")
    w = tokens[: n * step].view(n, step)
    if bos_id is not None:
        w = torch.cat([torch.full((n, 1), bos_id, dtype=w.dtype), w], dim=1)
    return w


def calibration_windows(
    tokenizer,
    source: str | Sequence[str],
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    bos_id: int | None = None,
    split: str = "validation",
) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens at seeded random offsets (LongTensor [nsamples, seqlen])."""
    if nsamples < 1 or seqlen < 2:
        raise PtqError(f"calibration needs nsamples >= 1 and seqlen >= 2, got {nsamples} x {seqlen}")
    tokens = tokenize(tokenizer, load_text(source, split, data_dir))
    body = seqlen - 1 if bos_id is not None else seqlen
    if tokens.numel() <= body:
        raise PtqError(f"calibration text has {tokens.numel()} tokens; one window needs {body + 1}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - body, (nsamples,), generator=g)
    w = torch.stack([tokens[s : s + body] for s in starts.tolist()])
    if bos_id is not None:
        w = torch.cat([torch.full((nsamples, 1), bos_id, dtype=w.dtype), w], dim=1)
    return w


def source_digest(source: str | Sequence[str], split: str = "validation", data_dir=None) -> str:
    """Digest of the text a source resolves to (what fingerprints of calibration data use)."""
    return digest_bytes(load_text(source, split, data_dir).encode("utf-8"))


def calibration_key(source, nsamples: int, seqlen: int, seed: int, bos_id: int | None, split: str = "validation"):
    """A hashable key for memoising calibration windows in ``PassContext.calibration``."""
    src = source if isinstance(source, str) else digest_json(list(source))
    return (src, split, nsamples, seqlen, seed, bos_id)


def shared_calibration_windows(memo: dict, tokenizer, source, nsamples: int, seqlen: int, seed: int = 0,
                               data_dir=None) -> tuple[torch.Tensor, int | None]:
    """``calibration_windows`` memoised in ``memo`` (a pass context's ``calibration`` dict), so passes asking for the
    same windows share one copy. Windows start with the model's BOS (``ptq.models.default_bos_id``).

    Returns (windows, bos_id)."""
    from ptq.models import default_bos_id

    bos = default_bos_id(tokenizer)
    key = calibration_key(source, nsamples, seqlen, seed, bos)
    if key not in memo:
        memo[key] = calibration_windows(tokenizer, source, nsamples, seqlen, seed=seed, data_dir=data_dir,
                                        bos_id=bos)
    return memo[key], bos
