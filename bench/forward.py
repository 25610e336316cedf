"""Forward time of an RTN fake-quantized model relative to the bf16 model (and, with --ppl, their perplexities).

    PYTHONPATH=. python bench/forward.py [--quick] [--model DIR] [--recipe recipes/w4a4kv4.toml] [--ppl]

Model: --model or $PTQ_SMOLLM2 (a plain Hugging Face directory), loaded in bf16 with sdpa attention, on CUDA.
Variants, all timed in the same run on the same random token batch (batch 8 x 2048 by default):
  bf16            the unquantized model (the baseline of every ratio)
  rtn             the recipe applied by the swap pass (W4A4 linears + KV4 cache for w4a4kv4.toml)
  rtn, kv bypass  the same with every attention module's config set to bypass
Each variant is timed twice: eager (every kernel launched from Python) and replayed from a CUDA graph
(``ptq.cuda_graph.GraphedForward``, what ``ptq eval`` / ``ptq table`` use for full batches; the graphed logits are
checked bit for bit against the eager ones). Each time is the median of --iters forwards (CUDA events, after
warm-up) under torch.inference_mode; target for ``rtn``: <= 1.5x bf16. With --ppl, perplexity on wiki.test.raw
(ptq.eval.evaluate_perplexity, seqlen --seqlen) is added per variant. Without CUDA the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=os.environ.get("PTQ_SMOLLM2"), help="model directory (default $PTQ_SMOLLM2)")
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "w4a4kv4.toml"))
    p.add_argument("--batch", type=int, default=None, help="default 8 (--quick: 2)")
    p.add_argument("--seqlen", type=int, default=None, help="default 2048 (--quick: 512)")
    p.add_argument("--iters", type=int, default=None, help="default 10 (--quick: 3)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds over the variants (default 5)")
    p.add_argument("--warmup", type=int, default=None, help="default 3 (--quick: 1)")
    p.add_argument("--ppl", action="store_true", help="also measure wiki.test.raw perplexity of every variant")
    p.add_argument("--ppl-windows", type=int, default=None, help="first N windows only (default: all)")
    p.add_argument("--quick", action="store_true", help="batch 2 x 512, 3 iterations, ppl on 8 windows")
    p.add_argument("--profile", action="store_true", help="also print a torch.profiler table of one forward per "
                   "quantized variant (heaviest kernels and host ops)")
    p.add_argument("--device", default="cuda", help="'cuda' (default) or 'cpu' (a smoke run of this script only)")
    args = p.parse_args(argv)
    defaults = dict(batch=2, seqlen=512, iters=3, warmup=1) if args.quick else \
        dict(batch=8, seqlen=2048, iters=10, warmup=3)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick and args.ppl_windows is None:
        args.ppl_windows = 8
    return args


def time_forward(fn, ids, iters: int, warmup: int) -> tuple[float, float]:
    """Median milliseconds of one forward ``fn(ids)`` (logits included): CUDA events on the GPU, a host clock on the
    CPU; and the median host time to issue it (Python returns before the GPU finishes: when the two are close, the
    forward is bound by the host's launch path rather than by the GPU)."""
    cuda = ids.is_cuda
    with torch.inference_mode():
        for _ in range(warmup):
            fn(ids)
        if cuda:
            torch.cuda.synchronize()
        times, host = [], []
        for _ in range(iters):
            t0 = time.perf_counter()
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(ids)
                end.record()
                host.append((time.perf_counter() - t0) * 1e3)
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                fn(ids)
                times.append((time.perf_counter() - t0) * 1e3)
                host.append(times[-1])
    return statistics.median(times), statistics.median(host)


def profile_forward(model, ids, rows: int = 12) -> None:
    """Print the forward's heaviest GPU kernels and host-side ops (torch.profiler, one forward after warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ids.is_cuda else [])
    with torch.inference_mode():
        model(ids, use_cache=False)
        with profile(activities=acts) as prof:
            model(ids, use_cache=False)
            if ids.is_cuda:
                torch.cuda.synchronize()
    avg = prof.key_averages()
    if ids.is_cuda:
        print(avg.table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=60))
    print(avg.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/forward.py: no CUDA device here; this benchmark only runs on a GPU (nothing measured).")
        return 0
    if not args.model:
        print("bench/forward.py: give --model DIR or set PTQ_SMOLLM2 (see ../shared/gpu/README.md)", file=sys.stderr)
        return 2

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ptq.config import AttentionQuantConfig
    from ptq.cuda_graph import GraphedForward, call_logits
    from ptq.modules import AttentionMX, LinearMX
    from ptq.passes.base import PassContext
    from ptq.passes.swap import SwapPass, swap_modules
    from ptq.quantizers import resolve_backend
    from ptq.recipe import load_recipe

    dev = torch.device(args.device)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, attn_implementation="sdpa")
    model = model.to(dev).eval()
    tok = AutoTokenizer.from_pretrained(args.model) if args.ppl else None
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seqlen), generator=g).to(dev)

    def ppl(m):
        from ptq.eval import evaluate_perplexity

        r = evaluate_perplexity(m, tok, "wikitext2", split="test", seqlen=args.seqlen, batch_size=args.batch,
                                max_windows=args.ppl_windows, progress=False)
        return r["ppl"], r["n_windows"]

    with torch.inference_mode():
        ref_logits = model(ids[:1], use_cache=False).logits.float()

    # Three copies of the model, timed in interleaved rounds: the host and the GPU clocks drift between runs (the
    # same variant was seen to vary by 30% from one run to the next), so each round's ratio compares variants measured
    # back to back, and the table reports medians over rounds.
    recipe = load_recipe(args.recipe)
    rtn = copy.deepcopy(model)
    info = SwapPass().run(rtn, recipe, PassContext(progress=False))
    no_kv = copy.deepcopy(rtn)
    swap_modules(no_kv, {n: AttentionQuantConfig() for n, m in no_kv.named_modules() if isinstance(m, AttentionMX)})
    variants = {"bf16": model, "rtn": rtn, "rtn, kv bypass": no_kv}
    some_linear = next(m for m in rtn.modules() if isinstance(m, LinearMX) and m.cfg.data_in is not None)
    probe = torch.zeros(4, some_linear.in_features, device=dev, dtype=torch.bfloat16)
    backend = resolve_backend(probe, some_linear.cfg.data_in)

    # (variant, mode) -> ids -> logits; the graphed runners keep their graphs for the whole run
    runners = {}
    for name, m in variants.items():
        runners[name, "eager"] = functools.partial(call_logits, m)
        if dev.type == "cuda":
            runners[name, "graph"] = GraphedForward(m)
    times = {key: [] for key in runners}
    host = {key: [] for key in runners}
    for r in range(args.rounds):
        for key, fn in runners.items():
            t, h = time_forward(fn, ids, args.iters, args.warmup if r == 0 else 1)
            times[key].append(t)
            host[key].append(h)
    graph_exact = {}
    if dev.type == "cuda":
        with torch.inference_mode():
            for name in variants:
                eager = runners[name, "eager"](ids).clone()
                graphed = runners[name, "graph"](ids)
                graph_exact[name] = runners[name, "graph"].n_graphs == 1 and torch.equal(eager, graphed)

    def diff(m):
        with torch.inference_mode():
            return (m(ids[:1], use_cache=False).logits.float() - ref_logits).abs().max().item()

    def ratio(key):
        base = times["bf16", key[1]]
        return statistics.median(t / b for t, b in zip(times[key], base))

    rows = []
    for name, m in variants.items():
        e, g = (name, "eager"), (name, "graph")
        graphed = (statistics.median(times[g]), ratio(g), graph_exact[name]) if g in times else None
        rows.append((name, statistics.median(times[e]), statistics.median(host[e]), ratio(e), graphed,
                     ppl(m) if args.ppl else None, diff(m)))

    print(f"model {args.model}  recipe {Path(args.recipe).name}  batch {args.batch} x {args.seqlen}  "
          f"{torch.cuda.get_device_name() if dev.type == 'cuda' else 'CPU'}  fake_quantize backend: {backend}")
    print(f"swapped: {info['counts']}")
    head = f"{'variant':<16}{'eager ms':>10}{'host ms':>9}{'x bf16':>9}{'graph ms':>10}{'x bf16':>9}{'graph==eager':>14}"
    head += f"{'max|dlogit|':>13}"
    if args.ppl:
        head += f"{'ppl':>10}{'windows':>9}"
    print(head)
    for name, ms, host_ms, r_eager, graphed, p, d in rows:
        line = f"{name:<16}{ms:>10.2f}{host_ms:>9.2f}{r_eager:>9.3f}"
        line += f"{graphed[0]:>10.2f}{graphed[1]:>9.3f}{str(graphed[2]):>14}" if graphed else f"{'-':>10}{'-':>9}{'-':>14}"
        line += f"{d:>13.4f}"
        if p is not None:
            line += f"{p[0]:>10.4f}{p[1]:>9d}"
        print(line)
    for key in (k for k in runners if k[0] == "rtn"):
        r = ratio(key)
        verdict = "meets" if r <= 1.5 else "MISSES"
        print(f"rtn / bf16 ({key[1]}) = {r:.3f}, median over {args.rounds} interleaved rounds ({verdict} the <= 1.5x "
              "target)")
    if args.profile:
        for name in ("rtn", "rtn, kv bypass"):
            print(f"\n--- profile: {name}")
            profile_forward(variants[name], ids)
    return 0


if __name__ == "__main__":
    sys.exit(main())
