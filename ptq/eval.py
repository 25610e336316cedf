"""Model quality: token perplexity, lm-eval-style word perplexity, KL divergence and top-1 agreement.

Three measurements, all in fp32 whatever the model's dtype (logits are upcast before the softmax; sums of
log-likelihoods are accumulated in fp64):

- ``evaluate_perplexity``: token perplexity over non-overlapping windows of a whole text, the convention of
  ``shared/data/README.md`` (text read as one string, tokenized once, last partial window dropped,
  exp(mean next-token NLL over every predicted token)).
- ``word_perplexity``: lm-eval's ``wikitext`` task computed natively, so it runs where lm-eval is not installed:
  WikiText-2 split into articles the way the ``EleutherAI/wikitext_document_level`` dataset does, each article
  detokenized, scored with rolling windows of ``max_length`` tokens (the first window starts with a prefix token,
  later windows re-use the preceding tokens as context and score only new ones), and the summed log-likelihood
  normalised by the article's word count (words of the *raw* article, as lm-eval counts them).
- ``kl_divergence``: mean per-token KL(P_ref || P_q) of a quantized model against the unquantized one, and how
  often their top-1 predictions agree.
- ``sample_token_windows``: text sampled from the model itself, for runs that have no text at all.
"""

from __future__ import annotations

import math
import re
import time
from collections import defaultdict
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ptq.cuda_graph import GraphedForward, call_logits
from ptq.data import eval_windows, load_text, tokenize
from ptq.errors import PtqError

__all__ = [
    "evaluate_perplexity",
    "evaluate_windows",
    "kl_divergence",
    "word_perplexity",
    "split_wikitext_documents",
    "wikitext_documents",
    "wikitext_detokenize",
    "count_words",
    "rolling_windows",
    "model_device",
    "sample_token_windows",
]


# ----------------------------------------------------------------------------------------------- helpers
def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameterless module)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _place(model: torch.nn.Module, device) -> torch.device:
    """Move ``model`` to ``device`` when one is given; return where it runs."""
    if device is None:
        return model_device(model)
    device = torch.device(device)
    if model_device(model) != device:
        model.to(device)
    return device


# A graph costs a few eager forwards to warm up and capture: worth it only over this many full batches.
MIN_BATCHES_FOR_GRAPH = 4


def _logit_fn(model: torch.nn.Module, device: torch.device, n_full_batches: int, cuda_graph: bool):
    """``ids -> logits`` for ``model``: the full batches (the first shape seen) replayed from a CUDA graph (see
    ``ptq.cuda_graph``) where that pays off; a last partial batch runs eagerly rather than being captured for one
    use."""
    if cuda_graph and device.type == "cuda" and n_full_batches >= MIN_BATCHES_FOR_GRAPH:
        return GraphedForward(model, max_graphs=1)
    return lambda ids: call_logits(model, ids)


def _check_windows(windows: torch.Tensor) -> torch.Tensor:
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.dtype != torch.long:
        got = f"{tuple(windows.shape)} {windows.dtype}" if isinstance(windows, torch.Tensor) else type(windows)
        raise PtqError(f"windows must be a LongTensor [n, seqlen]; got {got}")
    if windows.shape[0] == 0 or windows.shape[1] < 2:
        raise PtqError(f"windows must hold at least one window of >= 2 tokens; got shape {tuple(windows.shape)}")
    return windows


# ----------------------------------------------------------------------------------------------- windows
@torch.no_grad()
def evaluate_windows(
    model: torch.nn.Module,
    windows: torch.Tensor,
    *,
    ref_model: torch.nn.Module | None = None,
    batch_size: int = 8,
    device=None,
    progress: bool = True,
    desc: str = "eval",
    cuda_graph: bool = True,
) -> dict:
    """Next-token NLL of ``model`` over token windows; with ``ref_model`` also KL(P_ref || P_model) and top-1 agreement.

    ``cuda_graph``: on CUDA, replay the forwards of full batches from a CUDA graph (bit-identical logits, no
    per-kernel launch cost: see ``ptq.cuda_graph``); False runs every forward eagerly.

    Returns ``nll`` (mean over predicted tokens), ``ppl``, ``nll_sum``, ``n_tokens`` (predicted tokens: seqlen - 1
    per window), ``n_windows`` and, with a reference, ``kl`` (mean over every position of every window),
    ``top1`` (fraction of positions whose argmax agree) and ``n_kl_tokens``.
    """
    windows = _check_windows(windows)
    if batch_size < 1:
        raise PtqError(f"batch_size must be >= 1, got {batch_size}")
    dev = _place(model, device)
    if ref_model is not None:
        _place(ref_model, dev)
    nll_sum = 0.0
    kl_sum = 0.0
    agree = 0
    n_kl = 0
    n, seqlen = windows.shape
    logits_of = _logit_fn(model, dev, n // batch_size, cuda_graph)
    ref_logits_of = _logit_fn(ref_model, dev, n // batch_size, cuda_graph) if ref_model is not None else None
    for start in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False):
        ids = windows[start : start + batch_size].to(dev)
        logits = logits_of(ids)
        ref_logits = ref_logits_of(ids) if ref_logits_of is not None else None
        # one sequence at a time in fp32: a [B, S, V] fp32 copy of a 49k-vocab model's logits is several GB
        for b in range(ids.shape[0]):
            lq = logits[b].float()
            nll_sum += F.cross_entropy(lq[:-1], ids[b, 1:], reduction="sum").double().item()
            if ref_logits is not None:
                logp_q = F.log_softmax(lq, dim=-1)
                logp_r = F.log_softmax(ref_logits[b].float(), dim=-1)
                kl_sum += (logp_r.exp() * (logp_r - logp_q)).sum().double().item()
                agree += int((logp_q.argmax(-1) == logp_r.argmax(-1)).sum().item())
                n_kl += lq.shape[0]
    n_tokens = n * (seqlen - 1)
    res = {"nll_sum": nll_sum, "n_tokens": n_tokens, "n_windows": n, "nll": nll_sum / n_tokens}
    res["ppl"] = math.exp(res["nll"])
    if ref_model is not None:
        res.update(kl=kl_sum / n_kl, top1=agree / n_kl, n_kl_tokens=n_kl)
    return res


def evaluate_perplexity(
    model: torch.nn.Module,
    tokenizer,
    source="wikitext2",
    split: str = "test",
    seqlen: int = 2048,
    batch_size: int = 8,
    device=None,
    max_windows: int | None = None,
    bos_id: int | None = None,
    progress: bool = True,
    data_dir=None,
    ref_model: torch.nn.Module | None = None,
    cuda_graph: bool = True,
) -> dict:
    """Token perplexity over non-overlapping windows of a whole text (see the module docstring).

    ``source``/``split``/``data_dir`` as in ``ptq.data.load_text``; ``bos_id`` makes every window BOS + seqlen-1
    text tokens; ``max_windows`` keeps the first windows only; ``device`` moves the model there (default: where it
    is). With ``ref_model`` the same pass also gives ``kl`` and ``top1`` against it. ``cuda_graph``: as for
    ``evaluate_windows``.
    Returns ``ppl``, ``nll``, ``n_tokens``, ``n_windows``, ``seconds`` (plus ``kl``/``top1`` with a reference).
    """
    if max_windows is not None and max_windows < 1:
        raise PtqError(f"max_windows must be >= 1 (or None for all), got {max_windows}")
    t0 = time.perf_counter()
    windows = eval_windows(tokenize(tokenizer, load_text(source, split, data_dir)), seqlen, bos_id=bos_id)
    if max_windows is not None:
        windows = windows[:max_windows]
    res = evaluate_windows(model, windows, ref_model=ref_model, batch_size=batch_size, device=device,
                           progress=progress, desc="perplexity", cuda_graph=cuda_graph)
    res.update(seqlen=seqlen, seconds=time.perf_counter() - t0)
    return res


def kl_divergence(
    model_q: torch.nn.Module,
    model_ref: torch.nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 8,
    device=None,
    progress: bool = True,
    cuda_graph: bool = True,
) -> dict:
    """Mean per-token KL(P_ref || P_q) and top-1 agreement over every position of ``windows`` [n, seqlen].

    Both models run on ``device`` (default: where ``model_q`` is). Returns ``kl``, ``top1``, ``n_tokens`` (positions
    compared) and the quantized model's ``ppl`` on the same windows (free: the logits are already there).
    """
    t0 = time.perf_counter()
    r = evaluate_windows(model_q, windows, ref_model=model_ref, batch_size=batch_size, device=device,
                         progress=progress, desc="kl", cuda_graph=cuda_graph)
    return {"kl": r["kl"], "top1": r["top1"], "n_tokens": r["n_kl_tokens"], "ppl": r["ppl"],
            "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------- word perplexity
def split_wikitext_documents(text: str) -> list[str]:
    """WikiText articles as the ``EleutherAI/wikitext_document_level`` dataset cuts them.

    A line is an article title when, after collapsing spaced ``= = =`` / ``= =`` runs and stripping, it starts with
    ``"= "`` and ends with ``" ="`` (section titles collapse to ``==``/``===`` and do not match). Articles are the
    lines joined by ``"\\n"``; blank articles are skipped, except that the last one is always kept.
    """
    pages: list[str] = []
    lines: list[str] = []
    for line in text.split("\n"):
        collapsed = line.replace("= = =", "===").replace("= =", "==").strip()
        if collapsed.startswith("= ") and collapsed.endswith(" ="):
            page = "\n".join(lines)
            if page.strip():
                pages.append(page)
            lines = []
        lines.append(line)
    pages.append("\n".join(lines))
    return pages


def wikitext_documents(split: str = "test", data_dir=None) -> list[str]:
    """The raw WikiText-2 articles of a split (``test`` is the raw file; see ``ptq.data.load_text``)."""
    return split_wikitext_documents(load_text("wikitext2", split, data_dir))


# Undo WikiText's tokenization the way lm-eval's wikitext task does, in the same order (the order matters: e.g.
# " @-@ " must go before the generic " . " rule sees "@.@").
_PLAIN = (("s '", "s'"),)
_REGEX_EARLY = ((r"/' [0-9]/", r"/'[0-9]/"),)
_JOINERS = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."))
_PUNCT = tuple((f" {c} ", f"{c} ") for c in ":;.!?,")
_BRACKETS = tuple(
    (rf"{re.escape(o)}\s*([^{re.escape(c)}]*?)\s*{re.escape(c)}", rf"{o}\1{c}")
    for o, c in (("(", ")"), ("[", "]"), ("{", "}"), ('"', '"'), ("'", "'"))
)
_TAIL = (("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" \u00b0 ", "\u00b0"), (" \n", "\n"),
         ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s"))


def wikitext_detokenize(page: str) -> str:
    """The text lm-eval's ``wikitext`` task scores for a raw article (its ``doc_to_target``)."""
    s = page
    for a, b in _PLAIN:
        s = s.replace(a, b)
    for pat, rep in _REGEX_EARLY:
        s = re.sub(pat, rep, s)
    for a, b in _JOINERS + _PUNCT:
        s = s.replace(a, b)
    for pat, rep in _BRACKETS:
        s = re.sub(pat, rep, s)
    for a, b in _TAIL:
        s = s.replace(a, b)
    return s


def count_words(page: str) -> int:
    """Words of a raw article as lm-eval counts them: pieces of a split on whitespace runs (empty ends included)."""
    return len(re.split(r"\s+", page))


def rolling_windows(tokens: Sequence[int], prefix_token: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """Disjoint rolling windows over ``tokens``: (model input, targets of its last ``len(targets)`` positions).

    The first window is ``[prefix] + tokens[:L-1]`` predicting all of ``tokens[:L]``; each later window is the
    ``max_length`` tokens ending just before its last target and predicts only the targets not yet predicted, so
    every token is predicted exactly once, with as much preceding context as fits (lm-eval's
    ``loglikelihood_rolling`` with context length 1).
    """
    if max_length < 1:
        raise PtqError(f"max_length must be >= 1, got {max_length}")
    toks = list(tokens)
    if not toks:
        return []
    first = min(max_length, len(toks))
    out = [([prefix_token] + toks[: first - 1], toks[:first])]
    done = first
    while done < len(toks):
        end = done + min(len(toks) - done, max_length)
        out.append((toks[end - max_length - 1 : end - 1], toks[done:end]))
        done = end
    return out


def _encode_like_lm_eval(tokenizer, text: str, prefix_token: int) -> list[int]:
    # lm-eval's HFLM keeps the tokenizer's default special tokens unless the text already starts with the prefix
    special = not text.startswith(tokenizer.decode([prefix_token]))
    return tokenizer.encode(text, add_special_tokens=special)


@torch.no_grad()
def word_perplexity(
    model: torch.nn.Module,
    tokenizer,
    documents: Sequence[str] | None = None,
    *,
    split: str = "test",
    max_length: int = 2048,
    batch_size: int = 8,
    device=None,
    max_documents: int | None = None,
    detokenize: bool = True,
    prefix_token_id: int | None = None,
    progress: bool = True,
    data_dir=None,
) -> dict:
    """lm-eval ``wikitext`` word perplexity, computed natively (no lm-eval needed).

    ``documents``: raw articles (default: the WikiText-2 ``split`` articles, see ``wikitext_documents``);
    ``max_documents`` keeps the first ones. Each article is detokenized (``detokenize=False`` scores it as is),
    tokenized like lm-eval's HFLM and scored with ``rolling_windows`` of ``max_length`` (pass the same value as
    lm-eval's ``max_length`` to compare). The prefix token is BOS, else EOS, as in HFLM.
    Returns ``word_perplexity`` = exp(-sum loglik / sum words), ``byte_perplexity``, ``bits_per_byte`` (words and
    UTF-8 bytes of the raw articles), ``loglikelihood``, ``n_words``, ``n_bytes``, ``n_documents``, ``n_tokens``,
    ``n_windows``, ``max_length``, ``seconds``.
    """
    t0 = time.perf_counter()
    pages = list(documents) if documents is not None else wikitext_documents(split, data_dir)
    if max_documents is not None:
        if max_documents < 1:
            raise PtqError(f"max_documents must be >= 1 (or None for all), got {max_documents}")
        pages = pages[:max_documents]
    if not pages or not all(isinstance(p, str) for p in pages):
        raise PtqError("word_perplexity needs a non-empty list of document strings")
    if batch_size < 1:
        raise PtqError(f"batch_size must be >= 1, got {batch_size}")
    if prefix_token_id is None:
        prefix_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if prefix_token_id is None:
        raise PtqError("the tokenizer has neither a BOS nor an EOS token: pass prefix_token_id")
    dev = _place(model, device)

    # group windows by input length so that batches need no padding
    by_len: dict[int, list[tuple[int, list[int], list[int]]]] = defaultdict(list)
    n_tokens = 0
    for i, page in enumerate(pages):
        toks = _encode_like_lm_eval(tokenizer, wikitext_detokenize(page) if detokenize else page, prefix_token_id)
        n_tokens += len(toks)
        for inp, targets in rolling_windows(toks, prefix_token_id, max_length):
            by_len[len(inp)].append((i, inp, targets))
    batches = [items[s : s + batch_size] for _, items in sorted(by_len.items(), reverse=True)
               for s in range(0, len(items), batch_size)]
    loglik = [0.0] * len(pages)
    for batch in tqdm(batches, desc="word perplexity", disable=not progress, leave=False):
        logits = call_logits(model, torch.tensor([inp for _, inp, _ in batch], dtype=torch.long, device=dev))
        for row, (doc, _, targets) in enumerate(batch):
            logp = F.log_softmax(logits[row, -len(targets):].float(), dim=-1)
            tgt = torch.tensor(targets, dtype=torch.long, device=dev)
            loglik[doc] += logp.gather(-1, tgt[:, None]).sum().double().item()

    total = sum(loglik)
    n_words = sum(count_words(p) for p in pages)
    n_bytes = sum(len(p.encode("utf-8")) for p in pages)
    return {
        "word_perplexity": math.exp(-total / n_words),
        "byte_perplexity": math.exp(-total / n_bytes),
        "bits_per_byte": -total / n_bytes / math.log(2),
        "loglikelihood": total,
        "n_words": n_words,
        "n_bytes": n_bytes,
        "n_documents": len(pages),
        "n_tokens": n_tokens,
        "n_windows": sum(len(b) for b in batches),
        "max_length": max_length,
        "seconds": time.perf_counter() - t0,
    }


# ------------------------------------------------------------------------------ text sampled from the model
@torch.no_grad()
def sample_token_windows(
    model: torch.nn.Module,
    n: int,
    seqlen: int,
    *,
    bos_id: int,
    seed: int = 0,
    temperature: float = 1.0,
    batch_size: int = 8,
    device=None,
    progress: bool = True,
) -> torch.Tensor:
    """``n`` sequences of ``seqlen`` tokens sampled from ``model`` itself, each starting with ``bos_id``.

    For runs with no text at all: calibration and KL / top-1 evaluation on what the unquantized model says.
    Ancestral sampling at ``temperature`` (0 = greedy) with a KV cache; the random draws come from a CPU
    ``torch.Generator`` seeded with ``seed``, so a rerun on the same device gives the same tokens.
    Returns a CPU LongTensor [n, seqlen].
    """
    if n < 1 or seqlen < 2:
        raise PtqError(f"sampling needs n >= 1 and seqlen >= 2, got {n} x {seqlen}")
    if temperature < 0:
        raise PtqError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    dev = _place(model, device)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in tqdm(range(0, n, batch_size), desc="sampling text", disable=not progress, leave=False):
        b = min(batch_size, n - start)
        seq = torch.full((b, 1), bos_id, dtype=torch.long, device=dev)
        step_in, past = seq, None
        for _ in range(seqlen - 1):
            o = model(input_ids=step_in, past_key_values=past, use_cache=True)
            past = o.past_key_values
            logits = o.logits[:, -1].float()
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                probs = F.softmax(logits / temperature, dim=-1).cpu()
                nxt = torch.multinomial(probs, 1, generator=gen).to(dev)
            seq = torch.cat([seq, nxt], dim=1)
            step_in = nxt
        out.append(seq.cpu())
    return torch.cat(out)
