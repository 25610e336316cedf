"""The one-command quality table: the unquantized model and each recipe, evaluated the same way, written as
Markdown, JSON and a PNG bar chart.

Each row loads a fresh model, quantizes it with its recipe (GPTQ checkpoints and rotation caches redirected under
the output directory, so a rerun reuses them) and measures token perplexity on non-overlapping windows, KL
divergence / top-1 agreement against the unquantized model on the same windows, and (for WikiText-2) lm-eval's word
perplexity computed natively. A finished row is stored in ``OUT/rows/<key>.json``, keyed by everything that
determines it (model weights and config, the merged recipe, the calibration and evaluation data, the evaluation
settings, the ptq version), so a rerun recomputes only the rows whose inputs changed.

With no text at all (no local files, hub unreachable) the table still runs: calibration uses text sampled from the
unquantized model, and quality is KL divergence / top-1 agreement on other sampled sequences; the report says so.
"""

from __future__ import annotations

import io
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ptq.data import eval_windows, load_text, text_origin, tokenize
from ptq.errors import PtqError
from ptq.eval import evaluate_windows, sample_token_windows, word_perplexity, wikitext_documents
from ptq.io import atomic_write_bytes, atomic_write_json, atomic_write_text, digest_json, model_fingerprint

__all__ = ["TableSettings", "run_table", "default_recipe_paths", "render_markdown", "render_png", "method_label"]

# w4a4kv4_gptq_learn.toml is not a default row: its training takes minutes on a GPU (hours on the quick table's CPU)
# for 3% lower perplexity than w4a4kv4_gptq_rot.toml on SmolLM2 (40.26 against 41.63, H100)
SHIPPED_RECIPES = ("w4a4kv4.toml", "w4a4kv4_gptq.toml", "w4a4kv4_gptq_rot.toml")
ROW_SCHEMA = 1  # bump when the content of a stored row changes meaning


@dataclass(frozen=True)
class Budget:
    """Calibration sizes that replace the recipes' own (``[gptq]`` nsamples x seqlen, ``[rotation_search]``
    calib_nsamples x calib_seqlen) for a faster table; every other recipe key is kept."""

    gptq_nsamples: int
    gptq_seqlen: int
    rotation_nsamples: int
    rotation_seqlen: int

    def describe(self) -> str:
        return (f"GPTQ calibration {self.gptq_nsamples} x {self.gptq_seqlen} tokens, rotation search "
                f"{self.rotation_nsamples} x {self.rotation_seqlen} tokens per trial")


# The quick table (`ptq table --quick`, and the default without CUDA): minutes on a 2-core CPU for SmolLM2-135M.
# The rotation search runs one whole-model forward per trial (~35 trials for 8 candidate types), so its windows,
# not GPTQ's, set the pace: 4 x 512 tokens per trial instead of the recipe's 32 x 512.
QUICK_BUDGET = Budget(gptq_nsamples=32, gptq_seqlen=512, rotation_nsamples=4, rotation_seqlen=512)
QUICK_SEQLEN = 512
QUICK_MAX_WINDOWS = 8


@dataclass(frozen=True)
class TableSettings:
    """What ``ptq table`` measures and where it writes (all fields have CLI flags of the same name).

    model: HF id / local path (None: the built-in SmolLM2-135M). recipes: TOML paths or shipped recipe names
    (empty: the three shipped W4A4KV4 recipes). source / split: evaluation text. seqlen, batch_size, max_windows:
    token-perplexity windows (and KL windows);
    bos_windows: each window is BOS + seqlen-1 tokens (default: plain windows, the data README's convention). word_ppl: also lm-eval's word perplexity (WikiText-2 only), natively;
    max_documents limits its articles. sample_*: the no-text fallback (sequences sampled from the model).
    cuda_graph: replay full evaluation batches from CUDA graphs on CUDA (bit-identical, see ``ptq.cuda_graph``).
    budget: calibration sizes replacing the recipes' own (None: as the recipes say); see ``quick_settings``.
    """

    out: str = "ptq-table"
    model: str | None = None
    recipes: tuple[str, ...] = ()
    source: str = "wikitext2"
    split: str = "test"
    seqlen: int = 2048
    batch_size: int = 8
    max_windows: int | None = None
    bos_windows: bool = False
    word_ppl: bool = True
    max_documents: int | None = None
    dtype: str = "auto"
    device: str | None = None
    data_dir: str | None = None
    plot: bool = True
    progress: bool = True
    cuda_graph: bool = True
    budget: Budget | None = None
    sample_calib_n: int = 64
    sample_eval_n: int = 16
    sample_seqlen: int = 512
    sample_temperature: float = 1.0
    seed: int = 0


# ------------------------------------------------------------------------------------------- recipes
def _recipes_dir() -> Path:
    import ptq

    return Path(ptq.__file__).resolve().parent.parent / "recipes"


def default_recipe_paths() -> list[Path]:
    """The shipped W4A4KV4 recipes: RTN, + GPTQ, + rotation search, + learned rotations (in table order)."""
    d = _recipes_dir()
    paths = [d / name for name in SHIPPED_RECIPES]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise PtqError(f"shipped recipe(s) {', '.join(missing)} not found in {d}: run from a ptq source checkout, or "
                       f"pass recipe files with --recipes")
    return paths


def resolve_recipe_path(name: str) -> Path:
    """A recipe given as a path, or as the name of a shipped recipe (``w4a4kv4_gptq`` / ``w4a4kv4_gptq.toml``)."""
    p = Path(name).expanduser()
    if p.is_file():
        return p
    shipped = _recipes_dir() / (name if name.endswith(".toml") else f"{name}.toml")
    if shipped.is_file():
        return shipped
    avail = sorted(x.stem for x in _recipes_dir().glob("*.toml")) if _recipes_dir().is_dir() else []
    raise PtqError(f"recipe {name!r} is neither a file nor a shipped recipe; shipped: {', '.join(avail) or '(none)'}")


def method_label(recipe) -> str:
    """What a recipe does, in the words of the table, in pass order: RTN, GPTQ, rotation + GPTQ,
    rotation + learned R1/R2 + GPTQ ..."""
    parts = ["rotation"] if recipe.rotation_search is not None else []
    if recipe.rotation_learn is not None:
        parts.append("learned " + "/".join(r.upper() for r in recipe.rotation_learn.rotations))
    return " + ".join(parts + ["GPTQ" if recipe.gptq is not None else "RTN"])


def quick_settings(**overrides) -> TableSettings:
    """The quick table: the shipped recipes under ``QUICK_BUDGET``, perplexity on ``QUICK_MAX_WINDOWS`` windows of
    ``QUICK_SEQLEN`` tokens, no word perplexity (it would score every WikiText-2 test article). ``overrides`` win."""
    base = dict(budget=QUICK_BUDGET, seqlen=QUICK_SEQLEN, max_windows=QUICK_MAX_WINDOWS, word_ppl=False)
    return TableSettings(**{**base, **overrides})


def describe_budget(settings: TableSettings) -> str:
    """One line: what the table measures with (for the first line of output and the report)."""
    windows = "all windows" if settings.max_windows is None else f"the first {settings.max_windows} windows"
    calib = settings.budget.describe() if settings.budget is not None else "calibration as the recipes say"
    return f"{calib}; perplexity on {windows} of {settings.seqlen} tokens"


def _redirect_outputs(recipe, stem: str, out: Path, model_key: str, calib_texts: list[str] | None,
                      budget: Budget | None = None):
    """A copy of ``recipe`` whose GPTQ checkpoints and rotation cache live under ``out`` (and, without text, whose
    calibration data is the sampled text; with a ``budget``, whose calibration sizes are the budget's). The recipe
    file itself is never edited."""
    upd: dict[str, Any] = {}
    base = out / "checkpoints" / model_key / stem
    if recipe.gptq is not None:
        g: dict[str, Any] = {"checkpoint_dir": str(base / "gptq")}
        if calib_texts is not None:
            g["dataset"] = calib_texts
        if budget is not None:
            g.update(nsamples=budget.gptq_nsamples, seqlen=budget.gptq_seqlen)
        upd["gptq"] = recipe.gptq.model_copy(update=g)
    if recipe.rotation_search is not None:
        r: dict[str, Any] = {"cache_path": str(base / "rotation.json")}
        if budget is not None:
            r.update(calib_nsamples=budget.rotation_nsamples, calib_seqlen=budget.rotation_seqlen)
        if calib_texts is not None:
            r["dataset"] = calib_texts
        upd["rotation_search"] = recipe.rotation_search.model_copy(update=r)
    if recipe.rotation_learn is not None:
        r = {"checkpoint_path": str(base / "rotation_learn.pt")}
        if calib_texts is not None:
            r["dataset"] = calib_texts
        upd["rotation_learn"] = recipe.rotation_learn.model_copy(update=r)
    return recipe.model_copy(update=upd) if upd else recipe


def _recipe_identity(recipe) -> dict:
    """The merged recipe minus where its outputs go (so moving OUT does not invalidate stored rows)."""
    from ptq.recipe import recipe_to_dict

    d = recipe_to_dict(recipe)
    d.get("gptq", {}).pop("checkpoint_dir", None)
    d.get("rotation_search", {}).pop("cache_path", None)
    d.get("rotation_learn", {}).pop("checkpoint_path", None)
    return d


def describe_reuse(info: dict) -> str:
    """What the passes reused, from their info dicts: GPTQ layers read from checkpoints, rotation decisions read from
    the cache, and (for other passes) any truthy ``*reus*`` / ``*resum*`` / ``*cache*`` / ``*loaded*`` entry."""
    parts = []
    for name, d in info.items():
        if not isinstance(d, dict):
            continue
        if name == "gptq":
            if d.get("loaded"):
                parts.append(f"GPTQ: {len(d['loaded'])}/{d.get('layers', '?')} layers from checkpoint")
            continue
        if name == "rotation_search":
            if d.get("cache_used"):
                parts.append("rotation: decision from cache" if not d.get("searched")
                             else f"rotation: {d.get('rounds_loaded', 0)} search rounds from cache")
            continue
        for k, v in d.items():
            low = k.lower()
            if any(w in low for w in ("reus", "resum", "cache", "loaded")) and v not in (None, False, 0, [], {}, ""):
                val = len(v) if isinstance(v, (list, tuple, dict)) else v
                parts.append(f"{name}: {k}={val}" if val is not True else f"{name}: {k}")
    return "; ".join(parts) or "-"


# --------------------------------------------------------------------------------------------- helpers
def _ptq_version() -> str:
    try:
        from importlib.metadata import version

        return version("ptq")
    except Exception:
        import ptq

        return getattr(ptq, "__version__", "0+unknown")


def _log(settings: TableSettings, msg: str) -> None:
    if settings.progress:
        print(f"[ptq table] {msg}", file=sys.stderr, flush=True)


def _text_or_error(source, split, data_dir) -> tuple[str | None, str | None]:
    """(text, None), or (None, why it cannot be loaded)."""
    try:
        return load_text(source, split, data_dir), None
    except PtqError as e:
        return None, str(e)


def _text_or_none(source, split, data_dir) -> str | None:
    return _text_or_error(source, split, data_dir)[0]


def _default_loader(name, *, dtype, device):
    from ptq.models import load_model

    return load_model(name, dtype=dtype, device=device)


def _bos(tokenizer) -> int | None:
    try:
        from ptq.models import default_bos_id
    except ImportError:
        return tokenizer.bos_token_id
    return default_bos_id(tokenizer)


# ---------------------------------------------------------------------------------------------- runner
@dataclass
class _Plan:
    mode: str  # "perplexity" | "sampled"
    windows: torch.Tensor
    eval_digest: str
    calib_texts: list[str] | None = None  # sampled calibration text, for the recipes in calib_for
    calib_for: set[str] = field(default_factory=set)
    word_docs: list[str] | None = None
    notes: list[str] = field(default_factory=list)


def _plan_evaluation(settings: TableSettings, ref, tok, bos, recipes, out: Path, device) -> _Plan:
    text, why = _text_or_error(settings.source, settings.split, settings.data_dir)
    # recipes whose calibrated passes (GPTQ, rotation search) name text that cannot be loaded here
    calib_missing = sorted({stem for stem, r in recipes for cfg in (r.gptq, r.rotation_search, r.rotation_learn)
                            if cfg is not None and _text_or_none(cfg.dataset, "validation", settings.data_dir) is None})
    sampled_calib = None
    if calib_missing:
        sampled_calib = _sampled(settings, ref, tok, bos, out, device, "calibration", settings.sample_calib_n,
                                 settings.seed)
    if text is not None:
        windows = eval_windows(tokenize(tok, text), settings.seqlen, bos_id=bos if settings.bos_windows else None)
        if settings.max_windows is not None:
            windows = windows[: settings.max_windows]
        docs = None
        if settings.word_ppl and settings.source == "wikitext2" and settings.split == "test":
            docs = wikitext_documents("test", settings.data_dir)
            if settings.max_documents is not None:
                docs = docs[: settings.max_documents]
        plan = _Plan("perplexity", windows, digest_json([settings.source, settings.split, text]), word_docs=docs)
    else:
        w = _sampled(settings, ref, tok, bos, out, device, "evaluation", settings.sample_eval_n, settings.seed + 1)
        plan = _Plan("sampled", w["windows"], w["digest"])
        plan.notes.append(
            f"No evaluation text was found ({settings.source!r} could not be loaded: {why}), so "
            f"this table reports no perplexity: quality is the KL divergence "
            f"and top-1 agreement to the unquantized model on {settings.sample_eval_n} sequences of "
            f"{settings.sample_seqlen} tokens sampled from the unquantized model itself.")
    if sampled_calib is not None:
        plan.calib_texts, plan.calib_for = sampled_calib["texts"], set(calib_missing)
        plan.notes.append(f"Calibration text for {', '.join(calib_missing)} was not available, so calibration used "
                          f"{settings.sample_calib_n} sequences sampled from the unquantized model "
                          f"(temperature {settings.sample_temperature}, seed {settings.seed}).")
    return plan


def _sampled(settings, ref, tok, bos, out: Path, device, what: str, n: int, seed: int) -> dict:
    """Sequences sampled from the reference model, stored under OUT/sampled so reruns reuse the same tokens."""
    if bos is None:
        raise PtqError("sampling text from the model needs a BOS token id, and the tokenizer has none")
    key = digest_json([model_fingerprint(ref), n, settings.sample_seqlen, seed, settings.sample_temperature, bos])
    path = out / "sampled" / f"{what}-{key[:16]}.json"
    if path.is_file():
        ids = torch.tensor(json.loads(path.read_text())["ids"], dtype=torch.long)
    else:
        ids = sample_token_windows(ref, n, settings.sample_seqlen, bos_id=bos, seed=seed,
                                   temperature=settings.sample_temperature, batch_size=settings.batch_size,
                                   device=device, progress=settings.progress)
        atomic_write_json(path, {"what": what, "seed": seed, "ids": ids.tolist()})
    texts = [tok.decode(row[1:], skip_special_tokens=True) for row in ids]
    return {"windows": ids, "texts": texts, "digest": digest_json(ids.tolist())}


def _measure(settings: TableSettings, model, ref, tok, plan: _Plan, device) -> dict:
    t0 = time.perf_counter()
    r = evaluate_windows(model, plan.windows, ref_model=ref, batch_size=settings.batch_size, device=device,
                         progress=settings.progress, cuda_graph=settings.cuda_graph)
    row: dict[str, Any] = {"n_windows": r["n_windows"], "n_tokens": r["n_tokens"]}
    if plan.mode == "perplexity":
        row["ppl"] = r["ppl"]
    if ref is not None:
        row.update(kl=r["kl"], top1=r["top1"])
    if plan.word_docs is not None:
        w = word_perplexity(model, tok, plan.word_docs, max_length=settings.seqlen, batch_size=settings.batch_size,
                            device=device, progress=settings.progress)
        row.update(word_ppl=w["word_perplexity"], bits_per_byte=w["bits_per_byte"], n_documents=w["n_documents"])
    row["eval_seconds"] = time.perf_counter() - t0
    return row


def run_table(
    settings: TableSettings,
    *,
    loader: Callable[..., tuple[torch.nn.Module, Any]] | None = None,
    recipes: Sequence[tuple[str, Any]] | None = None,
) -> dict:
    """Build the table (see the module docstring); write OUT/table.md, table.json, table.png; return the report.

    ``loader(name, dtype=, device=) -> (model, tokenizer)`` defaults to ``ptq.models.load_model``. ``recipes``
    (``(label, Recipe or path)`` pairs) overrides ``settings.recipes``, for callers that build recipes in code.
    """
    from ptq.passes.pipeline import quantize_module_transform_pass
    from ptq.recipe import load_recipe

    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    loader = loader or _default_loader
    device = torch.device(settings.device) if settings.device else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if recipes is None:
        paths = [resolve_recipe_path(r) for r in settings.recipes] if settings.recipes else default_recipe_paths()
        recipes = [(p.stem, p) for p in paths]
    loaded = [(label, load_recipe(r)) for label, r in recipes]  # fail on a bad recipe before any model work
    if len({label for label, _ in loaded}) != len(loaded):
        raise PtqError(f"two recipes share a label ({[label for label, _ in loaded]}); rename one recipe file")

    t_start = time.perf_counter()
    _log(settings, f"loading {settings.model or 'the built-in default model (SmolLM2-135M)'}")
    ref, tok = loader(settings.model, dtype=settings.dtype, device=str(device))
    ref.eval()
    bos = _bos(tok)
    fp = model_fingerprint(ref)
    model_key = digest_json(fp)[:12]
    plan = _plan_evaluation(settings, ref, tok, bos, loaded, out, device)
    eval_identity = {
        "schema": ROW_SCHEMA, "ptq": _ptq_version(), "mode": plan.mode, "eval_data": plan.eval_digest,
        "windows": digest_json(plan.windows.tolist()), "word_docs": digest_json(plan.word_docs),
        "seqlen": settings.seqlen, "device_type": device.type,
    }

    rows = []
    total = len(loaded) + 1
    base_key = digest_json({"model": fp, "recipe": None, **eval_identity})
    rows.append(_cached_or(out, base_key, settings, f"[1/{total}] unquantized", lambda: {
        **_measure(settings, ref, None, tok, plan, device), "quantize_seconds": 0.0, "reused": "-"}))
    rows[-1].update(label="unquantized", method="-", recipe=None)

    for i, (label, recipe) in enumerate(loaded, start=2):
        run_recipe = _redirect_outputs(recipe, label, out, model_key,
                                      plan.calib_texts if label in plan.calib_for else None, settings.budget)
        key = digest_json({"model": fp, "recipe": _recipe_identity(run_recipe), **eval_identity})

        def compute(run_recipe=run_recipe):
            model, _ = loader(settings.model, dtype=settings.dtype, device=str(device))
            model.eval()
            t0 = time.perf_counter()
            model, info = quantize_module_transform_pass(model, run_recipe, tokenizer=tok, device=device,
                                                         progress=settings.progress)
            quant_s = time.perf_counter() - t0
            row = _measure(settings, model, ref, tok, plan, device)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rot = info.get("rotation_search", {})
            return {**row, "quantize_seconds": quant_s, "reused": describe_reuse(info), "passes": list(info),
                    "rotations": rot.get("chosen") if isinstance(rot, dict) else None}

        rows.append(_cached_or(out, key, settings, f"[{i}/{total}] {label}", compute))
        method = method_label(recipe)
        if rows[-1].get("rotations") is not None:
            method = method.replace("rotation", f"rotation ({', '.join(rows[-1]['rotations']) or 'none kept'})")
        rows[-1].update(label=label, method=method, recipe=str(recipe.source or label))

    _add_ratios(rows)
    report = {
        "model": _display_name(settings.model),
        "mode": plan.mode,
        "settings": asdict(settings),
        "device": str(device),
        "notes": plan.notes,
        "budget": describe_budget(settings),
        "text_origin": text_origin(settings.source, settings.split, settings.data_dir) if plan.mode == "perplexity"
        else None,
        "rows": rows,
        "monotone": _monotone(rows, "ppl" if plan.mode == "perplexity" else "kl"),
        "seconds": time.perf_counter() - t_start,
    }
    write_report(report, out, plot=settings.plot)
    _log(settings, f"wrote {out / 'table.md'}")
    return report


def _cached_or(out: Path, key: str, settings: TableSettings, what: str, compute: Callable[[], dict]) -> dict:
    path = out / "rows" / f"{key[:32]}.json"
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            _log(settings, f"{what}: unchanged, reusing {path.name}")
            return {**stored["row"], "cached": True}
    _log(settings, f"{what}: computing")
    t0 = time.perf_counter()
    row = compute()
    row["wall_seconds"] = time.perf_counter() - t0
    atomic_write_json(path, {"key": key, "row": row})
    _log(settings, f"{what}: done in {row['wall_seconds']:.1f} s")
    return {**row, "cached": False}


def _add_ratios(rows: list[dict]) -> None:
    base = rows[0]
    for r in rows:
        for k in ("ppl", "word_ppl"):
            if r.get(k) is not None and base.get(k):
                r[f"{k}_ratio"] = r[k] / base[k]


def _monotone(rows: list[dict], key: str) -> bool | None:
    """Whether each quantized row is closer to the unquantized model than the quantized row before it."""
    vals = [r.get(key) for r in rows[1:]]
    if any(v is None for v in vals) or len(vals) < 2:
        return None
    return all(b < a for a, b in zip(vals, vals[1:]))


def _display_name(model: str | None) -> str:
    if model is None:
        return "SmolLM2-135M (built-in default)"
    p = Path(model).expanduser()
    return p.name if p.exists() else model


# ---------------------------------------------------------------------------------------------- output
def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def render_markdown(report: dict) -> str:
    """The report as a Markdown document: header, notes, the table, how to read it."""
    s = report["settings"]
    rows = report["rows"]
    ppl_mode = report["mode"] == "perplexity"
    lines = [f"# ptq table: {report['model']}", ""]
    if ppl_mode:
        origin = f", read from {report['text_origin']}" if report.get("text_origin") else ""
        lines.append(f"Evaluation: `{s['source']}` ({s['split']}{origin}), non-overlapping windows of {s['seqlen']} "
                     f"tokens ({rows[0]['n_windows']} windows, {rows[0]['n_tokens']} predicted tokens), device "
                     f"`{report['device']}`.")
    else:
        lines.append("**No text source was available: this table reports KL divergence and top-1 agreement to the "
                     "unquantized model on text sampled from that model, not perplexity.**")
    if report.get("budget"):
        quick = " (the quick table: `ptq table --full` runs the recipes' own calibration)" if s.get("budget") else ""
        lines.append(f"Budget{quick}: {report['budget']}.")
    lines.append("")
    for n in report["notes"]:
        lines += [f"> {n}", ""]
    has_word = any(r.get("word_ppl") is not None for r in rows)
    head = ["row", "method"]
    if ppl_mode:
        head += ["perplexity", "x unquantized"]
    if has_word:
        head += ["word ppl (lm-eval wikitext)", "x unquantized"]
    head += ["KL to unquantized", "top-1 agreement", "quantize s", "eval s", "reused"]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [r["label"], r["method"]]
        if ppl_mode:
            cells += [_f(r.get("ppl"), ".3f"), _f(r.get("ppl_ratio"), ".3f")]
        if has_word:
            cells += [_f(r.get("word_ppl"), ".3f"), _f(r.get("word_ppl_ratio"), ".3f")]
        reused = r.get("reused", "-")
        if r.get("cached"):
            reused = "whole row (unchanged)" if reused == "-" else f"whole row (unchanged); {reused}"
        cells += [_f(r.get("kl"), ".4f"), _f(r.get("top1"), ".4f"), _f(r.get("quantize_seconds"), ".1f"),
                  _f(r.get("eval_seconds"), ".1f"), reused]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    mono = report.get("monotone")
    if mono is not None:
        what = "perplexity" if ppl_mode else "KL divergence"
        lines.append(f"Each quantized row is closer to the unquantized model than the one before ({what}): "
                     f"**{'yes' if mono else 'no'}**.")
    if has_word:
        lines.append(f"Word perplexity: lm-eval's `wikitext` task (rolling windows of {s['seqlen']} tokens, per-article "
                     "log-likelihood over word count), computed natively by `ptq.eval.word_perplexity`"
                     + (f" on the first {s['max_documents']} articles" if s.get("max_documents") else "") + ".")
    lines.append(f"Times are wall-clock seconds of the run that computed the row; total this run "
                 f"{report['seconds']:.1f} s.")
    return "\n".join(lines) + "\n"


def render_png(report: dict) -> bytes:
    """A bar chart (PNG bytes) of perplexity (or KL without text) per row, labelled with the ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    ppl_mode = report["mode"] == "perplexity"
    key = "ppl" if ppl_mode else "kl"
    rows = rows if ppl_mode else rows[1:]
    vals = [r.get(key) or 0.0 for r in rows]
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(rows), 3.6), dpi=120)
    bars = ax.bar([r["label"] for r in rows], vals, color=["#7f7f7f"] + ["#1f77b4"] * (len(rows) - 1))
    for b, r in zip(bars, rows):
        txt = f"{r[key]:.2f}" if ppl_mode else f"{r[key]:.3f}"
        if ppl_mode and r.get("ppl_ratio") is not None:
            txt += f"\n{r['ppl_ratio']:.2f}x"
        ax.annotate(txt, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("perplexity" if ppl_mode else "KL to unquantized")
    ax.set_title(f"{report['model']}" + ("" if ppl_mode else " (no text: KL on sampled text)"), fontsize=9)
    ax.margins(y=0.2)
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_report(report: dict, out: Path, plot: bool = True) -> None:
    """Write table.md, table.json and (with ``plot``) table.png under ``out``, each atomically."""
    atomic_write_text(out / "table.md", render_markdown(report))
    atomic_write_json(out / "table.json", report)
    if plot:
        atomic_write_bytes(out / "table.png", render_png(report))
