"""ptq against its peers: llm-compressor and AMD Quark on the same model, calibration tokens and evaluation windows.

    PYTHONPATH=. python bench/peers.py --cpu-smoke                      # stories260k on this CPU (a few minutes)
    PYTHONPATH=. python bench/peers.py --quick --llmcompressor-python V/bin/python --quark-python Q/bin/python
                                                                        # SmolLM2-135M, CPU, quick budget (~1 h)
    PYTHONPATH=. python bench/peers.py --model DIR --device cuda --dtype bfloat16 \\
        [--llmcompressor-python /path/venv/bin/python] [--quark-python ...] [--out bench-peers]

Rows, for each format (NVFP4 W4A4 and MXFP4 W4A4, weights and linear-layer inputs):

- ptq: the shipped format recipe (recipes/nvfp4.toml, recipes/mxfp4.toml) with [gptq] added (the algorithm settings
  of recipes/w4a4kv4_gptq.toml, asymmetric calibration included), alone and after the
  online Hadamard search ([rotation_search], block-diagonal with the format's block, scoring each candidate on the
  first ``--search-windows`` (default 8) of the same calibration windows: every candidate costs a forward over
  them, and 32 x 512 tokens per candidate took over an hour on 2 CPU cores); for MXFP4 also the latter with
  ``data_in_scale_rule = "ceil"`` (activation scales that never clip: the OCP rule saturates a block's largest
  inputs, up to 25% of their value with E2M1's maximum of 6, and the A4-only rows measured 63.6 with it against 54.9
  with ceil on SmolLM2's quick budget).
- llm-compressor: GPTQModifier with the preset scheme (NVFP4 / MXFP4), alone, after QuIPModifier (Hadamard
  incoherence) and after SpinQuantModifier (R1 + R2 Hadamards).
- AMD Quark: LLMTemplate scheme (nvfp4 / mxfp4) with algorithm gptq, and rotation + gptq.

Every tool runs in a worker process (``--worker``) with its own Python (a peer and ptq need not install into one
environment: llm-compressor pins another compressed-tensors than ptq's export). The orchestrator writes the
calibration token ids (``ptq.data.calibration_windows``, the windows ptq's GPTQ uses) and the evaluation windows
(``ptq.data.eval_windows``) to one file, and every worker quantizes with exactly those ids and measures perplexity on
exactly those windows with the same loop. A tool that cannot be imported is a row saying so ("skipped: ..."), never
a silent omission; a tool that fails says how.

Checks, per row (tool-agnostic, on the module the tool leaves in the model):
- weights on the grid: the effective weight of every quantized linear, split into blocks (32 for MXFP4, 16 for NVFP4)
  along in_features, lies on E2M1 times one scale per block (a power of two for MXFP4, any positive scale for NVFP4);
  the fraction of blocks on the grid is reported, and the row is marked when it is below 99.9%.
- activations quantized: with weights on the grid, a quantized linear's output on random inputs differs from
  ``F.linear(x, W_eff)``; a tool whose linears compute that plain product did not quantize its inputs.

Peers are an optional extra (``pip install -e .[peers]``), never a runtime dependency of ptq.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ("nvfp4", "mxfp4")
VARIANTS = {"ptq": ("gptq", "rotation+gptq", "ceil+rotation+gptq"), "llmcompressor": ("gptq", "quip+gptq", "spinquant+gptq"),
            "quark": ("gptq", "rotation+gptq")}
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
BLOCK = {"nvfp4": 16, "mxfp4": 32}
CEIL_FORMATS = ("mxfp4",)  # power-of-two scales: the scale rule is a choice (NVFP4's E4M3 scales have none)


# ---------------------------------------------------------------------------------------------- checks
def on_grid_fraction(w, fmt: str) -> float:
    """Fraction of the blocks of ``w`` [out, in] (along in) that are E2M1 values times one scale per block."""
    import torch

    b = BLOCK[fmt]
    w = w.detach().float().cpu()
    if w.shape[1] % b:
        w = torch.nn.functional.pad(w, (0, b - w.shape[1] % b))
    blocks = w.reshape(-1, b).abs()
    amax = blocks.amax(1, keepdim=True)
    grid = torch.tensor(E2M1)
    ok = amax.squeeze(1) == 0
    if fmt == "mxfp4":  # power-of-two scales: try the OCP scale and its neighbours
        k0 = torch.floor(torch.log2(amax.clamp_min(1e-38))) - 2
        scales = [torch.exp2(k0 + d) for d in (-1, 0, 1)]
        tol = 1e-6
    else:  # any positive scale: the block maximum lands on one of the grid values
        scales = [amax / g for g in E2M1[1:]]
        tol = 5e-3  # the tool's scale (fp8 times an fp32 global) and the weight's own dtype round
    for s in scales:
        q = blocks / s
        err = (q[..., None] - grid).abs().amin(-1)
        ok |= (err <= tol * q.clamp_min(1)).all(1)
    return ok.float().mean().item()


def activation_quantized(mod, w_eff, n: int = 4) -> bool:
    """Whether ``mod`` quantizes its input: its output differs from the plain product with its effective weight."""
    import torch
    import torch.nn.functional as F

    p = next(mod.parameters())
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(n, w_eff.shape[1], generator=g) * 2).to(p.device, p.dtype)
    with torch.no_grad():
        y = mod(x).float()
        plain = F.linear(x.float(), w_eff.float().to(x.device),
                         mod.bias.float() if getattr(mod, "bias", None) is not None else None)
    return ((y - plain).norm() / plain.norm().clamp_min(1e-30)).item() > 1e-3


# ---------------------------------------------------------------------------------------------- workers
def perplexity(model, windows, batch: int, device) -> float:
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, windows.shape[0], batch):
            ids = windows[s:s + batch].to(device)
            logits = model(input_ids=ids).logits.float()
            total += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                     reduction="sum").item()
            count += ids[:, 1:].numel()
    return math.exp(total / count)


def _load(model_path, dtype, device):
    import torch
    from transformers import AutoModelForCausalLM

    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=dt).to(device).eval()


def _targets(model):
    import torch

    return [(n, m) for n, m in model.named_modules()
            if n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
            and any(isinstance(p, torch.Tensor) for p in m.parameters(recurse=False))]


def run_ptq(model, data, fmt, variant, args):
    import re

    from transformers import AutoTokenizer

    from ptq.architectures import architecture
    from ptq.passes.pipeline import quantize_module_transform_pass
    from ptq.recipe import load_recipe, recipe_to_dict

    shipped = recipe_to_dict(load_recipe(ROOT / "recipes" / f"{fmt}.toml"))
    recipe: dict = {"by": shipped.pop("by")}
    assert recipe["by"] == "role", "the shipped format recipes select by role path"
    arch = architecture(model)
    ignored = [f"layers.{arch.layer_of(n)}.{arch.role_of(n)}" for n in data["ignore"][fmt]]
    if ignored:  # first match wins: the exceptions go first (role paths: the recipes select by role)
        recipe["|".join(re.escape(n) for n in ignored)] = {"bypass": True}
    for key, table in shipped.items():
        recipe[key] = {**table, "gptq": True}
        if variant.startswith("ceil"):  # activation scales that never clip (the weights' come from GPTQ's search)
            recipe[key]["data_in_scale_rule"] = "ceil"
    recipe["gptq"] = {"dataset": [data["calib_text"]], "nsamples": data["calib"].shape[0],
                      "seqlen": data["calib"].shape[1], "cali_batch_size": args.batch, **ptq_gptq_settings()}
    if "rotation" in variant:
        recipe["rotation_search"] = {"dataset": [data["calib_text"]],
                                     "calib_nsamples": min(args.search_windows, data["calib"].shape[0]),
                                     "calib_seqlen": data["calib"].shape[1], "kind": "block",
                                     "block_size": BLOCK[fmt]}
    tok = AutoTokenizer.from_pretrained(args.model)
    quantize_module_transform_pass(model, load_recipe(recipe), tokenizer=tok, device=args.device, progress=False)
    return lambda m: m.effective_weight() if hasattr(m, "effective_weight") else None


def ptq_gptq_settings() -> dict:
    """The algorithm settings of ptq's shipped GPTQ recipe (act-order, clip searches, asymmetric calibration ...);
    calibration data and sizes come from the bench. llm-compressor's GPTQ orders columns too."""
    from ptq.recipe import load_recipe

    g = load_recipe(ROOT / "recipes" / "w4a4kv4_gptq.toml").gptq
    return g.model_dump(include={"percdamp", "act_order", "quantile_search", "clip_search_y", "asymmetric"})


def run_llmcompressor(model, data, fmt, variant, args):
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    mods = []
    if variant.startswith("quip"):
        from llmcompressor.modifiers.transform import QuIPModifier

        mods.append(QuIPModifier(transform_type="random-hadamard", ignore="lm_head"))
    if variant.startswith("spinquant"):
        from llmcompressor.modifiers.transform import SpinQuantModifier

        mods.append(SpinQuantModifier(rotations=["R1", "R2"], transform_type="hadamard"))
    mods.append(GPTQModifier(targets="Linear", scheme=fmt.upper(), ignore=["lm_head", *data["ignore"][fmt]]))
    ids = data["calib"]
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * ids.shape[1]] * ids.shape[0]})
    oneshot(model=model, dataset=ds, recipe=mods, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], batch_size=1)
    return _compressed_tensors_weight


def _compressed_tensors_weight(mod):
    import torch
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    scheme = getattr(mod, "quantization_scheme", None)
    if scheme is None or scheme.weights is None:
        return mod.weight
    with torch.no_grad():
        return forward_quantize(mod, mod.weight, "weight", scheme.weights)


def run_quark(model, data, fmt, variant, args):
    import torch
    from quark.torch import LLMTemplate, ModelQuantizer

    template = LLMTemplate.get(model.config.model_type)
    algos = ["rotation", "gptq"] if variant.startswith("rotation") else ["gptq"]
    config = template.get_config(scheme=fmt, algorithm=algos, exclude_layers=["lm_head", *data["ignore"][fmt]])
    loader = torch.utils.data.DataLoader(data["calib"].to(args.device), batch_size=1)
    model = ModelQuantizer(config).quantize_model(model, loader)
    return _quark_weight


def _quark_weight(mod):
    import torch

    q = getattr(mod, "_weight_quantizer", None) or getattr(mod, "weight_quantizer", None)
    with torch.no_grad():
        return q(mod.weight) if q is not None else mod.weight


RUNNERS = {"unquantized": None, "ptq": run_ptq, "llmcompressor": run_llmcompressor, "quark": run_quark}
IMPORTS = {"unquantized": "torch", "ptq": "ptq", "llmcompressor": "llmcompressor", "quark": "quark.torch"}


def worker(args) -> dict:
    import importlib

    import torch

    out = {"tool": args.worker, "format": args.format, "variant": args.variant}
    try:
        importlib.import_module(IMPORTS[args.worker])
    except Exception as e:  # noqa: BLE001 - any import failure means: not installed here
        return {**out, "status": f"skipped: cannot import {IMPORTS[args.worker]} ({type(e).__name__}: {e})"}
    data = torch.load(args.data, weights_only=False)
    model = _load(args.model, args.dtype, args.device)
    if args.worker == "unquantized":
        return {**out, "status": "ok", "ppl": perplexity(model, data["eval"], args.batch, args.device)}
    t0 = time.perf_counter()
    try:
        weight_of = RUNNERS[args.worker](model, data, args.format, args.variant, args)
    except Exception as e:  # noqa: BLE001 - reported in the table, with the error
        return {**out, "status": f"failed: {type(e).__name__}: {str(e)[:300]}"}
    out["quantize_seconds"] = time.perf_counter() - t0
    grids, acts = [], []
    for name, mod in _targets(model):
        if name in data["ignore"][args.format]:
            continue
        w = weight_of(mod)
        grids.append(on_grid_fraction(w, args.format))
        acts.append(activation_quantized(mod, w))
    out.update(status="ok", ppl=perplexity(model, data["eval"], args.batch, args.device), linears=len(grids),
               grid=min(grids) if grids else None, activations=all(acts) and bool(acts))
    return out


# ---------------------------------------------------------------------------------------------- orchestrator
def prepare_data(args, out: Path) -> Path:
    import torch

    from ptq.data import calibration_windows, eval_windows, load_text, tokenize
    from ptq.models import default_bos_id
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    bos = default_bos_id(tok)
    calib_text = load_text(args.calib_source, "validation", args.data_dir)
    calib = calibration_windows(tok, args.calib_source, args.nsamples, args.seqlen, seed=0, data_dir=args.data_dir,
                                bos_id=bos)
    ev = eval_windows(tokenize(tok, load_text(args.eval_source, "test", args.data_dir)), args.seqlen,
                      bos_id=bos if args.bos_windows else None)[: args.eval_windows]
    # linears whose reduction axis is not a whole number of blocks: every tool leaves them unquantized (the peers
    # refuse them; ptq would pad) and the table says which
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model))
    ignore = {fmt: [n for n, m in _targets(meta) if m.in_features % BLOCK[fmt]] for fmt in FORMATS}
    args.ignored = ignore
    path = out / "data.pt"
    torch.save({"calib": calib, "eval": ev, "calib_text": calib_text, "ignore": ignore}, path)
    return path


def _run_worker(args, out: Path, data: Path, python: str, tool: str, fmt: str, variant: str) -> dict:
    """One (tool, format, variant) in its own process; a crash becomes a row that says how. With ``--reuse``, a
    finished row of an earlier run with the same data and settings (its ``key``) is kept instead of rerun."""
    res = out / f"{tool}-{fmt}-{variant.replace('+', '_')}.json"
    cmd = [python, str(Path(__file__).resolve()), "--worker", tool, "--format", fmt, "--variant", variant,
           "--data", str(data), "--model", args.model, "--dtype", args.dtype, "--device", args.device,
           "--batch", str(args.batch), "--search-windows", str(args.search_windows), "--result", str(res)]
    key = {"data": _digest(data), "model": str(Path(args.model).resolve()), "dtype": args.dtype, "device": args.device,
           "batch": args.batch, "search_windows": args.search_windows if tool == "ptq" else None,
           "gptq": ptq_gptq_settings() if tool == "ptq" else None}
    if args.reuse and res.is_file():
        old = json.loads(res.read_text())
        if old.get("status") == "ok" and old.get("key") == key:
            print(f"[peers] {tool} {fmt} {variant}: kept from {res}, ppl {old['ppl']:.3f}", file=sys.stderr, flush=True)
            return old
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    print(f"[peers] {tool} {fmt} {variant} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode == 0 and res.is_file():
        row = {**json.loads(res.read_text()), "key": key}
    else:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]
        row = {"tool": tool, "format": fmt, "variant": variant,
               "status": f"failed: worker exited {p.returncode}: {tail[0][:300]}"}
    row["wall_seconds"] = time.perf_counter() - t0
    from ptq.io import atomic_write_json

    atomic_write_json(res, row)  # with its key, so that --reuse can keep it
    print(f"[peers]   {row['status']}" + (f", ppl {row['ppl']:.3f}" if row.get("ppl") else ""), file=sys.stderr,
          flush=True)
    return row


def _digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def run_all(args) -> list[dict]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(args, out)
    pythons = {"ptq": sys.executable, "llmcompressor": args.llmcompressor_python or sys.executable,
               "quark": args.quark_python or sys.executable}
    rows = [_run_worker(args, out, data, sys.executable, "unquantized", FORMATS[0], "-")]
    for fmt in args.formats:
        for tool in args.tools:
            for variant in VARIANTS[tool]:
                if variant.startswith("ceil") and fmt not in CEIL_FORMATS:
                    continue
                rows.append(_run_worker(args, out, data, pythons[tool], tool, fmt, variant))
    return rows


def render(rows: list[dict], args) -> str:
    lines = [f"# ptq vs peers: {Path(args.model).name}", "",
             f"Calibration: {args.nsamples} x {args.seqlen} tokens of `{args.calib_source}` (the same ids for every "
             f"tool); evaluation: {args.eval_windows or 'all'} windows of {args.seqlen} tokens of `{args.eval_source}`"
             f" (test); device `{args.device}`, {args.dtype}; ptq's rotation search scores candidates on the first "
             f"{args.search_windows} calibration windows.", "",
             "| format | tool | method | perplexity | quantize s | weights on grid | activations quantized | status |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ok = r.get("status") == "ok"
        if r["tool"] == "unquantized":
            lines.append(f"| - | unquantized | - | {r['ppl']:.3f} | - | - | - | {r['status']} |" if ok else
                         f"| - | unquantized | - | - | - | - | - | {r['status']} |")
            continue
        grid = f"{100 * r['grid']:.2f}%" if ok and r.get("grid") is not None else "-"
        if ok and r.get("grid") is not None and r["grid"] < 0.999:
            grid += " (NOT on grid)"
        act = ("yes" if r.get("activations") else "**NO**") if ok else "-"
        lines.append(f"| {r['format']} | {r['tool']} | {r['variant']} | "
                     f"{r['ppl']:.3f} | {r['quantize_seconds']:.1f} | {grid} | {act} | ok |" if ok else
                     f"| {r['format']} | {r['tool']} | {r['variant']} | - | - | - | - | {r['status']} |")
    for fmt, names in getattr(args, "ignored", {}).items():
        if names and fmt in args.formats:
            lines += ["", f"{fmt}: {len(names)} linears whose inputs are not whole {BLOCK[fmt]}-blocks are left "
                      f"unquantized by every tool: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"]
    lines += ["", "Weights on grid: the smallest fraction, over the quantized linears, of blocks lying on E2M1 times "
              "one scale (power of two for MXFP4). Activations quantized: every quantized linear's output differs from "
              "the plain product of its input with its effective weight."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="stories260k, tiny calibration, CPU, fp32")
    ap.add_argument("--quick", action="store_true",
                    help="the built-in SmolLM2-135M on the CPU in fp32: 32 x 512 calibration, 32 evaluation windows")
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default="bench-peers")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tools", default="ptq,llmcompressor,quark")
    ap.add_argument("--formats", default="nvfp4,mxfp4")
    ap.add_argument("--calib-source", default="wikitext2")
    ap.add_argument("--eval-source", default="wikitext2")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--eval-windows", type=int, default=None)
    ap.add_argument("--bos-windows", action="store_true")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--data-dir", default=os.environ.get("PTQ_DATA_DIR"))
    ap.add_argument("--search-windows", type=int, default=8,
                    help="calibration windows ptq's rotation search scores each candidate on (the first N)")
    ap.add_argument("--reuse", action="store_true",
                    help="keep the rows an earlier run in --out finished with the same data and settings")
    ap.add_argument("--llmcompressor-python", default=None, help="a Python with llmcompressor installed")
    ap.add_argument("--quark-python", default=None, help="a Python with amd-quark installed")
    # worker mode (internal)
    ap.add_argument("--worker", choices=list(RUNNERS))
    ap.add_argument("--format", choices=FORMATS)
    ap.add_argument("--variant")
    ap.add_argument("--data")
    ap.add_argument("--result")
    args = ap.parse_args(argv)
    if args.worker:
        here = Path(__file__).resolve().parent  # bench/kernels.py would shadow the `kernels` package peers import
        sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
        from ptq.io import atomic_write_json

        atomic_write_json(args.result, worker(args))
        return None
    if args.cpu_smoke:
        args.model = args.model or str(ROOT.parent / "shared" / "models" / "stories260k")
        if not Path(args.model).is_dir():
            args.model = "/work/shared/models/stories260k"
        args.calib_source = args.eval_source = "tinystories"
        args.nsamples, args.seqlen, args.eval_windows, args.batch, args.bos_windows = 8, 128, 8, 4, True
        args.device, args.dtype = "cpu", "float32"
    if args.quick:
        from ptq.models import default_model_dir

        args.model = args.model or str(default_model_dir())
        args.nsamples, args.seqlen, args.eval_windows = 32, 512, args.eval_windows or 32
        args.device, args.dtype = "cpu", "float32"
    if args.model is None:
        ap.error("--model is required (or --cpu-smoke)")
    args.tools = [t for t in args.tools.split(",") if t]
    args.formats = [f for f in args.formats.split(",") if f]
    rows = run_all(args)
    text = render(rows, args)
    from ptq.io import atomic_write_json, atomic_write_text

    atomic_write_text(Path(args.out) / "peers.md", text)
    atomic_write_json(Path(args.out) / "peers.json", rows)
    print(text, end="")
    return rows


if __name__ == "__main__":
    main()
