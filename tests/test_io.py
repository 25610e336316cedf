import json
import os

import pytest
import torch

from ptq.io import (TMP_PREFIX, atomic_save_safetensors, atomic_write_json, atomic_write_text, digest_json,
                    digest_tensors, model_fingerprint)


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "sub" / "f.json"
    atomic_write_json(p, {"b": 1, "a": 2})
    atomic_write_json(p, {"a": 3})
    assert json.loads(p.read_text()) == {"a": 3}
    assert [f for f in os.listdir(p.parent) if f.startswith(TMP_PREFIX)] == []


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
    p = tmp_path / "f.txt"
    atomic_write_text(p, "old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(p, "new")
    assert p.read_text() == "old"
    assert [f for f in os.listdir(tmp_path) if f.startswith(TMP_PREFIX)] == []


def test_safetensors_round_trip(tmp_path):
    from safetensors.torch import load_file

    t = {"a": torch.randn(3, 4).to(torch.bfloat16), "b": torch.arange(5, dtype=torch.uint8)}
    atomic_save_safetensors(t, tmp_path / "x.safetensors", metadata={"k": "v"})
    back = load_file(tmp_path / "x.safetensors")
    assert all(torch.equal(back[k], t[k]) for k in t)


def test_digests_are_content_sensitive():
    a = torch.zeros(4)
    assert digest_tensors([("w", a)]) == digest_tensors([("w", a.clone())])
    assert digest_tensors([("w", a)]) != digest_tensors([("w", a.to(torch.float16))])
    assert digest_tensors([("w", a)]) != digest_tensors([("v", a)])
    b = a.clone()
    b[1] = 1e-30
    assert digest_tensors([("w", a)]) != digest_tensors([("w", b)])
    assert digest_json({"a": 1, "b": 2}) == digest_json({"b": 2, "a": 1})


def test_model_fingerprint(stories260k):
    model, _ = stories260k
    f1 = model_fingerprint(model)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    f2 = model_fingerprint(model)
    assert f1["config"] == f2["config"] and f1["weights"] != f2["weights"]
