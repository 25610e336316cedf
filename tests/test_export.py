"""Export with packed weights and reload (`ptq.export`, `ptq export`), on stories260k and a SmolLM2-shaped layer.

What is asserted:
- export -> load_quantized reproduces the fake-quant model's logits bit for bit in fp32 (torch backend), hence the
  same perplexity; packed layers, kept LinearMX layers, AttentionMX (KV cache) and rotations all survive the trip;
- bits per weight on disk (codes + scales bytes / weights, read from the file) <= 4.3 for MXFP4 with SmolLM2-135M's
  linear shapes (4.25 exactly: in_features are multiples of 32);
- ``ptq export`` from the CLI writes a directory that ``ptq.models.load_model`` (what ``ptq eval`` uses) loads;
- ``dtype=`` at load changes the compute dtype only; errors for an existing directory and a bad format version;
  no temporary directories are left behind.
"""

import json

import pytest
import torch
from safetensors import safe_open

from ptq.config import AttentionQuantConfig, LinearQuantConfig
from ptq.errors import PtqError
from ptq.export import QUANT_CONFIG, WEIGHTS, export_quantized, load_quantized
from ptq.formats import QuantSpec
from ptq.modules.linear import LinearMX
from ptq.modules.packed import PackedLinear, same_bits
from ptq.passes.swap import swap_modules

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MXFP4 = QuantSpec.mxfp("e2m1")


def _quantize(model, weight=MXFP4, kv=True, keep_one_unpacked=False, rotate=True):
    mapping = {}
    for n, _ in model.named_modules():
        if n.endswith(LINEARS):
            mapping[n] = LinearQuantConfig(weight=weight, data_in=QuantSpec.mxint(8))
        if kv and n.endswith("self_attn"):
            mapping[n] = AttentionQuantConfig(kv_cache=QuantSpec.mxint(4))
    if keep_one_unpacked:  # mx6 weights have no packed form: the layer stays a LinearMX
        mapping["model.layers.1.mlp.up_proj"] = LinearQuantConfig(weight=QuantSpec.mx6(), data_in=None)
    swap_modules(model, mapping)
    if rotate:
        from ptq.modules.rotation import HadamardRotation

        model.model.layers[0].self_attn.o_proj.set_rotation(HadamardRotation(64))
        model.model.layers[2].mlp.gate_proj.set_rotation(HadamardRotation(64), "activation_only")
    return model


def _ids(n=2, t=48, seed=0):
    ids = torch.randint(2, 512, (n, t), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = 1
    return ids


def _packed_bits(directory, names):
    """(bytes of codes + scales (+ global scales), number of weights) of the packed layers, read from the file."""
    nbytes = 0
    with safe_open(str(directory / WEIGHTS), framework="pt") as f:
        keys = set(f.keys())
        for n in names:
            for part in ("qweight", "scales", "global_scale"):
                if f"{n}.{part}" in keys:
                    t = f.get_tensor(f"{n}.{part}")
                    nbytes += t.numel() * t.element_size()
    return nbytes


def test_export_reload_reproduces_logits_and_perplexity(stories260k, tmp_path, data_dir):
    from ptq.eval import evaluate_perplexity

    model, tok = stories260k
    _quantize(model, keep_one_unpacked=True)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    out = tmp_path / "exp"
    summary = export_quantized(model, out, tokenizer=tok, progress=False, format="ptq")
    assert summary["kept"] == ["model.layers.1.mlp.up_proj"] and len(summary["packed"]) == 5 * 7 - 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]  # no temporary directory left
    assert {"config.json", QUANT_CONFIG, WEIGHTS}.issubset({p.name for p in out.iterdir()})

    loaded = load_quantized(out, backend="torch")
    packed = {n for n, m in loaded.named_modules() if isinstance(m, PackedLinear)}
    assert packed == set(summary["packed"])
    assert isinstance(loaded.get_submodule("model.layers.1.mlp.up_proj"), LinearMX)
    attn = loaded.model.layers[3].self_attn
    assert attn.cfg.kv_cache == QuantSpec.mxint(4)
    o_proj = loaded.model.layers[0].self_attn.o_proj
    assert o_proj.rotation is not None and o_proj.rotation_mode == "matched"
    assert loaded.model.layers[2].mlp.gate_proj.rotation_mode == "activation_only"
    with torch.no_grad():
        got = loaded(ids).logits
    assert same_bits(got, ref)

    kw = dict(source="tinystories", split="validation", seqlen=64, batch_size=4, max_windows=4, bos_id=1,
              progress=False)
    assert evaluate_perplexity(loaded, tok, **kw)["ppl"] == evaluate_perplexity(model, tok, **kw)["ppl"]


def test_bits_per_weight_on_disk_smollm2_shapes(tmp_path):
    """One decoder layer with SmolLM2-135M's linear shapes (hidden 576, intermediate 1536, 9 heads, 3 KV heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=1, num_attention_heads=9,
                      num_key_value_heads=3, head_dim=64, vocab_size=256, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    _quantize(model, kv=False, rotate=False)
    out = tmp_path / "smol"
    summary = export_quantized(model, out, progress=False, format="ptq")
    n_weights = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, LinearMX))
    assert summary["packed_weights"] == n_weights == 576 * 576 * 2 + 192 * 576 * 2 + 1536 * 576 * 3
    bits = 8 * _packed_bits(out, summary["packed"]) / n_weights
    assert bits == pytest.approx(4.25) and bits <= 4.3
    assert summary["bits_per_weight"] == pytest.approx(bits)
    # the file as a whole: the packed layers plus an fp32 embedding / norms
    other = sum(p.numel() * 4 for n, p in model.named_parameters() if "embed" in n or "norm" in n)
    assert (out / WEIGHTS).stat().st_size < (n_weights * 4.25 / 8 + other) * 1.01 + 4096


def test_bits_per_weight_stories260k_counts_padding(stories260k, tmp_path):
    """stories260k's down_proj has in_features 172, padded to 192 (6 blocks of 32): the file holds the padding."""
    model, _ = stories260k
    _quantize(model, kv=False, rotate=False)
    summary = export_quantized(model, tmp_path / "e", progress=False, format="ptq")
    nbytes = _packed_bits(tmp_path / "e", summary["packed"])
    expect = 0
    for n in summary["packed"]:
        m = model.get_submodule(n)
        kp = -(-m.in_features // 32) * 32
        expect += m.out_features * (kp // 2 + kp // 32)
    assert nbytes == expect


def test_cli_export_then_load_model_and_eval(stories260k_path, tmp_path, data_dir):
    from ptq.cli import main
    from ptq.models import load_model
    from ptq.passes.pipeline import quantize_module_transform_pass
    from ptq.recipe import load_recipe
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "mxfp4.toml"
    out = tmp_path / "cli"
    argv = ["export", "--model", str(stories260k_path), "--recipe", str(recipe), "--out", str(out), "--device", "cpu",
            "--dtype", "float32", "--no-progress", "--format", "ptq"]
    assert main(argv) == 0
    assert main(argv) == 2  # exists: refused without --overwrite
    assert main(argv + ["--overwrite"]) == 0
    loaded, tok = load_model(str(out), dtype="float32")
    assert tok is not None
    assert sum(isinstance(m, PackedLinear) for m in loaded.modules()) == 35
    fq, _ = load_model(str(stories260k_path), dtype="float32")
    fq, _ = quantize_module_transform_pass(fq, load_recipe(recipe), progress=False, device="cpu")
    ids = _ids(seed=3)
    with torch.no_grad():
        assert same_bits(loaded(ids).logits, fq(ids).logits)

    # `ptq eval` on the exported directory == `ptq eval` of the fake-quant model (same recipe)
    ev = ["eval", "--source", "tinystories", "--split", "validation", "--seqlen", "64", "--max-windows", "2",
          "--device", "cpu", "--no-progress"]
    assert main(ev + ["--model", str(out), "--json", str(tmp_path / "a.json")]) == 0
    fq_args = ["--model", str(stories260k_path), "--recipe", str(recipe), "--json", str(tmp_path / "b.json")]
    assert main(ev + fq_args) == 0
    ppl = [json.loads((tmp_path / f).read_text())["perplexity"]["ppl"] for f in ("a.json", "b.json")]
    assert ppl[0] == ppl[1]


def test_load_dtype_changes_compute_dtype_only(stories260k, tmp_path):
    model, _ = stories260k
    _quantize(model, weight=QuantSpec.nvfp4(), kv=False, rotate=False)
    export_quantized(model, tmp_path / "e", progress=False, format="ptq")
    a = load_quantized(tmp_path / "e")
    b = load_quantized(tmp_path / "e", dtype=torch.bfloat16)
    for (n, ma), mb in zip(a.named_modules(), b.modules()):
        if isinstance(ma, PackedLinear):
            for k in ("qweight", "scales", "global_scale"):
                assert same_bits(getattr(ma, k), getattr(mb, k)), (n, k)
    assert b.model.embed_tokens.weight.dtype == torch.bfloat16
    ids = _ids(seed=4)
    with torch.no_grad():
        lb = b(ids).logits
        la = a.to(torch.bfloat16)(ids).logits  # casting after loading is the same model
    assert lb.dtype == torch.bfloat16 and same_bits(la, lb)


def test_bad_exports_are_refused(stories260k, tmp_path):
    model, _ = stories260k
    _quantize(model, kv=False, rotate=False)
    out = tmp_path / "e"
    export_quantized(model, out, progress=False, format="ptq")
    with pytest.raises(PtqError, match="already exists"):
        export_quantized(model, out, progress=False, format="ptq")
    export_quantized(model, out, overwrite=True, progress=False, format="ptq")
    qcfg = json.loads((out / QUANT_CONFIG).read_text())
    qcfg["format_version"] = 99
    (out / QUANT_CONFIG).write_text(json.dumps(qcfg))
    with pytest.raises(PtqError, match="format_version"):
        load_quantized(out)
    with pytest.raises(PtqError, match="not a directory written by ptq export"):
        load_quantized(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]
