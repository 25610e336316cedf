"""The GPTQ pass on stories260k (CPU): quality vs RTN, crash safety (SIGKILL + resume), refusal of stale checkpoints.

Crash points come from the documented test hook ``PTQ_TEST_KILL_AT=<point>:<layer>`` (ptq/passes/checkpoint.py).
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gptq_recipe import gptq_recipe_text

from ptq.errors import CheckpointError, PtqError
from ptq.passes.checkpoint import MANIFEST, layer_file

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def recipe_text(checkpoint_dir, **gptq):
    return gptq_recipe_text(checkpoint_dir, **{"dataset": "tinystories", "nsamples": 6, "seqlen": 48,
                                               "cali_batch_size": 4, "quantile_search": True, **gptq})


def write_recipe(tmp_path, name, checkpoint_dir, **gptq):
    p = tmp_path / f"{name}.toml"
    p.write_text(recipe_text(checkpoint_dir, **gptq))
    return p


def quantize(model_path, recipe_path, **kw):
    import ptq
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_path)
    model, info = ptq.quantize_module_transform_pass(model, recipe_path, tokenizer=tok, device="cpu",
                                                     progress=False, **kw)
    return model, tok, info


def effective_weights(model):
    from ptq.modules.linear import LinearMX

    return {n: m.effective_weight().detach().clone() for n, m in model.named_modules() if isinstance(m, LinearMX)}


WORKER = textwrap.dedent("""\
    import json, sys, torch
    sys.path.insert(0, sys.argv[1])
    import ptq
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from ptq.modules.linear import LinearMX
    model_path = sys.argv[2]
    for recipe, out in zip(sys.argv[3::2], sys.argv[4::2]):
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(model_path)
        model, info = ptq.quantize_module_transform_pass(model, recipe, tokenizer=tok, device="cpu", progress=False)
        save_file({n: m.effective_weight().contiguous() for n, m in model.named_modules()
                   if isinstance(m, LinearMX)}, out)
        g = info["gptq"]
        print(json.dumps({"loaded": g["loaded"], "computed": g["computed"]}))
    """)


def run_worker(tmp_path, model_path, pairs, kill_at=None):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {k: v for k, v in os.environ.items() if k != "PTQ_TEST_KILL_AT"}
    if kill_at:
        env["PTQ_TEST_KILL_AT"] = kill_at
    env["OMP_NUM_THREADS"] = "1"  # tiny ops: threads only add contention (results are compared within one setting)
    args = [sys.executable, str(script), str(ROOT), str(model_path)]
    for recipe, out in pairs:
        args += [str(recipe), str(out)]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)


def listed_layers(ck):
    return [e["index"] for e in json.loads((ck / MANIFEST).read_text())["layers"]]


def test_sigkill_then_resume_is_bit_identical(tmp_path, stories260k_path, data_dir):
    from safetensors.torch import load_file

    ck = tmp_path / "ck"
    crashy = write_recipe(tmp_path, "crashy", ck)
    clean = write_recipe(tmp_path, "clean", tmp_path / "ck_clean")

    # 1) killed between layer 1's file rename and the manifest update: that file must not be trusted
    r = run_worker(tmp_path, stories260k_path, [(crashy, tmp_path / "a.safetensors")], kill_at="after_layer_file:1")
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert listed_layers(ck) == [0] and (ck / layer_file(1)).is_file()

    # 2) resumed, then killed in the middle of layer 3 (after its first group was quantized)
    r = run_worker(tmp_path, stories260k_path, [(crashy, tmp_path / "b.safetensors")], kill_at="mid_layer:3")
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert listed_layers(ck) == [0, 1, 2]
    assert not (ck / layer_file(3)).exists()

    # 3) resumed to the end; and, in the same process, an uninterrupted run in another directory
    r = run_worker(tmp_path, stories260k_path, [(crashy, tmp_path / "resumed.safetensors"),
                                               (clean, tmp_path / "clean.safetensors")])
    assert r.returncode == 0, r.stderr[-3000:]
    resumed_info, clean_info = [json.loads(line) for line in r.stdout.strip().splitlines()[-2:]]
    assert resumed_info == {"loaded": [0, 1, 2], "computed": [3, 4]}
    assert clean_info == {"loaded": [], "computed": [0, 1, 2, 3, 4]}
    a, b = load_file(tmp_path / "resumed.safetensors"), load_file(tmp_path / "clean.safetensors")
    assert a.keys() == b.keys() and len(a) == 35
    for k in a:
        assert torch.equal(a[k].view(torch.int32), b[k].view(torch.int32)), k
    assert listed_layers(ck) == [0, 1, 2, 3, 4]


def test_gptq_beats_rtn_and_resume_and_refusals(tmp_path, stories260k_path, data_dir):
    """One finished run, then: full resume (nothing recomputed, same weights), GPTQ quality vs RTN, and the
    refusals of another recipe, another model, resume=False."""
    import ptq
    from ptq.data import eval_windows, load_text, tokenize

    ck = tmp_path / "ck"
    recipe = write_recipe(tmp_path, "r", ck)
    model, tok, info = quantize(stories260k_path, recipe)
    assert info["gptq"]["computed"] == [0, 1, 2, 3, 4] and info["gptq"]["modules"] == 35
    gptq_w = effective_weights(model)
    for name, w in gptq_w.items():  # every GPTQ weight is a valid MXINT4 tensor
        assert torch.equal(ptq.fake_quantize(w, ptq.QuantSpec.mxint(4)), w), name

    again, _, info2 = quantize(stories260k_path, recipe)
    assert info2["gptq"]["loaded"] == [0, 1, 2, 3, 4] and info2["gptq"]["computed"] == []
    for name, w in effective_weights(again).items():
        assert torch.equal(w, gptq_w[name])

    # quality: on held-out text (validation stories not used for calibration windows... any text works as a check
    # that GPTQ's layer-wise objective transfers), GPTQ's perplexity is below RTN's
    rtn_recipe = ROOT / "recipes" / "w4a4kv4.toml"
    rtn, _, _ = quantize(stories260k_path, rtn_recipe)
    toks = tokenize(tok, load_text("tinystories", data_dir=str(data_dir))[-60000:])
    windows = eval_windows(toks, 128, bos_id=1)[:12]

    def ppl(m):
        with torch.no_grad():
            out = m(input_ids=windows, labels=windows)
        return float(torch.exp(out.loss))

    assert ppl(model) < ppl(rtn), (ppl(model), ppl(rtn))

    other = write_recipe(tmp_path, "other", ck, percdamp=0.05)
    with pytest.raises(CheckpointError, match="recipe.*percdamp"):
        quantize(stories260k_path, other)

    from transformers import AutoModelForCausalLM

    changed = AutoModelForCausalLM.from_pretrained(stories260k_path, dtype=torch.float32).eval()
    with torch.no_grad():
        changed.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    with pytest.raises(CheckpointError, match="different model"):
        ptq.quantize_module_transform_pass(changed, recipe, tokenizer=tok, device="cpu", progress=False)

    with pytest.raises(CheckpointError, match="resuming is off"):
        quantize(stories260k_path, recipe, resume=False)


def test_no_checkpoint_dir_and_act_order_output_clip(tmp_path, stories260k_path, data_dir, monkeypatch):
    from ptq.passes.gptq import GPTQPass

    seen = []
    original = GPTQPass._groups

    def spy(self, *args, **kwargs):
        groups = original(self, *args, **kwargs)
        seen.append([[name for name, _ in g] for g in groups])
        return groups

    monkeypatch.setattr(GPTQPass, "_groups", spy)
    recipe = write_recipe(tmp_path, "plain", None, act_order=True, clip_search_y=True, nsamples=4)
    model, _, info = quantize(stories260k_path, recipe)
    # true-sequential groups, in execution order, found from shared inputs
    assert seen == [[["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                     ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]] * 5
    g = info["gptq"]
    assert g["checkpoint_dir"] is None and g["clip_search"] == "output" and g["computed"] == [0, 1, 2, 3, 4]
    assert all(v >= 0 for v in g["proxy_loss"].values()) and len(g["proxy_loss"]) == 35
    assert not any(tmp_path.glob("**/manifest.json"))


def test_missing_tokenizer_is_a_clear_error(tmp_path, stories260k_path, data_dir):
    import ptq
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(stories260k_path, dtype=torch.float32).eval()
    model.config._name_or_path = str(tmp_path / "nowhere")
    with pytest.raises(PtqError, match="tokenizer"):
        ptq.quantize_module_transform_pass(model, write_recipe(tmp_path, "t", None), device="cpu", progress=False)


def test_gptq_outside_decoder_layers_is_refused(tmp_path, stories260k_path, data_dir):
    p = tmp_path / "lm_head.toml"
    p.write_text(recipe_text(None) + "['lm_head']\nname = \"mxint\"\nweight_width = 4\ngptq = true\n")
    from ptq.errors import ModelError

    with pytest.raises(ModelError, match="lm_head"):
        quantize(stories260k_path, p)


@pytest.mark.gpu
def test_cuda_pass_moves_one_layer_at_a_time(tmp_path, stories260k_path, data_dir):
    import ptq
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(stories260k_path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(stories260k_path)
    seen = []
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(lambda m, a, i=i: seen.append(
            (i, sum(p.is_cuda for layer in model.model.layers for p in layer.parameters()))))
    model, info = ptq.quantize_module_transform_pass(model, write_recipe(tmp_path, "g", tmp_path / "ck"),
                                                     tokenizer=tok, device="cuda", progress=False)
    per_layer = len(list(model.model.layers[0].parameters()))
    assert seen and all(n <= per_layer for _, n in seen)  # never more than one layer on the GPU
    left = [n for n, p in model.named_parameters() if p.is_cuda]
    assert not left, f"left on the GPU: {left}"  # everything back where it was
    assert info["gptq"]["computed"] == [0, 1, 2, 3, 4] and info["gptq"]["peak_gpu_memory_bytes"] > 0
    for name, w in effective_weights(model).items():
        assert torch.equal(ptq.fake_quantize(w, ptq.QuantSpec.mxint(4), backend="torch"), w), name


@pytest.mark.parametrize("base", ["nvfp4.toml", "mx6.toml"])
def test_other_weight_families_run_through_the_pass(tmp_path, stories260k_path, data_dir, base):
    sel = "layers\\.\\d+\\.(q|k|v|qkv|o|gate|up|gate_up|down|experts)"
    p = tmp_path / "r.toml"
    p.write_text(f"extends = {json.dumps(str(ROOT / 'recipes' / base))}\n[gptq]\ndataset = \"tinystories\"\n"
                 f"nsamples = 4\nseqlen = 32\nclip_search_y = true\n['{sel}']\ngptq = true\n")
    model, _, info = quantize(stories260k_path, p)
    assert info["gptq"]["computed"] == [0, 1, 2, 3, 4] and info["gptq"]["modules"] == 35
    rtn, _, _ = quantize(stories260k_path, ROOT / "recipes" / base)
    got, want = effective_weights(model), effective_weights(rtn)
    assert got.keys() == want.keys()
    for k in got:
        assert torch.isfinite(got[k]).all() and not torch.equal(got[k], want[k]), k
