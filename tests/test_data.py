import pytest
import torch

from ptq.data import calibration_windows, eval_windows, load_text, local_path, source_digest, tokenize
from ptq.errors import PtqError


class CharTok:
    """A tokenizer stand-in: one id per byte, so expected windows can be computed by hand."""

    def __call__(self, text, add_special_tokens=False, return_attention_mask=False):
        return {"input_ids": list(text.encode("utf-8"))}


def test_local_wikitext_splits(data_dir):
    test = load_text("wikitext2", "test", data_dir)
    valid = load_text("wikitext2", "validation", data_dir)
    assert len(test.encode()) == 1_290_590  # wiki.test.raw size from the data README
    assert len(valid.encode()) == 1_121_681
    assert local_path("wikitext2", "test", data_dir).name == "wiki.test.raw"


def test_list_and_file_sources(tmp_path):
    assert load_text(["a", "b"]) == "a\n\nb"
    f = tmp_path / "t.txt"
    f.write_text("hello")
    assert load_text(str(f)) == "hello"
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "2.txt").write_text("two")
    (tmp_path / "d" / "1.txt").write_text("one")
    assert load_text(str(tmp_path / "d")) == "one\n\ntwo"


def test_bad_sources_are_clear(tmp_path, monkeypatch):
    with pytest.raises(PtqError, match="unknown text source"):
        load_text("no-such-dataset")
    with pytest.raises(PtqError, match="non-empty list"):
        load_text([])
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(PtqError, match="no local copy"):
        load_text("wikitext2", "test", data_dir=tmp_path)
    with pytest.raises(PtqError, match="unknown split"):
        local_path("wikitext2", "train")


def test_eval_windows_drop_partial_and_bos():
    toks = torch.arange(10)
    w = eval_windows(toks, 4)
    assert w.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    wb = eval_windows(toks, 4, bos_id=99)
    assert wb.tolist() == [[99, 0, 1, 2], [99, 3, 4, 5], [99, 6, 7, 8]]
    with pytest.raises(PtqError, match="fewer than one window"):
        eval_windows(torch.arange(3), 4)


def test_calibration_windows_are_seeded_slices():
    text = "".join(chr(97 + i % 26) for i in range(500))
    tok = CharTok()
    a = calibration_windows(tok, [text], 6, 16, seed=3)
    b = calibration_windows(tok, [text], 6, 16, seed=3)
    c = calibration_windows(tok, [text], 6, 16, seed=4)
    assert a.shape == (6, 16) and torch.equal(a, b) and not torch.equal(a, c)
    full = tokenize(tok, text)
    for row in a:  # every window is a contiguous slice of the text
        start = int((full == row[0]).nonzero()[0])
        hits = [s for s in range(full.numel() - 15) if torch.equal(full[s:s + 16], row)]
        assert hits, f"window starting near {start} is not a slice of the text"
    wb = calibration_windows(tok, [text], 2, 16, seed=3, bos_id=1)
    assert (wb[:, 0] == 1).all() and wb.shape == (2, 16)


def test_source_digest_tracks_content(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("one")
    d1 = source_digest(str(f))
    f.write_text("two")
    assert source_digest(str(f)) != d1
