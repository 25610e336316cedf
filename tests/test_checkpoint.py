"""CheckpointStore: what a crash can leave behind, and what a resume trusts (no model needed)."""

import json

import pytest
import torch

from ptq.errors import CheckpointError
from ptq.io import TMP_PREFIX
from ptq.passes.checkpoint import MANIFEST, CheckpointStore, layer_file

FP = {"model": {"config": "c1", "weights": "w1"}, "recipe": {"gptq": {"percdamp": 0.01}},
      "data": {"tokens": "t1"}, "version": "0.1.0"}


def tensors(i):
    g = torch.Generator().manual_seed(i)
    return {f"model.layers.{i}.mlp.down_proj": torch.randn(4, 8, generator=g),
            f"model.layers.{i}.self_attn.q_proj": torch.randn(8, 8, generator=g).to(torch.bfloat16)}


def written(tmp_path, n_done, n_layers=4):
    store = CheckpointStore.open(tmp_path / "ck", FP, n_layers)
    for i in range(n_done):
        store.save_layer(i, tensors(i))
    return tmp_path / "ck"


def test_round_trip_is_bit_exact(tmp_path):
    d = written(tmp_path, 3)
    store = CheckpointStore.open(d, FP, 4)
    assert store.finished == 3
    for i in range(3):
        got, want = store.load_layer(i), tensors(i)
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8))
    manifest = json.loads((d / MANIFEST).read_text())
    assert [e["index"] for e in manifest["layers"]] == [0, 1, 2] and manifest["fingerprint"] == FP


def test_new_directory_gets_a_manifest_and_no_layers(tmp_path):
    store = CheckpointStore.open(tmp_path / "new" / "ck", FP, 4)
    assert store.finished == 0 and (tmp_path / "new" / "ck" / MANIFEST).is_file()


def test_layers_must_be_saved_in_order(tmp_path):
    store = CheckpointStore.open(tmp_path / "ck", FP, 4)
    with pytest.raises(CheckpointError, match="out of order"):
        store.save_layer(1, tensors(1))


@pytest.mark.parametrize("part,change,word", [
    ("model", {"config": "c1", "weights": "w2"}, "different model"),
    ("recipe", {"gptq": {"percdamp": 0.05}}, "different GPTQ recipe"),
    ("data", {"tokens": "t2"}, "different calibration data"),
    ("version", "0.2.0", "different ptq version"),
])
def test_fingerprint_mismatch_names_the_part_and_the_fix(tmp_path, part, change, word):
    d = written(tmp_path, 2)
    with pytest.raises(CheckpointError) as err:
        CheckpointStore.open(d, {**FP, part: change}, 4)
    msg = str(err.value)
    assert word in msg and str(d) in msg and "delete" in msg and "new directory" in msg
    if part == "recipe":
        assert "percdamp" in msg and "0.01" in msg and "0.05" in msg


def test_unlisted_complete_layer_file_is_ignored_and_overwritten(tmp_path):
    # killed between the layer file's rename and the manifest update
    d = written(tmp_path, 2)
    (d / layer_file(2)).write_bytes(b"whatever was there")
    store = CheckpointStore.open(d, FP, 4)
    assert store.finished == 2
    store.save_layer(2, tensors(2))
    assert torch.equal(CheckpointStore.open(d, FP, 4).load_layer(2)["model.layers.2.mlp.down_proj"],
                       tensors(2)["model.layers.2.mlp.down_proj"])


def test_temporary_files_are_never_read(tmp_path):
    # killed while writing: the temp file of the layer (and of the manifest) is left behind
    d = written(tmp_path, 1)
    (d / f"{TMP_PREFIX}abc").write_bytes(b"\x00" * 10)
    assert CheckpointStore.open(d, FP, 4).finished == 1
    only_tmp = tmp_path / "only_tmp"
    only_tmp.mkdir()
    (only_tmp / f"{TMP_PREFIX}manifest").write_bytes(b"{")
    assert CheckpointStore.open(only_tmp, FP, 4).finished == 0  # a crash before the first manifest: start fresh


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_listed_layer_is_refused(tmp_path, damage):
    d = written(tmp_path, 3)
    f = d / layer_file(1)
    data = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        f.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    else:
        f.unlink()
    with pytest.raises(CheckpointError, match="layer 1"):
        CheckpointStore.open(d, FP, 4)


def test_gap_in_listed_layers_is_refused(tmp_path):
    d = written(tmp_path, 3)
    m = json.loads((d / MANIFEST).read_text())
    del m["layers"][1]
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="gap"):
        CheckpointStore.open(d, FP, 4)


def test_corrupt_or_missing_manifest_is_refused(tmp_path):
    d = written(tmp_path, 1)
    (d / MANIFEST).write_text('{"format": 1, "layers": [')
    with pytest.raises(CheckpointError, match="cannot be read"):
        CheckpointStore.open(d, FP, 4)
    (d / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="no manifest.json"):
        CheckpointStore.open(d, FP, 4)


def test_other_layer_count_and_no_resume_are_refused(tmp_path):
    d = written(tmp_path, 1)
    with pytest.raises(CheckpointError, match="5"):
        CheckpointStore.open(d, FP, 5)
    with pytest.raises(CheckpointError, match="resuming is off"):
        CheckpointStore.open(d, FP, 4, resume=False)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        CheckpointStore.open(f, FP, 4)


def test_background_writer_keeps_order_and_finishes_on_exit(tmp_path):
    from ptq.passes.checkpoint import BackgroundWriter

    store = CheckpointStore.open(tmp_path / "ck", FP, 4)
    with BackgroundWriter(store) as w:
        for i in range(3):
            w.save_layer(i, tensors(i))
    again = CheckpointStore.open(tmp_path / "ck", FP, 4)
    assert again.finished == 3
    for i in range(3):
        assert all(torch.equal(again.load_layer(i)[k], v) for k, v in tensors(i).items())


def test_background_writer_keeps_computed_layers_when_the_run_fails(tmp_path):
    from ptq.passes.checkpoint import BackgroundWriter

    store = CheckpointStore.open(tmp_path / "ck", FP, 4)
    with pytest.raises(RuntimeError, match="layer 2 blew up"):
        with BackgroundWriter(store) as w:
            w.save_layer(0, tensors(0))
            w.save_layer(1, tensors(1))
            raise RuntimeError("layer 2 blew up")
    assert CheckpointStore.open(tmp_path / "ck", FP, 4).finished == 2


def test_background_writer_reports_a_failed_write(tmp_path):
    from ptq.passes.checkpoint import BackgroundWriter

    store = CheckpointStore.open(tmp_path / "ck", FP, 4)
    with pytest.raises(CheckpointError, match="out of order"):
        with BackgroundWriter(store) as w:
            w.save_layer(1, tensors(1))  # layer 0 was never saved: the store refuses, the error reaches the caller
