"""GPTQ time, peak GPU memory and wikitext-2 perplexity of the GPTQ recipe next to RTN and bf16.

    PYTHONPATH=. python bench/gptq.py [--quick] [--model DIR] [--recipe recipes/w4a4kv4_gptq.toml] [--ablation]

Model: --model or $PTQ_SMOLLM2 (a plain Hugging Face directory), bf16, sdpa. Data: $PTQ_DATA_DIR (calibration from
wiki.valid.tokens, perplexity on wiki.test.raw). Rows, all in one run:
  bf16        the unquantized model (baseline of the ppl ratios)
  rtn         --rtn-recipe (default recipes/w4a4kv4.toml): the same quantizers, RTN weights
  gptq        --recipe with its checkpoint_dir replaced by a fresh temporary directory (so nothing is resumed) and
              nsamples x seqlen calibration tokens (default 128 x 2048; --quick 16 x 512)
  --ablation adds gptq without clip search, and gptq with act_order.
GPTQ runs with the model on the CPU and --device as the work device, so only the current decoder layer (plus the
calibration activations) is on the GPU: the peak memory column shows that footprint. Time = the gptq pass's wall
time (calibration capture, Hessians, GPTQ, layer replays, checkpoint writes). Target: < 60 s on an H100.
Without CUDA the script says so and exits 0 (use --device cpu for a smoke run).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=os.environ.get("PTQ_SMOLLM2"), help="model directory (default $PTQ_SMOLLM2)")
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "w4a4kv4_gptq.toml"))
    p.add_argument("--rtn-recipe", default=str(ROOT / "recipes" / "w4a4kv4.toml"))
    p.add_argument("--nsamples", type=int, default=None, help="calibration windows (default 128; --quick 16)")
    p.add_argument("--seqlen", type=int, default=None, help="calibration window length (default 2048; --quick 512)")
    p.add_argument("--ppl-seqlen", type=int, default=2048)
    p.add_argument("--ppl-windows", type=int, default=None, help="first N windows only (default all; --quick 16)")
    p.add_argument("--ablation", action="store_true", help="also: no clip search; act_order")
    p.add_argument("--quick", action="store_true", help="16 x 512 calibration tokens, perplexity on 16 windows")
    p.add_argument("--device", default="cuda", help="'cuda' (default) or 'cpu' (a smoke run of this script only)")
    args = p.parse_args(argv)
    defaults = dict(nsamples=16, seqlen=512, ppl_windows=16) if args.quick else dict(nsamples=128, seqlen=2048)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/gptq.py: no CUDA device here; this benchmark only runs on a GPU (nothing measured).")
        return 0
    if not args.model:
        print("bench/gptq.py: give --model DIR or set PTQ_SMOLLM2 (see ../shared/gpu/README.md)", file=sys.stderr)
        return 2

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ptq.eval import evaluate_perplexity
    from ptq.passes.pipeline import quantize_module_transform_pass
    from ptq.recipe import load_recipe

    dev = torch.device(args.device)
    tok = AutoTokenizer.from_pretrained(args.model)

    def fresh():
        m = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, attn_implementation="sdpa")
        return m.eval()

    def ppl(model):
        model.to(dev)
        r = evaluate_perplexity(model, tok, "wikitext2", split="test", seqlen=args.ppl_seqlen, batch_size=8,
                                max_windows=args.ppl_windows, progress=False, device=dev)
        return r["ppl"], r["n_windows"]

    rows = []  # (name, ppl, windows, gptq seconds, peak GiB, note)
    rows.append(("bf16", *ppl(fresh()), None, None, ""))

    model = fresh().to(dev)
    quantize_module_transform_pass(model, args.rtn_recipe, tokenizer=tok, device=dev, progress=False)
    rows.append(("rtn", *ppl(model), None, None, ""))
    del model

    base = load_recipe(args.recipe)
    if base.gptq is None:
        print(f"bench/gptq.py: {args.recipe} has no [gptq] table", file=sys.stderr)
        return 2
    variants = [("gptq", {})]
    if args.ablation:
        variants += [("gptq, no clip", {"quantile_search": False, "clip_search_y": False}),
                     ("gptq, act_order", {"act_order": True})]
    for name, change in variants:
        with tempfile.TemporaryDirectory(prefix="ptq-bench-gptq-") as ck:
            gcfg = base.gptq.model_copy(update={"checkpoint_dir": ck, "nsamples": args.nsamples,
                                                "seqlen": args.seqlen, **change})
            recipe = base.model_copy(update={"gptq": gcfg})
            model = fresh()  # on the CPU: the pass moves one decoder layer at a time to the device
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
            t0 = time.perf_counter()
            model, info = quantize_module_transform_pass(model, recipe, tokenizer=tok, device=dev, progress=False)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
            g = info["gptq"]
            parts = ", ".join(f"{k} {v:.1f}" for k, v in g.get("time_breakdown", {}).items())
            note = f"{g['modules']} linears, clip={g['clip_search']}; seconds: {parts}"
            rows.append((name, *ppl(model), seconds, peak, note))
            del model

    print(f"model {args.model}  gptq recipe {Path(args.recipe).name}  calibration {args.nsamples} x {args.seqlen} "
          f"tokens (wiki.valid.tokens)  ppl: wiki.test.raw seqlen {args.ppl_seqlen}  "
          f"{torch.cuda.get_device_name() if dev.type == 'cuda' else 'CPU'}")
    ref = rows[0][1]
    print(f"{'variant':<18}{'ppl':>10}{'x bf16':>9}{'windows':>9}{'quantize s':>12}{'peak GiB':>10}  note")
    for name, p, n, s, peak, note in rows:
        s_txt = f"{s:>12.1f}" if s is not None else f"{'-':>12}"
        m_txt = f"{peak:>10.2f}" if peak is not None else f"{'-':>10}"
        print(f"{name:<18}{p:>10.4f}{p / ref:>9.3f}{n:>9d}{s_txt}{m_txt}  {note}")
    gptq_s = rows[2][3]
    verdict = "meets" if gptq_s < 60 else "MISSES"
    print(f"gptq time {gptq_s:.1f} s ({verdict} the < 60 s target); ppl gptq / rtn = {rows[2][1] / rows[1][1]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
