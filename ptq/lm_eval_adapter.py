"""Run EleutherAI lm-eval tasks on a (quantized) model held in memory.

The model is wrapped in lm-eval's ``HFLM`` as is, so quantized modules stay in place. ``wikitext`` runs from the
local WikiText-2 test file when there is one (or when the hub is off): the articles are cut exactly as the hub
dataset ``EleutherAI/wikitext_document_level`` cuts them (``ptq.eval.split_wikitext_documents``), written to a
JSON-lines file and evaluated by a custom task that reuses lm-eval's own ``wikitext`` detokenizer and metrics.
Any other task is passed to lm-eval by name. lm-eval is imported lazily: the rest of ptq does not need it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Sequence

from ptq.data import embedded_path, load_text, local_path
from ptq.errors import PtqError
from ptq.eval import split_wikitext_documents

LOCAL_WIKITEXT_TASK = "wikitext_ptq_local"


def _import_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise PtqError("lm-eval is not installed: pip install 'lm-eval[hf]' (or use ptq.eval.word_perplexity, "
                       "which computes the wikitext task's word perplexity without it)") from e
    return lm_eval, HFLM, TaskManager


def _hub_offline() -> bool:
    return os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"


def local_wikitext_task(documents: Sequence[str], workdir: str | os.PathLike) -> dict:
    """An lm-eval task config equal to ``wikitext`` but reading ``documents`` (raw articles) from a local file."""
    from lm_eval.tasks.wikitext import preprocess_wikitext as pw

    path = Path(workdir) / "wikitext_documents.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for page in documents:
            f.write(json.dumps({"page": page}) + "\n")
    return {
        "task": LOCAL_WIKITEXT_TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path)}, "cache_dir": str(Path(workdir) / "hf-cache")},
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": pw.wikitext_detokenizer,
        "process_results": pw.process_results,
        "metric_list": [
            {"metric": m, "aggregation": agg, "higher_is_better": False}
            for m, agg in (("word_perplexity", "weighted_perplexity"), ("byte_perplexity", "weighted_perplexity"),
                           ("bits_per_byte", "bits_per_byte"))
        ],
    }


def run_lm_eval(
    model,
    tokenizer,
    tasks: str | Sequence[str],
    *,
    limit: int | float | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    local_wikitext: bool = True,
    documents: Sequence[str] | None = None,
    data_dir=None,
    num_fewshot: int | None = None,
) -> dict:
    """Evaluate ``model`` with lm-eval on ``tasks`` (names); return ``{task: {metric: value}}``.

    ``wikitext`` uses local files when ``local_wikitext`` and a local WikiText-2 test file exists (or ``documents``
    are given: raw articles to evaluate instead); otherwise the standard hub task (an error when the hub is off).
    ``max_length`` is the rolling-window length (default: lm-eval's choice from the model config; pass the same
    value to ``ptq.eval.word_perplexity`` to compare). ``limit`` as in lm-eval (first N documents per task).
    """
    lm_eval, HFLM, TaskManager = _import_lm_eval()
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    if not names or not all(isinstance(t, str) and t for t in names):
        raise PtqError(f"tasks must be a non-empty list of lm-eval task names, got {tasks!r}")
    with tempfile.TemporaryDirectory(prefix="ptq-lm-eval-") as work:
        specs: list = []
        renames = {}
        for name in names:
            if name == "wikitext" and (documents is not None or local_wikitext):
                docs = documents
                if docs is None:  # a local or the embedded wiki.test.raw (always there unless the package is stripped)
                    if local_path("wikitext2", "test", data_dir) is not None or embedded_path("wikitext2", "test"):
                        docs = split_wikitext_documents(load_text("wikitext2", "test", data_dir))
                    elif _hub_offline():
                        raise PtqError("lm-eval task 'wikitext': no local wikitext-2/wiki.test.raw (set PTQ_DATA_DIR"
                                       " or data_dir) and the Hugging Face hub is switched off")
                if docs is not None:
                    specs.append(local_wikitext_task(docs, work))
                    renames[LOCAL_WIKITEXT_TASK] = "wikitext"
                    continue
            specs.append(name)
        only_local = all(isinstance(s, dict) for s in specs)
        # skipping the default index saves ~20 s when only our own task runs
        manager = TaskManager(include_defaults=not only_local)
        lm_kwargs = {"pretrained": model, "tokenizer": tokenizer, "batch_size": batch_size}
        if max_length is not None:
            lm_kwargs["max_length"] = max_length
        lm = HFLM(**lm_kwargs)
        try:
            out = lm_eval.simple_evaluate(model=lm, tasks=specs, task_manager=manager, limit=limit,
                                          num_fewshot=num_fewshot, bootstrap_iters=0, log_samples=False)
        except Exception as e:
            if isinstance(e, PtqError):
                raise
            raise PtqError(f"lm-eval failed on tasks {names}: {type(e).__name__}: {e}") from e
    results = {}
    for task, metrics in out["results"].items():
        clean = {k.split(",")[0]: v for k, v in metrics.items()
                 if "," in k and not k.split(",")[0].endswith("_stderr") and isinstance(v, (int, float))}
        results[renames.get(task, task)] = clean
    return results
