"""Layer-by-layer GPTQ (issue 17): a meta-device skeleton whose decoder layers are read from the safetensors shards
one at a time and written to the checkpoint store instead of being kept.

- Same checkpoint files, bit for bit, as the whole-model run (stories260k, through ``ptq quantize --layer-by-layer
  on``), and the fingerprint is the same in both modes, so either resumes the other.
- Peak memory of a GPTQ run on a sharded model with 8 large decoder layers stays below 3 layers' worth. Measured as
  the growth of the process's peak RSS (VmHWM, reset through /proc/self/clear_refs just before the pass) in a fresh
  interpreter, with glibc's mmap threshold pinned (MALLOC_MMAP_THRESHOLD_) so that freed tensors go back to the OS
  instead of staying in the heap: RSS then follows the live tensors, and its noise (a few MB) is small next to one
  layer (38 MB). Real RSS rather than counted tensor bytes, so nothing that holds memory can hide. The work device is
  the CPU here, so the solver's working memory (a few copies of the matrix being solved, which lives on the GPU in a
  real run) is in the measure too: GPTQ quantizes o_proj only (the other linears are RTN), so that working set is
  small next to a layer and the bound tests what this mode controls, that finished layers are not kept. The same
  script shows the measure can fail: holding every layer grows the peak by ~8 layers.
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

ROOT = Path(__file__).resolve().parents[1]

TEXTS = ["Once upon a time there was a little girl named Lily. She liked to play in the park with her dog.",
         "Tom had a big red ball. He threw it to his friend Sam, and they laughed all day in the sun."] * 4


def recipe(tmp_path, name, checkpoint_dir, **extra):
    p = tmp_path / f"{name}.toml"
    p.write_text(gptq_recipe_text(checkpoint_dir, dataset=TEXTS, nsamples=4, seqlen=16, cali_batch_size=2,
                                  **extra))
    return p


def o_proj_recipe(tmp_path, checkpoint_dir):
    """GPTQ on o_proj only; every other module stays as it is."""
    p = tmp_path / "o_proj.toml"
    settings = {"dataset": TEXTS, "nsamples": 4, "seqlen": 16, "cali_batch_size": 2}
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in settings.items())
    p.write_text(f"[gptq]\n{lines}\ncheckpoint_dir = {json.dumps(str(checkpoint_dir))}\n" + textwrap.dedent("""\
        [gptq.weight_config]
        weight_block_size = 32
        weight_width = 4
        ['model\\.layers\\.\\d+\\.self_attn\\.o_proj']
        name = "mxint"
        weight_width = 4
        weight_block_size = 32
        gptq = true
        """))
    return p


def layer_files(ck):
    from safetensors.torch import load_file

    return [load_file(f) for f in sorted(Path(ck).glob("layer_*.safetensors"))]


@pytest.mark.parametrize("asymmetric", [0.0, 0.5])
def test_layer_by_layer_equals_whole_model(tmp_path, stories260k_path, monkeypatch, asymmetric):
    from ptq.cli import main

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cli = ["quantize", "--model", str(stories260k_path), "--device", "cpu", "--no-progress", "--dtype", "float32"]
    lazy_r = recipe(tmp_path, "lazy", tmp_path / "ck_lazy", asymmetric=asymmetric)
    full_r = recipe(tmp_path, "full", tmp_path / "ck_full", asymmetric=asymmetric)
    assert main(cli + ["--recipe", str(lazy_r), "--layer-by-layer", "on", "--out", str(tmp_path / "out")]) == 0
    assert main(cli + ["--recipe", str(full_r), "--layer-by-layer", "off"]) == 0
    info = json.loads((tmp_path / "out" / "info.json").read_text())["passes"]["gptq"]
    assert info["layer_by_layer"] is True and info["computed"] == [0, 1, 2, 3, 4]
    assert not (tmp_path / "out" / "model.safetensors").exists()  # never whole in memory: results are the checkpoints
    lazy, full = layer_files(tmp_path / "ck_lazy"), layer_files(tmp_path / "ck_full")
    assert len(lazy) == len(full) == 5
    for a, b in zip(lazy, full):
        assert a.keys() == b.keys() and len(a) == 7
        for k in a:
            assert torch.equal(a[k].view(torch.int32), b[k].view(torch.int32)), k
    man = [json.loads((tmp_path / d / "manifest.json").read_text())["fingerprint"] for d in ("ck_lazy", "ck_full")]
    assert man[0]["model"] == man[1]["model"]  # so a whole-model run resumes a layer-by-layer one and vice versa


def test_skeleton_without_checkpoint_dir_is_refused(tmp_path, stories260k_path):
    import ptq
    from ptq.errors import PtqError
    from ptq.layerwise import load_skeleton
    from ptq.passes.base import PassContext

    model, tok, weights = load_skeleton(stories260k_path, dtype="float32")
    assert all(p.is_meta for p in model.model.layers.parameters())
    r = recipe(tmp_path, "r", tmp_path / "ck").read_text().replace(f'checkpoint_dir = "{tmp_path / "ck"}"', "")
    with pytest.raises(PtqError, match="checkpoint_dir must be set"):
        ptq.quantize_module_transform_pass(model, r, ctx=PassContext(tokenizer=tok, device="cpu", progress=False,
                                                                     weights=weights))
    with pytest.raises(ptq.errors.ModelError, match="meta device"):
        ptq.quantize_module_transform_pass(model, recipe(tmp_path, "r2", tmp_path / "ck2"), tokenizer=tok,
                                           device="cpu", progress=False)


MEASURE = textwrap.dedent("""\
    import json, os, sys, torch
    sys.path.insert(0, sys.argv[1])
    torch.set_num_threads(1)
    model_dir, recipe = sys.argv[2], sys.argv[3]

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    import ptq
    from ptq.layerwise import load_skeleton
    from ptq.passes.base import PassContext
    from ptq.passes.gptq import find_decoder_layers
    model, tok, weights = load_skeleton(model_dir)
    base = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    model, info = ptq.quantize_module_transform_pass(
        model, recipe, ctx=PassContext(tokenizer=tok, device="cpu", progress=False, weights=weights))
    lazy_peak = status("VmHWM") - base
    path, layers = find_decoder_layers(model)
    before = status("VmRSS")
    for i, layer in enumerate(layers):  # keep every layer, as whole-model mode does
        weights.load_into(layer, f"{path}.{i}.", "cpu")
        touched = sum(float(p.sum()) for p in layer.parameters())  # safetensors maps lazily: read the pages
    full_growth = status("VmRSS") - before
    print(json.dumps({"lazy_peak": lazy_peak, "full_growth": full_growth, "computed": info["gptq"]["computed"]}))
    """)


@pytest.mark.slow
def test_peak_memory_stays_below_three_layers(tmp_path, stories260k_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to reset the peak RSS")
    hidden, layers = 768, 8
    cfg = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    layer_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir, max_shard_size="40MB")
    AutoTokenizer.from_pretrained(stories260k_path).save_pretrained(model_dir)
    assert len(list(model_dir.glob("*.safetensors"))) > 2  # really sharded
    del model
    script = tmp_path / "measure.py"
    script.write_text(MEASURE)
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    r = subprocess.run([sys.executable, str(script), str(ROOT), str(model_dir),
                        str(o_proj_recipe(tmp_path, tmp_path / "ck"))], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["computed"] == list(range(layers))
    assert got["full_growth"] > 0.9 * layers * layer_bytes, got  # the measure sees weights
    assert got["lazy_peak"] < 3 * layer_bytes, (got, layer_bytes)
    print(f"peak RSS growth {got['lazy_peak'] / layer_bytes:.2f} layers; holding every layer: "
          f"{got['full_growth'] / layer_bytes:.2f} layers (one layer = {layer_bytes / 2**20:.1f} MiB)")
