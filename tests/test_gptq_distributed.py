"""Data-parallel GPTQ under torchrun (gloo, 2 CPU ranks) against one process, on stories260k (issue 17).

- Same Hessians and asymmetric cross terms (every group of every layer: the per-batch x^T x are summed in fp64, so the split over ranks does
  not change them beyond fp32 rounding; asserted <= 1e-5 relative, observed equal) and the same GPTQ weights, bit for
  bit, although each rank calibrated on half of the batches and solved half of the rows.
- ``torchrun -m ptq.cli quantize`` with one rank SIGKILLed in the middle of layer 2 fails with a message, keeps layers
  0-1, and the same command resumes and finishes with the same weights as the uninterrupted run.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gptq_recipe import gptq_recipe_text

from ptq.passes.checkpoint import MANIFEST

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

WORKER = textwrap.dedent("""\
    import json, sys, torch
    sys.path.insert(0, sys.argv[1])
    torch.set_num_threads(1)
    import ptq
    from ptq import distributed
    from ptq.passes.gptq import GPTQPass
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from ptq.modules.linear import LinearMX

    model_path, recipe, out = sys.argv[2:5]
    hessians = {}
    original = GPTQPass._hessians

    def spy(self, layer, group, inputs, device, *streams):
        hs, cross = original(self, layer, group, inputs, device, *streams)
        for kind, terms in (("H", hs), ("C", cross)):
            for j, h in enumerate(terms.values()):
                hessians[f"layer{inputs.index}.{group[0][0]}.{kind}{j}"] = h.clone()
        return hs, cross

    GPTQPass._hessians = spy
    with distributed.process_group_from_env("cpu"):
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(model_path)
        model, info = ptq.quantize_module_transform_pass(model, recipe, tokenizer=tok, device="cpu", progress=False)
        if distributed.is_main():
            save_file({n: m.effective_weight().contiguous() for n, m in model.named_modules()
                       if isinstance(m, LinearMX)}, out + ".weights.safetensors")
            save_file(hessians, out + ".hessians.safetensors")
            g = info["gptq"]
            json.dump({k: g[k] for k in ("world_size", "tokens_per_rank", "computed", "loaded")}, open(out, "w"))
    """)


def recipe(tmp_path, name, checkpoint_dir, **extra):
    p = tmp_path / f"{name}.toml"
    p.write_text(gptq_recipe_text(checkpoint_dir, dataset="tinystories", nsamples=8, seqlen=32, cali_batch_size=2,
                                  act_order=True, clip_search_y=True, **extra))
    return p


def env(**extra):
    e = {k: v for k, v in os.environ.items() if k not in ("PTQ_TEST_KILL_AT", "WORLD_SIZE", "RANK", "LOCAL_RANK")}
    e.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)
    return e


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, nproc=2, **extra_env):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}",
           *map(str, args)]
    return subprocess.run(cmd, env=env(**extra_env), capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_two_ranks_match_one_process(tmp_path, stories260k_path, data_dir):
    from safetensors.torch import load_file

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    r = recipe(tmp_path, "r", None, asymmetric=0.5)  # the cross terms C are all-reduced like H
    one = subprocess.run([sys.executable, str(script), str(ROOT), str(stories260k_path), str(r),
                          str(tmp_path / "one.json")], env=env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(script, ROOT, stories260k_path, r, tmp_path / "two.json")
    assert two.returncode == 0, two.stderr[-3000:]

    i1, i2 = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert i1["world_size"] == 1 and i1["tokens_per_rank"] == [8 * 32]
    assert i2["world_size"] == 2 and i2["tokens_per_rank"] == [4 * 32, 4 * 32]
    assert i1["computed"] == i2["computed"] == [0, 1, 2, 3, 4]

    h1, h2 = (load_file(tmp_path / f"{n}.json.hessians.safetensors") for n in ("one", "two"))
    assert h1.keys() == h2.keys() and len(h1) == 5 * 4 * 2
    for k in h1:
        rel = float((h1[k] - h2[k]).norm() / h1[k].norm())
        assert rel <= 1e-5, (k, rel)
    w1, w2 = (load_file(tmp_path / f"{n}.json.weights.safetensors") for n in ("one", "two"))
    assert w1.keys() == w2.keys() and len(w1) == 35
    for k in w1:
        assert torch.equal(w1[k].view(torch.int32), w2[k].view(torch.int32)), k


def listed(ck):
    return [e["index"] for e in json.loads((ck / MANIFEST).read_text())["layers"]]


def test_dead_rank_fails_the_run_and_the_rerun_resumes(tmp_path, stories260k_path, data_dir):
    from safetensors.torch import load_file

    ck, clean_ck = tmp_path / "ck", tmp_path / "ck_clean"
    cli = ["-m", "ptq.cli", "quantize", "--model", stories260k_path, "--device", "cpu", "--no-progress"]
    killed = torchrun(*cli, "--recipe", recipe(tmp_path, "crashy", ck), PTQ_TEST_KILL_AT="mid_layer:2@1")
    assert killed.returncode != 0
    assert listed(ck) == [0, 1], killed.stderr[-3000:]
    resumed = torchrun(*cli, "--recipe", recipe(tmp_path, "crashy", ck), "--out", tmp_path / "out")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    info = json.loads((tmp_path / "out" / "info.json").read_text())["passes"]["gptq"]
    assert info["loaded"] == [0, 1] and info["computed"] == [2, 3, 4] and info["world_size"] == 2
    assert listed(ck) == [0, 1, 2, 3, 4]
    # the same checkpoints as an uninterrupted single-process run
    clean = subprocess.run([sys.executable, *map(str, cli), "--recipe", str(recipe(tmp_path, "clean", clean_ck))],
                           env=env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert clean.returncode == 0, clean.stderr[-3000:]
    for i in range(5):
        a, b = load_file(ck / f"layer_{i:03d}.safetensors"), load_file(clean_ck / f"layer_{i:03d}.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k].view(torch.int32), b[k].view(torch.int32)), (i, k)
