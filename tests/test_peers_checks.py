"""bench/peers.py's tool-agnostic checks: they must accept what ptq's quantizers produce and reject what they do not
(a peer row is only as trustworthy as these)."""

import importlib.util
from pathlib import Path

import pytest
import torch

from ptq.formats import QuantSpec
from ptq.quantizers import fake_quantize


@pytest.fixture(scope="module")
def peers():
    spec = importlib.util.spec_from_file_location("peers", Path(__file__).resolve().parents[1] / "bench" / "peers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


SPECS = {"mxfp4": QuantSpec.mxfp("e2m1", block_size=32), "nvfp4": QuantSpec.nvfp4()}


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_grid_check_accepts_quantized_and_rejects_plain_weights(peers, fmt):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g) * torch.logspace(-2, 1, 96)  # blocks of very different ranges
    assert peers.on_grid_fraction(fake_quantize(w, SPECS[fmt]), fmt) == 1.0
    assert peers.on_grid_fraction(w, fmt) < 0.01
    if fmt == "mxfp4":  # nvfp4's free scale puts any block whose max is a grid value times s on "a" grid
        assert peers.on_grid_fraction(fake_quantize(w, SPECS["nvfp4"]), fmt) < 0.5


def test_activation_check_tells_a_quantized_input_from_a_plain_product(peers):
    from ptq.config import LinearQuantConfig
    from ptq.modules.linear import LinearMX

    lin = torch.nn.Linear(64, 16)
    w_eff = fake_quantize(lin.weight.detach(), SPECS["mxfp4"])
    both = LinearMX.from_linear(lin, LinearQuantConfig(weight=SPECS["mxfp4"], data_in=SPECS["mxfp4"]))
    weight_only = LinearMX.from_linear(lin, LinearQuantConfig(weight=SPECS["mxfp4"]))
    assert peers.activation_quantized(both, w_eff)
    assert not peers.activation_quantized(weight_only, w_eff)


def test_reuse_keeps_a_finished_row_only_for_the_same_data_and_settings(peers, tmp_path, monkeypatch):
    import argparse
    import json

    calls = []

    def fake_run(cmd, **kw):  # a worker that writes a row, as the real one does
        calls.append(cmd)
        res = Path(cmd[cmd.index("--result") + 1])
        res.write_text(json.dumps({"tool": "ptq", "format": "mxfp4", "variant": "gptq", "status": "ok",
                                   "ppl": 7.0 + len(calls)}))
        return argparse.Namespace(returncode=0, stderr="", stdout="")

    monkeypatch.setattr(peers.subprocess, "run", fake_run)
    data = tmp_path / "data.pt"
    data.write_bytes(b"windows")
    args = argparse.Namespace(model=str(tmp_path), dtype="float32", device="cpu", batch=8, search_windows=8,
                              reuse=True)
    first = peers._run_worker(args, tmp_path, data, "python", "ptq", "mxfp4", "gptq")
    assert peers._run_worker(args, tmp_path, data, "python", "ptq", "mxfp4", "gptq")["ppl"] == first["ppl"]
    assert len(calls) == 1
    args.search_windows = 4  # another setting: rerun
    assert peers._run_worker(args, tmp_path, data, "python", "ptq", "mxfp4", "gptq")["ppl"] != first["ppl"]
    data.write_bytes(b"other windows")  # other data: rerun
    peers._run_worker(args, tmp_path, data, "python", "ptq", "mxfp4", "gptq")
    shipped = peers.ptq_gptq_settings()
    assert shipped["asymmetric"] == 0.25 and shipped["act_order"]  # what recipes/w4a4kv4_gptq.toml says
    monkeypatch.setattr(peers, "ptq_gptq_settings", lambda: {**shipped, "asymmetric": 0.0})
    peers._run_worker(args, tmp_path, data, "python", "ptq", "mxfp4", "gptq")  # other GPTQ settings: rerun
    args.reuse = False  # without --reuse: always rerun
    peers._run_worker(args, tmp_path, data, "python", "ptq", "mxfp4", "gptq")
    assert len(calls) == 5
