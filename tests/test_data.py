import hashlib
import lzma
import time
from pathlib import Path

import pytest
import torch

from network_guard import refuse_network

from ptq.data import (EMBEDDED_DIR, calibration_windows, embedded_path, eval_windows, load_text, local_path,
                      source_digest, text_origin, tokenize)
from ptq.errors import PtqError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# md5 of the original files (../shared/data/README.md); the embedded copies must decompress to exactly these bytes
ORIGINALS = {
    "wiki.test.raw.xz": ("wikitext-2/wiki.test.raw", "7c0137fc034ddbc56a296bce31b4f7fb", 1_290_590),
    "wiki.valid.tokens.xz": ("wikitext-2/wiki.valid.tokens", "d756d22ab2310e7e60c094bea5c5a8eb", 1_121_681),
    "tinystories.validation.txt.xz": ("tinystories/validation.txt", "191935e207102f3b0789aba6194be4c9", 794_375),
}


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
    with pytest.raises(PtqError, match="hf:wikitext.*switched off.*local text file"):
        load_text("hf:wikitext:wikitext-2-raw-v1", "test")
    with pytest.raises(PtqError, match="unknown split"):
        local_path("wikitext2", "train")


@pytest.mark.parametrize("name", sorted(ORIGINALS))
def test_embedded_texts_are_the_originals(name):
    rel, md5, size = ORIGINALS[name]
    raw = lzma.decompress((EMBEDDED_DIR / name).read_bytes())
    assert len(raw) == size and hashlib.md5(raw).hexdigest() == md5
    if (SHARED_DATA / rel).is_file():  # and byte-equal to the shared copy where this checkout has one
        assert hashlib.md5((SHARED_DATA / rel).read_bytes()).hexdigest() == hashlib.md5(raw).hexdigest()
    assert (EMBEDDED_DIR / "README.md").read_text().count(md5) == 1  # the licence README lists what is shipped


def _no_network(monkeypatch):
    return refuse_network(monkeypatch)


def test_named_sources_default_to_the_embedded_copy_without_network(tmp_path, data_dir, monkeypatch):
    for var in ("PTQ_DATA_DIR", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    attempts = _no_network(monkeypatch)
    for (source, split), rel in [(("wikitext2", "test"), "wikitext-2/wiki.test.raw"),
                                 (("wikitext2", "validation"), "wikitext-2/wiki.valid.tokens"),
                                 (("tinystories", "test"), "tinystories/validation.txt")]:
        assert "embedded" in text_origin(source, split)
        assert load_text(source, split) == (data_dir / rel).read_text(encoding="utf-8")
    assert not attempts
    # a data_dir that has the file wins over the embedded copy; one that lacks it falls back to the embedded copy
    (tmp_path / "tinystories").mkdir()
    (tmp_path / "tinystories" / "validation.txt").write_text("my own stories")
    assert load_text("tinystories", "test", tmp_path) == "my own stories"
    assert text_origin("tinystories", "test", tmp_path) == str(tmp_path / "tinystories" / "validation.txt")
    monkeypatch.setenv("PTQ_DATA_DIR", str(tmp_path))
    assert load_text("tinystories") == "my own stories"
    assert load_text("wikitext2", "test") == load_text("wikitext2", "test", data_dir)
    assert embedded_path("wikitext2", "test").name == "wiki.test.raw.xz"


def test_unreachable_hub_is_one_quick_clear_error(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    attempts = _no_network(monkeypatch)
    t0 = time.perf_counter()
    with pytest.raises(PtqError, match="not reachable.*local text file"):
        load_text("hf:wikitext:wikitext-2-raw-v1", "test")
    assert time.perf_counter() - t0 < 5 and len(attempts) == 1  # one probe, no retries


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
