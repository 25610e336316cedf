"""Evaluation: token perplexity, native lm-eval word perplexity, KL / top-1, the lm-eval adapter."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from ptq.data import eval_windows, load_text, tokenize
from ptq.errors import PtqError
from ptq.eval import (
    count_words,
    evaluate_perplexity,
    evaluate_windows,
    kl_divergence,
    rolling_windows,
    split_wikitext_documents,
    wikitext_detokenize,
    wikitext_documents,
    word_perplexity,
)


def _short_pages(data_dir, n=3, lines=12):
    """The first ``n`` WikiText-2 test articles cut to a few lines each (real text, CPU-sized)."""
    return ["\n".join(p.split("\n")[:lines]) for p in wikitext_documents("test", data_dir)[:n]]


# ------------------------------------------------------------------------------------ token perplexity
def test_perplexity_matches_hf_loss(stories260k, data_dir):
    model, tok = stories260k
    text = load_text("tinystories", "validation")[:6000]  # a few stories: tokenizing the whole file takes seconds
    res = evaluate_perplexity(model, tok, [text], seqlen=64, batch_size=3, max_windows=5, bos_id=1, progress=False)
    windows = eval_windows(tokenize(tok, text), 64, bos_id=1)[:5]
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    assert res["n_windows"] == 5 and res["n_tokens"] == 5 * 63
    assert torch.all(windows[:, 0] == 1)
    assert res["ppl"] == pytest.approx(math.exp(sum(losses) / 5), rel=1e-5)
    assert 1.5 < res["ppl"] < 8  # stories260k is a good model of TinyStories (4.26 over the whole file)
    again = evaluate_perplexity(model, tok, [text], seqlen=64, batch_size=1, max_windows=5, bos_id=1, progress=False)
    assert again["ppl"] == pytest.approx(res["ppl"], rel=1e-6)


def test_perplexity_bad_input(stories260k):
    model, tok = stories260k
    with pytest.raises(PtqError, match="max_windows"):
        evaluate_perplexity(model, tok, ["a b c"] * 50, seqlen=8, max_windows=0, progress=False)
    with pytest.raises(PtqError, match="windows must be a LongTensor"):
        evaluate_windows(model, torch.zeros(2, 8), progress=False)
    with pytest.raises(PtqError, match="fewer than one window"):
        evaluate_perplexity(model, tok, ["tiny"], seqlen=512, progress=False)


# ------------------------------------------------------------------------------------------ KL / top-1
def test_kl_self_is_zero_and_perturbed_matches_manual(stories260k):
    model, tok = stories260k
    windows = torch.randint(3, 512, (3, 32), generator=torch.Generator().manual_seed(0))
    same = kl_divergence(model, copy.deepcopy(model), windows, batch_size=2, progress=False)
    assert abs(same["kl"]) < 1e-6 and same["top1"] == 1.0 and same["n_tokens"] == 96

    noisy = copy.deepcopy(model)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    res = kl_divergence(noisy, model, windows, batch_size=2, progress=False)
    with torch.no_grad():
        lq = F.log_softmax(noisy(windows).logits.float(), -1)
        lr = F.log_softmax(model(windows).logits.float(), -1)
    manual = F.kl_div(lq, lr, log_target=True, reduction="sum").item() / (3 * 32)
    assert res["kl"] == pytest.approx(manual, rel=1e-4)
    assert res["kl"] > 1e-3
    assert res["top1"] == pytest.approx((lq.argmax(-1) == lr.argmax(-1)).float().mean().item())
    assert res["top1"] < 1.0


# ------------------------------------------------------------------------------------- word perplexity
def test_split_wikitext_documents():
    text = " \n = A = \n \n x y \n = = Sec = = \n z \n = B = \n w \n"
    docs = split_wikitext_documents(text)
    assert docs == [" = A = \n \n x y \n = = Sec = = \n z ", " = B = \n w \n"]
    assert count_words(docs[1]) == len(["", "=", "B", "=", "w", ""])


def test_wikitext_test_split_has_62_articles(data_dir):
    docs = wikitext_documents("test")
    assert len(docs) == 62 and docs[0].startswith(" = Robert Boulter = ")
    # the articles are the whole file, cut at title lines (only the empty first line is dropped)
    assert "\n".join(docs) == load_text("wikitext2", "test").split("\n", 1)[1]


def test_detokenizer_matches_lm_eval(data_dir):
    pw = pytest.importorskip("lm_eval.tasks.wikitext.preprocess_wikitext")
    for page in wikitext_documents("test"):
        assert wikitext_detokenize(page) == pw.wikitext_detokenizer({"page": page})
    tricky = ' ( a b ) [ c ] { d } " e " \' f \' 3 @.@ 5 1 @,@ 000 x @-@ y N 10 \u00b0 C Jones \' s = = = = H'
    assert wikitext_detokenize(tricky) == pw.wikitext_detokenizer({"page": tricky})


def test_rolling_windows_match_lm_eval():
    utils = pytest.importorskip("lm_eval.utils")
    toks = list(range(10, 47))
    for L in (1, 4, 7, 37, 64):
        ours = rolling_windows(toks, 2, L)
        theirs = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(toks, 2, L, 1)]
        # lm-eval feeds (context + continuation)[-(L+1):][:-1] and scores the last len(continuation) logits
        assert [(inp, tgt) for inp, tgt in ours] == [((c + t)[-(L + 1):][:-1], t) for c, t in theirs]
        assert sum((t for _, t in ours), []) == toks  # every token predicted exactly once
        full = [2] + toks
        for inp, tgt in ours:
            assert len(inp) <= L
            start = next(i for i in range(len(full)) if full[i : i + len(inp)] == inp)
            assert full[start + len(inp) - len(tgt) + 1 : start + len(inp) + 1] == tgt
    assert rolling_windows([], 2, 4) == []


def test_word_perplexity_equals_lm_eval(stories260k, data_dir):
    pytest.importorskip("lm_eval")
    from ptq.lm_eval_adapter import run_lm_eval

    model, tok = stories260k
    pages = _short_pages(data_dir)
    ours = word_perplexity(model, tok, pages, max_length=48, batch_size=4, progress=False)
    theirs = run_lm_eval(model, tok, ["wikitext"], documents=pages, max_length=48, batch_size=4)["wikitext"]
    assert ours["n_documents"] == 3 and ours["n_windows"] > 3 * 2  # several rolling windows per article
    assert ours["word_perplexity"] == pytest.approx(theirs["word_perplexity"], rel=1e-5)
    assert ours["byte_perplexity"] == pytest.approx(theirs["byte_perplexity"], rel=1e-5)
    assert ours["bits_per_byte"] == pytest.approx(theirs["bits_per_byte"], rel=1e-5)
    # a longer context can only help a working language model on average
    longer = word_perplexity(model, tok, pages, max_length=256, batch_size=4, progress=False)
    assert longer["word_perplexity"] < ours["word_perplexity"]


def test_word_perplexity_bad_input(stories260k):
    model, tok = stories260k
    with pytest.raises(PtqError, match="non-empty list"):
        word_perplexity(model, tok, [], progress=False)
    with pytest.raises(PtqError, match="max_documents"):
        word_perplexity(model, tok, ["a"], max_documents=0, progress=False)


# ------------------------------------------------------------------------------------------ the command
def test_eval_command(tmp_path, stories260k_path, data_dir, capsys):
    import json

    from ptq.cli import main

    text = tmp_path / "stories.txt"
    text.write_text(load_text("tinystories", "validation")[:5000])
    common = ["eval", "--model", str(stories260k_path), "--source", str(text), "--seqlen", "64", "--max-windows", "2",
              "--bos-windows", "--dtype", "float32", "--device", "cpu", "--no-progress"]
    assert main(common + ["--json", str(tmp_path / "fp.json")]) == 0
    assert main(common + ["--recipe", "w4a4kv4", "--kl", "--json", str(tmp_path / "q.json")]) == 0
    fp, q = (json.loads((tmp_path / f).read_text()) for f in ("fp.json", "q.json"))
    assert fp["perplexity"]["n_windows"] == 2 and "kl" not in fp["perplexity"]
    assert q["perplexity"]["ppl"] > fp["perplexity"]["ppl"] and q["perplexity"]["kl"] > 0
    assert "KL to unquantized" in capsys.readouterr().out
    assert main(common + ["--kl"]) == 2  # KL needs a recipe: a clear error, not a traceback
    assert "--kl compares a quantized model" in capsys.readouterr().err


@pytest.mark.gpu
def test_cuda_matches_cpu(stories260k, data_dir):
    model, tok = stories260k
    text = load_text("tinystories", "validation")[:20000]
    cpu = evaluate_perplexity(model, tok, [text], seqlen=256, max_windows=8, bos_id=1, progress=False)
    gpu = evaluate_perplexity(model, tok, [text], seqlen=256, max_windows=8, bos_id=1, device="cuda", progress=False)
    assert gpu["ppl"] == pytest.approx(cpu["ppl"], rel=1e-3)
    pages = _short_pages(data_dir)
    w_gpu = word_perplexity(model, tok, pages, max_length=128, device="cuda", progress=False)
    w_cpu = word_perplexity(model.cpu(), tok, pages, max_length=128, progress=False)
    assert w_gpu["word_perplexity"] == pytest.approx(w_cpu["word_perplexity"], rel=1e-3)
