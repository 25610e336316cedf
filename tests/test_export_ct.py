"""compressed-tensors export (`ptq.export_ct`): transformers loads it without ptq, ptq loads it back exactly.

What is asserted, on stories260k (head_dim 8, hidden 64, intermediate 172) and a tiny random Llama:
- for MXFP4, NVFP4, MXINT4 and INT4 weights: ``AutoModelForCausalLM.from_pretrained(dir)`` in a subprocess that never
  imports ptq gives logits torch.equal to ptq's fake-quant model of the exported configuration (bf16 for the FP4
  formats: compressed-tensors 0.20.1 decompresses FP4 to bf16; fp32 for the integer ones), and the dequantized
  weights equal ptq's exactly (fp32 compare); stories260k's down_proj (172 inputs, no whole group) is stored dense;
- bits per weight of the compressed linears, read from the files: 4.25 for MXFP4 / MXINT4 (<= 4.3), 4.5 + the
  per-tensor global scale for NVFP4 (its E4M3 scale per 16 is 0.5 bit by definition);
- export -> ptq.load_model -> logits bit-identical to the model before export (also with KV-cache quantization and a
  rotation, which transformers cannot apply: a warning, the README, and a --strict error);
- NVFP4 activations: the transformers model deviates from ptq (static global scale, double-rounded block scales) by
  less than 0.75 x ptq's own quantization error (measured 0.64 on the tiny Llama);
- our int32 packing equals compressed-tensors' own; sharded files load; a failure mid-export leaves nothing behind.
"""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open

from families import tiny_model
from ptq.config import AttentionQuantConfig, LinearQuantConfig
from ptq.errors import PtqError
from ptq.export import export_quantized
from ptq.export_ct import SIDE_FILE, ExportIssue, load_compressed_tensors, pack_int32, unpack_int32
from ptq.formats import QuantSpec
from ptq.modules.packed import PackedLinear
from ptq.passes.swap import swap_modules

pytest.importorskip("compressed_tensors")

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FORMATS = {  # name -> (weight spec, model dtype)
    "mxfp4": (QuantSpec.mxfp("e2m1"), torch.bfloat16),
    "nvfp4": (QuantSpec.nvfp4(), torch.bfloat16),
    "mxint4": (QuantSpec.mxint(4), torch.float32),
    "int4": (QuantSpec.int_(4, 32), torch.float32),
}
PACKED_KEYS = ("weight_packed", "weight_scale", "weight_global_scale")


def _ids(vocab, n=2, t=24, seed=0):
    ids = torch.randint(3, vocab, (n, t), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = 1
    return ids


def _quantize(model, weight, data_in=None, kv=None):
    mapping = {n: LinearQuantConfig(weight=weight, data_in=data_in) for n, _ in model.named_modules()
               if n.endswith(LINEARS)}
    if kv is not None:
        mapping.update({n: AttentionQuantConfig(kv_cache=kv) for n, _ in model.named_modules()
                        if n.endswith("self_attn")})
    return swap_modules(model, mapping)


def _load_stories(path, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # loaded in the target dtype, as transformers loads the export (a .to(bf16) would also round RoPE's inv_freq)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval(), AutoTokenizer.from_pretrained(path)


HF_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    jobs = json.loads(sys.argv[1])
    for d, ids_file, out_file, layer in jobs:
        m = AutoModelForCausalLM.from_pretrained(d).eval()
        with torch.no_grad():
            logits = m(torch.load(ids_file)).logits
        torch.save({"logits": logits, "weight": m.get_submodule(layer).weight.detach()}, out_file)
    assert "ptq" not in sys.modules, "transformers imported ptq"
    print("ok", len(jobs))
""")


def _hf_load_all(jobs):
    """Load every exported directory with plain transformers in ONE subprocess that never imports ptq."""
    proc = subprocess.run([sys.executable, "-c", HF_SCRIPT, json.dumps(jobs)], capture_output=True, text=True,
                          timeout=300, env={k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(j[2]) for j in jobs]


def _packed_bits(directory, names):
    """(bytes of packed codes + scales (+ global scale) of ``names``, number of their weights), from the files."""
    nbytes = 0
    for f in directory.glob("model*.safetensors"):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                owner, _, local = k.rpartition(".")
                if owner in names and local in PACKED_KEYS:
                    t = fh.get_tensor(k)
                    nbytes += t.numel() * t.element_size()
    return nbytes


@pytest.fixture(scope="module")
def exports(tmp_path_factory, stories260k_path):
    """Every (model, format) exported weight-only, ptq's fake-quant logits, and what transformers loads."""
    root = tmp_path_factory.mktemp("ct")
    cases, jobs = {}, []
    for model_name in ("stories260k", "llama"):
        for fmt, (spec, dtype) in FORMATS.items():
            if model_name == "stories260k":
                model, tok = _load_stories(stories260k_path, dtype)
            else:
                model, tok = tiny_model("llama", dtype=dtype), None
            _quantize(model, spec)
            ids = _ids(model.config.vocab_size)
            with torch.no_grad():
                ref = model(ids).logits
            out = root / f"{model_name}-{fmt}"
            with pytest.warns(ExportIssue) if model_name == "stories260k" else _nothing():
                summary = export_quantized(model, out, tokenizer=tok, progress=False,
                                           max_shard_bytes=40_000 if fmt == "mxfp4" else None)
            layer = "model.layers.0.self_attn.q_proj"
            torch.save(ids, root / f"{model_name}-{fmt}.ids")
            jobs.append([str(out), str(root / f"{model_name}-{fmt}.ids"), str(root / f"{model_name}-{fmt}.hf"),
                         layer])
            cases[(model_name, fmt)] = dict(out=out, ids=ids, ref=ref, summary=summary, tok=tok,
                                            weight=model.get_submodule(layer).effective_weight().detach())
            del model
    for case, hf in zip(cases.values(), _hf_load_all(jobs)):
        case["hf"] = hf
    return cases


class _nothing:
    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("error", ExportIssue)

    def __exit__(self, *exc):
        self._w.__exit__(*exc)


CASES = [(m, f) for m in ("stories260k", "llama") for f in FORMATS]


@pytest.mark.parametrize("model_name,fmt", CASES)
def test_transformers_loads_the_export_without_ptq_and_matches(exports, model_name, fmt):
    c = exports[(model_name, fmt)]
    hf = c["hf"]
    assert hf["logits"].dtype == c["ref"].dtype == FORMATS[fmt][1]
    side = json.loads((c["out"] / SIDE_FILE).read_text())["linears"]
    off = sum(e.get("ct_weight_mismatches", 0) for e in side.values())
    if off == 0:
        assert torch.equal(hf["logits"], c["ref"])
        assert torch.equal(hf["weight"].float(), c["weight"].float())  # the dequantized weight, exactly
    else:
        # NVFP4 only: compressed-tensors divides by the stored 1/g where ptq multiplies by g, so some weights
        # land one bf16 step apart (counted at export, listed in the README); codes and scales are ptq's own
        assert fmt == "nvfp4" and "one bfloat16 rounding step apart" in (c["out"] / "README.md").read_text()
        w, ref_w = hf["weight"].float(), c["weight"].float()
        step = torch.finfo(torch.bfloat16).eps * ref_w.abs()
        assert ((w - ref_w).abs() <= step).all()
        rel = (hf["logits"].float() - c["ref"].float()).norm() / c["ref"].float().norm()
        print(f"{off} NVFP4 weights one bf16 step apart; relative logit difference {rel:.2e}")
        assert rel < 1e-2
    cfg = json.loads((c["out"] / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors"
    expected = {"mxfp4": "mxfp4-pack-quantized", "nvfp4": "nvfp4-pack-quantized", "mxint4": "pack-quantized",
                "int4": "pack-quantized"}[fmt]
    assert cfg["format"] == expected
    n_layers = 5 if model_name == "stories260k" else 2
    packed = c["summary"]["packed"]
    if model_name == "stories260k":  # down_proj has 172 inputs: no whole group, stored dense and listed
        assert len(packed) == 6 * n_layers and all("down_proj" in k for k in c["summary"]["kept"])
        assert "down_proj" in (c["out"] / "README.md").read_text()
    else:
        assert len(packed) == 7 * n_layers and c["summary"]["issues"] == []


@pytest.mark.parametrize("model_name,fmt", CASES)
def test_bits_per_weight_on_disk(exports, model_name, fmt):
    c = exports[(model_name, fmt)]
    packed = set(c["summary"]["packed"])
    n_weights = c["summary"]["packed_weights"]
    bits = 8 * _packed_bits(c["out"], packed) / n_weights
    assert bits == pytest.approx(c["summary"]["bits_per_weight"])
    if fmt in ("mxfp4", "mxint4"):
        assert bits == 4.25  # 4-bit codes + one 8-bit scale (E8M0 / exact E4M3 power of two) per 32
    elif fmt == "nvfp4":
        assert bits == pytest.approx(4.5 + 32 * len(packed) / n_weights)  # + one fp32 global scale per layer
    else:  # symmetric INT4, fp32 scales per group of 32
        assert bits == 5.0


@pytest.mark.parametrize("model_name,fmt", CASES)
def test_round_trip_through_ptq_is_exact(exports, model_name, fmt):
    from ptq.models import load_model

    c = exports[(model_name, fmt)]
    if c["tok"] is not None:
        model, tok = load_model(str(c["out"]))  # what `ptq eval --model DIR` does
        assert tok is not None
    else:
        model = load_compressed_tensors(c["out"])
    n_packed = sum(isinstance(m, PackedLinear) for m in model.modules())
    assert n_packed == (0 if fmt == "int4" else len(c["summary"]["packed"]))
    with torch.no_grad():
        assert torch.equal(model(c["ids"]).logits, c["ref"])


def test_sharded_files(exports):
    c = exports[("stories260k", "mxfp4")]
    assert len(c["summary"]["files"]) > 1 and (c["out"] / "model.safetensors.index.json").is_file()
    assert {"tokenizer.json", "generation_config.json", SIDE_FILE, "README.md"} <= {p.name for p in
                                                                                    c["out"].iterdir()}


def test_pack_int32_is_compressed_tensors_layout(gen):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    for bits in (2, 4, 8):
        lim = (1 << (bits - 1)) - 1
        codes = torch.randint(-lim, lim + 1, (5, 96), generator=gen).to(torch.int8)
        ours = pack_int32(codes, bits)
        assert torch.equal(ours, pack_to_int32(codes, bits))
        assert torch.equal(unpack_int32(ours, bits, 96), codes)
        assert torch.equal(unpack_from_int32(ours, bits, codes.shape), codes)


def test_nvfp4_activations_close_to_ptq(tmp_path):
    model = tiny_model("llama", dtype=torch.bfloat16)
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        plain = model(ids).logits.float()
    _quantize(model, QuantSpec.nvfp4(), data_in=QuantSpec.nvfp4())
    with torch.no_grad():
        ref = model(ids).logits
    with pytest.raises(PtqError, match="calibration"):
        export_quantized(model, tmp_path / "x", progress=False)
    with pytest.warns(ExportIssue, match="NVFP4 input global scale is static"):
        export_quantized(model, tmp_path / "e", progress=False, calibration=ids)
    assert torch.equal(load_compressed_tensors(tmp_path / "e")(ids).logits, ref)
    torch.save(ids, tmp_path / "ids")
    (hf,) = _hf_load_all([[str(tmp_path / "e"), str(tmp_path / "ids"), str(tmp_path / "hf"),
                           "model.layers.0.self_attn.q_proj"]])
    dev = (hf["logits"].float() - ref.float()).abs().mean().item()
    quant_err = (ref.float() - plain).abs().mean().item()
    print(f"mean |CT - ptq| {dev:.4g}, mean |ptq - unquantized| {quant_err:.4g}")
    assert dev < 0.75 * quant_err  # measured 0.64: CT's double-rounded block scales move a few % of blocks


def test_rotation_and_kv_cache_warn_strict_and_round_trip(tmp_path):
    from ptq.modules.rotation import HadamardRotation

    model = tiny_model("llama", dtype=torch.bfloat16)
    _quantize(model, QuantSpec.mxfp("e2m1"), kv=QuantSpec.mxint(4))
    model.model.layers[0].self_attn.o_proj.set_rotation(HadamardRotation(64, "block", 32))
    model.model.layers[1].mlp.down_proj.set_rotation(HadamardRotation(128), "activation_only")
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        ref = model(ids).logits
    with pytest.raises(PtqError, match="(?s)kv_cache.*rotation.*--strict"):
        export_quantized(model, tmp_path / "s", progress=False, strict=True)
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    with pytest.warns(ExportIssue, match="rotation"):
        summary = export_quantized(model, tmp_path / "e", progress=False)
    assert summary["kept"] == ["model.layers.0.self_attn.o_proj", "model.layers.1.mlp.down_proj"]
    readme = (tmp_path / "e" / "README.md").read_text()
    assert "kv_cache" in readme and "rotation" in readme
    back = load_compressed_tensors(tmp_path / "e")
    with torch.no_grad():
        assert torch.equal(back(ids).logits, ref)
    # transformers runs the weight-only equivalent (rotation folded, KV quantizer dropped): compare with ptq
    # without its KV quantizer, which that model approximates up to the folded weight's rounding
    torch.save(ids, tmp_path / "ids")
    (hf,) = _hf_load_all([[str(tmp_path / "e"), str(tmp_path / "ids"), str(tmp_path / "hf"),
                           "model.layers.0.self_attn.o_proj"]])
    for n, m in model.named_modules():
        if n.endswith("self_attn"):
            m.set_config(AttentionQuantConfig())
    with torch.no_grad():
        no_kv = model(ids).logits.float()
    assert (hf["logits"].float() - no_kv).abs().max() < 0.05 * no_kv.abs().max()


def test_failure_mid_export_leaves_nothing(tmp_path, monkeypatch):
    import ptq.io

    model = tiny_model("llama")
    _quantize(model, QuantSpec.mxint(4))

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ptq.io, "atomic_write_json", boom)
    with pytest.raises(OSError, match="disk full"):
        export_quantized(model, tmp_path / "e", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_default_is_compressed_tensors_and_strict_fails(stories260k_path, tmp_path):
    from pathlib import Path

    from ptq.cli import main

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "w4a4kv4.toml"
    base = ["export", "--model", str(stories260k_path), "--recipe", str(recipe), "--device", "cpu", "--dtype",
            "float32", "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "s"), "--strict"]) == 2
    assert not (tmp_path / "s").exists()
    with pytest.warns(ExportIssue):
        assert main(base + ["--out", str(tmp_path / "e")]) == 0
    assert json.loads((tmp_path / "e" / "config.json").read_text())["quantization_config"]["format"] == \
        "pack-quantized"


def test_moe_experts_are_listed_not_silently_dropped(tmp_path):
    """compressed-tensors has no experts writer here: the export says so, and --strict refuses it."""
    from pathlib import Path

    from ptq.passes.swap import swap_modules
    from ptq.recipe import load_recipe

    model = tiny_model("mixtral")
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "mxfp4.toml")
    swap_modules(model, recipe.resolve(model, strict=True))
    with pytest.warns(UserWarning, match="fused MoE experts"):
        summary = export_quantized(model, tmp_path / "a", progress=False)
    assert any("fused MoE experts" in i for i in summary["issues"])
    with pytest.raises(PtqError, match="fused MoE experts"):
        export_quantized(model, tmp_path / "b", progress=False, strict=True)
    assert not (tmp_path / "b").exists()
