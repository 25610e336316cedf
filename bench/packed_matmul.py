"""Packed low-bit GEMM (Triton, dequantization inside the tiles) vs bf16 ``F.linear``, and the export check.

    PYTHONPATH=. python bench/packed_matmul.py [--quick] [--formats mxfp4,nvfp4,mxint4] [--model DIR]

For every linear shape of SmolLM2-135M (576x576, 576->1536, 1536->576, 576->192) and Llama-3-8B (4096x4096,
4096->14336, 14336->4096, 4096->1024) and M = 1, 16, 256, 2048 tokens: the median time (``triton.testing.do_bench``,
which flushes the L2 cache before every run, so weights come from HBM as in a real decode step) of
- bf16 ``F.linear`` (cuBLAS): the baseline,
- the packed Triton GEMM (autotuned per shape on the first call; compile + tuning time is excluded: the timed function
  has been called before, with the same shapes, so the autotuner's key is already cached and nothing recompiles),
- the torch backend without its cache (``dequantize`` then ``F.linear``: what the first call costs),
with the speed-up over bf16, the effective weight bandwidth of the packed kernel, and its max relative error against
``x @ dequantize(W)^T`` in fp64 (checked on fresh random data; the output is poisoned with NaN first). The target is
>= 2.5x over bf16 at M <= 16 for the large shapes.

"read floor": the CUDA-graph time of a kernel that only streams the packed codes and scales once (no
arithmetic, no activations, no output): bf16 time / read floor bounds the speed-up any packed kernel can reach at that
shape under this timing (launch, ramp-up and tail included); at M = 1 the small shapes sit well below 2.5x by it.

Three timings per case: "eager" (``do_bench``: a Python call per run, so a launcher whose host time exceeds the GPU time
shows up as idle GPU time) and "graph" (the same call captured once in a CUDA graph and replayed after an L2 flush:
the GPU time alone). The flush writes 256 MiB, so that replay also pays for writing the dirty L2 back. A third,
"decode step", is the one to read for decode speed: one CUDA graph runs the call over distinct copies of the weight
back to back (together >= 4x the L2, so each comes from HBM, with no flush), as the layers of a graph-captured
decode step do; its own read floor is timed the same way. "host us" is the launcher's Python time per call
(many calls queued without synchronising). The MXFP4 scale-path parameter (the largest scale code) is computed once per
weight, as `PackedLinear` does, so no timed call synchronises with the device.

With ``--model DIR`` (default: $PTQ_SMOLLM2 when set) it also quantizes that model with ``recipes/mxfp4.toml``,
exports it, reports the bits per weight of the packed linears from the file, reloads it and compares the perplexity
(wikitext-2 test, seqlen 2048) of the fake-quant and the reloaded model. Exits cleanly without CUDA.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

SHAPES = [  # (name, in_features K, out_features N)
    ("smol q/o 576x576", 576, 576),
    ("smol up 576->1536", 576, 1536),
    ("smol down 1536->576", 1536, 576),
    ("smol k/v 576->192", 576, 192),
    ("l3-8b q/o 4096x4096", 4096, 4096),
    ("l3-8b up 4096->14336", 4096, 14336),
    ("l3-8b down 14336->4096", 14336, 4096),
    ("l3-8b k/v 4096->1024", 4096, 1024),
]
MS = [1, 16, 256, 2048]


def _specs():
    from ptq.formats import QuantSpec

    return {"mxfp4": QuantSpec.mxfp("e2m1"), "nvfp4": QuantSpec.nvfp4(), "mxint4": QuantSpec.mxint(4),
            "mxint8": QuantSpec.mxint(8)}


def _bench(fn) -> float:
    """Median milliseconds per call."""
    if not torch.cuda.is_available():  # --cpu-smoke: exercises the code paths only
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _capture(fn):
    """``fn`` captured in a CUDA graph (warmed up on a side stream first, as capture requires), or None with the
    reason printed when it cannot be captured (e.g. it synchronises with the device)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception as exc:  # a capture failure is a finding, not a crash of the whole table
        print(f"    (CUDA graph capture failed: {type(exc).__name__}: {exc})", flush=True)
        return None
    return graph


def _bench_graph(fn, reps: int = 100) -> float:
    """Median milliseconds of one CUDA-graph replay of ``fn`` after an L2 flush (GPU time, no launcher overhead);
    NaN when ``fn`` cannot be captured (e.g. it synchronises with the device).

    The flush is triton's: writing 256 MiB of zeros. It leaves the L2 full of dirty lines, so the timed replay's
    reads also pay for writing those back (up to the L2 size, 50-60 MB, at HBM speed): a fixed cost that
    `_bench_layers` (the decode-step timing) does not have."""
    if not torch.cuda.is_available():
        return _bench(fn)
    graph = _capture(fn)
    if graph is None:
        return float("nan")
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    # the GPU is busy with the flush while the host enqueues the replay: no idle gap is timed
    return _time_replays(graph, reps, before=flush.zero_)


def _time_replays(graph, reps: int, before=None) -> float:
    """Median milliseconds of one replay of ``graph`` (device events), ``before()`` enqueued untimed ahead of each."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        if before is not None:
            before()
        starts[i].record()
        graph.replay()
        ends[i].record()
    torch.cuda.synchronize()
    return float(torch.tensor([a.elapsed_time(b) for a, b in zip(starts, ends)]).median())


def _layer_copies(tensors: tuple[torch.Tensor, ...], most: int = 1024) -> list[tuple[torch.Tensor, ...]]:
    """Distinct copies of ``tensors`` (one layer's weight) whose bytes together are at least 4x the L2 cache, so a
    graph that reads them in turn finds none of them in the L2 (at most ``most`` copies: the small shapes)."""
    l2 = torch.cuda.get_device_properties(tensors[0].device).L2_cache_size if torch.cuda.is_available() else 0
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    count = max(2, min(most, -(-4 * l2 // nbytes)))
    return [tuple(t.clone() for t in tensors) for _ in range(count)]


def _bench_layers(fns, reps: int = 20) -> float:
    """Median milliseconds per call of one CUDA graph that runs ``fns`` back to back, each over its own copy of
    the weight: a decode step's sequence of layers. The copies together are larger than the L2, so each call reads
    its weight from HBM (as every layer of a real decode step does) without a flush between calls, and the launch
    gaps are those of a captured decode step."""
    if not torch.cuda.is_available():
        return _bench(fns[0])
    graph = _capture(lambda: [f() for f in fns])
    if graph is None:
        return float("nan")
    return _time_replays(graph, reps) / len(fns)


def _host_us(fn, calls: int = 200) -> float:
    """Microseconds of host time per call with calls queued back to back (no synchronisation in between)."""
    if not torch.cuda.is_available():
        calls = 1  # --cpu-smoke: each interpreted call takes seconds
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t = (time.perf_counter() - t0) / calls * 1e6
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return t


def _stream_kernel():
    import triton
    import triton.language as tl

    global _STREAM
    if _STREAM is None:
        @triton.jit
        def stream(p_ptr, out_ptr, n, BLOCK: tl.constexpr):
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            v = tl.load(p_ptr + offs, mask=offs < n, other=0)
            tl.store(out_ptr + tl.program_id(0), tl.sum(v, axis=0))

        _STREAM = stream
    return _STREAM


_STREAM = None


def _stream_reads(tensors):
    """A callable that streams ``tensors`` once with the bare read kernel."""
    import triton

    _stream = _stream_kernel()
    words = [t.reshape(-1).view(torch.int32) if t.numel() % 4 == 0 else t.reshape(-1).to(torch.int32)
             for t in tensors]
    block = 2048  # 8 KiB per program: four 16-byte loads in flight per thread
    outs = [torch.empty(triton.cdiv(w.numel(), block), dtype=torch.int32, device=w.device) for w in words]

    def run():
        for w, o in zip(words, outs):
            _stream[(o.numel(),)](w, o, w.numel(), BLOCK=block, num_warps=4)

    return run


def _read_floor_graph(tensors, reps: int = 100) -> float:
    """GPU milliseconds (CUDA graph, L2 flushed) of a Triton kernel that only streams ``tensors`` (the packed codes
    and scales) once from memory: what any kernel that must read those bytes pays, launch and ramp-up included, at
    this size. A packed GEMM's speed-up over bf16 cannot exceed bf16 time / this."""
    if not torch.cuda.is_available():
        return float("nan")
    return _bench_graph(_stream_reads(tensors), reps)


PATHS = {"old": "tile", "new": "auto"}  # --path: the tile kernel at every M, or the decode kernel at M <= 16


def _tuner_summary(mod, path: str, top: int = 4) -> tuple[str, str]:
    """The autotuner's choice and its `top` fastest configs (us) for the last tuned key of the path's kernel."""
    tuned = mod._decode_autotuned if path == "auto" else mod._autotuned
    cfg = getattr(tuned, "best_config", None)
    if cfg is None:
        return "", ""
    timings = getattr(tuned, "configs_timings", None) or {}

    def short(c):
        kw = c.kwargs
        return ("/".join(f"{k}{v}" for k, v in kw.items()) + f"/w{c.num_warps}s{c.num_stages}")

    ranked = sorted(timings.items(), key=lambda kv: kv[1][0] if isinstance(kv[1], (list, tuple)) else kv[1])
    tops = ", ".join(f"{short(c)} {(t[0] if isinstance(t, (list, tuple)) else t) * 1e3:.1f}" for c, t in ranked[:top])
    return short(cfg), tops


def kernel_table(formats: list[str], shapes, ms, torch_backend: bool, device: str = "cuda",
                 paths: tuple[str, ...] = ("new",)) -> list[dict]:
    import torch.nn.functional as F

    from ptq.kernels.packed_matmul import max_scale_code, packed_matmul
    from ptq.modules.packed import PackedLinear

    specs = _specs()
    rows = []
    dev = torch.device(device)
    for name, k, n in shapes:
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        packed = {f: PackedLinear.from_weight(w, specs[f]) for f in formats}
        codes = {f: max_scale_code(packed[f].scales) for f in formats}  # once per weight: one sync, untimed
        floors = {f: _read_floor_graph([packed[f].qweight, packed[f].scales]) for f in formats}
        # decode-step timing: distinct weight copies read back to back (see _bench_layers)
        w_layers = _layer_copies((w,))
        p_layers = {f: _layer_copies((packed[f].qweight, packed[f].scales)) for f in formats}
        floor_layers = {f: _bench_layers([_stream_reads(c) for c in p_layers[f]]) if dev.type == "cuda"
                        else float("nan") for f in formats}
        for m in ms:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            t_bf16 = _bench(lambda: F.linear(x, w))
            g_bf16 = _bench_graph(lambda: F.linear(x, w))
            s_bf16 = _bench_layers([lambda c=c: F.linear(x, c[0]) for c in w_layers])
            for f, path in [(f, pth) for f in formats for pth in paths]:
                p = packed[f]
                mode = PATHS[path]
                g = p.global_scale.view(torch.float32).reshape(1) if p.global_scale is not None else None
                code = codes[f]

                def run(xx=x, qweight=p.qweight, scales=p.scales):
                    return packed_matmul(xx, qweight, scales, p.weight_spec, n, global_scale=g,
                                         max_scale_code=code, path=mode)

                t0 = time.perf_counter()
                run()  # compile + autotune
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                tune_s = time.perf_counter() - t0
                kmod = sys.modules["ptq.kernels.packed_matmul"]
                tuned_path = "auto" if mode == "auto" and m <= kmod.AUTO_DECODE_MAX_M else "tile"  # what ran
                cfg, tops = _tuner_summary(kmod, tuned_path) if dev.type == "cuda" else ("", "")
                # correctness on fresh data, output poisoned first
                xc = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                wd = p.dequantized_weight(torch.float32, dev).double()
                ref = xc.double() @ wd.t()
                y = run(xc)
                y2 = run(xc)
                rel = ((y.double() - ref).norm() / ref.norm()).item()
                ok = bool(torch.isfinite(y).all()) and rel < 1e-2 and torch.equal(y, y2)
                t_tri = _bench(run)
                g_tri = _bench_graph(run)
                s_tri = _bench_layers([lambda c=c: run(x, *c) for c in p_layers[f]])
                host = _host_us(run)
                t_torch = float("nan")
                if torch_backend:
                    from ptq.quantizers import dequantize

                    qt = p.qtensor()
                    t_torch = _bench(lambda: F.linear(x, dequantize(qt, dtype=torch.bfloat16)))
                wbytes = p.packed_nbytes
                rows.append(dict(shape=name, M=m, fmt=f, path=path, bf16_ms=t_bf16, triton_ms=t_tri, torch_ms=t_torch,
                                 speedup=t_bf16 / t_tri, torch_speedup=t_bf16 / t_torch, bf16_graph_ms=g_bf16,
                                 triton_graph_ms=g_tri, graph_speedup=g_bf16 / g_tri, host_us=host,
                                 floor_ms=floors[f], floor_speedup=g_bf16 / floors[f],
                                 bf16_step_ms=s_bf16, triton_step_ms=s_tri, step_speedup=s_bf16 / s_tri,
                                 floor_step_ms=floor_layers[f], floor_step_speedup=s_bf16 / floor_layers[f],
                                 copies=f"{len(w_layers)}/{len(p_layers[f])}",
                                 gbps=(wbytes + x.numel() * 2 + m * n * 2) / t_tri / 1e6, rel_err=rel, ok=ok,
                                 tune_s=tune_s, config=cfg, top=tops))
                print(f"  {name:24s} M={m:5d} {f:6s} {path:3s} bf16 {t_bf16*1e3:8.1f}us  triton {t_tri*1e3:8.1f}us "
                      f"({t_bf16 / t_tri:5.2f}x)  graph: bf16 {g_bf16*1e3:7.1f}us triton {g_tri*1e3:7.1f}us "
                      f"({g_bf16 / g_tri:5.2f}x; read floor {floors[f]*1e3:.1f}us = {g_bf16 / floors[f]:.2f}x)  "
                      f"step: bf16 {s_bf16*1e3:7.1f}us triton {s_tri*1e3:7.1f}us ({s_bf16 / s_tri:5.2f}x; floor "
                      f"{floor_layers[f]*1e3:.1f}us = {s_bf16 / floor_layers[f]:.2f}x)  host {host:5.1f}us/call  rel_err {rel:.1e} {'ok' if ok else 'FAIL'}  [{cfg}] tune {tune_s:.0f}s",
                      flush=True)
                if tops:
                    print(f"      fastest configs (us): {tops}", flush=True)
        del packed, w
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def print_table(rows: list[dict]) -> None:
    print("\n| shape | M | format | path | bf16 F.linear (us) | packed Triton (us) | speed-up | graph: bf16 / Triton (us) | "
          "graph speed-up | read floor (us) / its speed-up | decode step: bf16 / Triton (us) | decode-step speed-up | "
          "step read floor (us) / its speed-up | copies bf16/packed | launcher host us/call | weight+io GB/s | torch dequant+linear (us) | rel err | ok | config |")
    print("|---|---:|---|---|" + "---:|" * 14 + "---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['M']} | {r['fmt']} | {r['path']} | {r['bf16_ms']*1e3:.1f} | {r['triton_ms']*1e3:.1f} | "
              f"{r['speedup']:.2f}x | {r['bf16_graph_ms']*1e3:.1f} / {r['triton_graph_ms']*1e3:.1f} | "
              f"{r['graph_speedup']:.2f}x | {r['floor_ms']*1e3:.1f} / {r['floor_speedup']:.2f}x | "
              f"{r['bf16_step_ms']*1e3:.1f} / {r['triton_step_ms']*1e3:.1f} | {r['step_speedup']:.2f}x | "
              f"{r['floor_step_ms']*1e3:.1f} / {r['floor_step_speedup']:.2f}x | {r['copies']} | {r['host_us']:.1f} | {r['gbps']:.0f} | {r['torch_ms']*1e3:.1f} | "
              f"{r['rel_err']:.1e} | {'ok' if r['ok'] else 'FAIL'} | {r['config']} |")
    small = [r for r in rows if r["M"] <= 16 and r["shape"].startswith("l3")]
    if small:
        for col, what in (("speedup", "eager"), ("graph_speedup", "CUDA graph, L2 flushed"),
                          ("step_speedup", "decode step (distinct weights back to back)")):
            by_fmt = {}
            for r in small:
                by_fmt.setdefault(f"{r['fmt']} {r['path']}", []).append(r[col])
            print(f"\nM <= 16, Llama-3-8B shapes, {what} (target >= 2.5x): " + ", ".join(
                f"{f}: min {min(v):.2f}x / geomean {torch.tensor(v).log().mean().exp().item():.2f}x"
                for f, v in by_fmt.items()))
    bad = [r for r in rows if not r["ok"]]
    print(f"correctness: {len(rows) - len(bad)}/{len(rows)} cases ok" + (f"; FAILED: {bad}" if bad else ""))


def export_check(model_dir: str, seqlen: int, max_windows: int | None, device: str = "cuda") -> None:
    from safetensors import safe_open

    from ptq.eval import evaluate_perplexity
    from ptq.export import WEIGHTS, export_quantized, load_quantized
    from ptq.models import load_model
    from ptq.passes.pipeline import quantize_module_transform_pass
    from ptq.recipe import load_recipe

    recipe = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "mxfp4.toml")
    model, tok = load_model(model_dir, dtype=torch.bfloat16, device=device)
    model, _ = quantize_module_transform_pass(model, load_recipe(recipe), tokenizer=tok, device=device,
                                              progress=False)
    out = os.path.join(tempfile.mkdtemp(), "smollm2-mxfp4")
    t0 = time.perf_counter()
    summary = export_quantized(model, out, tokenizer=tok, progress=False, format="ptq")
    t_export = time.perf_counter() - t0
    nbytes = 0
    with safe_open(os.path.join(out, WEIGHTS), framework="pt") as f:
        keys = set(f.keys())
        for n in summary["packed"]:
            for part in ("qweight", "scales", "global_scale"):
                if f"{n}.{part}" in keys:
                    t = f.get_tensor(f"{n}.{part}")
                    nbytes += t.numel() * t.element_size()
    bpw = 8 * nbytes / summary["packed_weights"]
    t0 = time.perf_counter()
    loaded = load_quantized(out, device=device)
    t_load = time.perf_counter() - t0
    kw = dict(source="wikitext2", split="test", seqlen=seqlen, batch_size=8, max_windows=max_windows, progress=False)
    ppl_fq = evaluate_perplexity(model, tok, **kw)
    ppl_ld = evaluate_perplexity(loaded, tok, **kw)
    ids = torch.randint(0, min(1000, model.config.vocab_size), (1, 64), device=device)
    from ptq.modules.packed import PackedLinear

    with torch.no_grad():
        ref = model(ids).logits.float()
        diffs = {}
        for backend in ("torch", "triton"):
            for m in loaded.modules():
                if isinstance(m, PackedLinear):
                    m.backend = backend
            diffs[backend] = (loaded(ids).logits.float() - ref).abs().max().item()
    print(f"\n| {os.path.basename(os.path.normpath(model_dir))} MXFP4 export (recipes/mxfp4.toml, bf16) | value |"
          "\n|---|---|")
    print(f"| packed linears | {len(summary['packed'])} ({summary['packed_weights']:,} weights) |")
    print(f"| bits/weight on disk (codes+scales from the file) | {bpw:.4f} (target <= 4.3) |")
    print(f"| model.safetensors | {summary['bytes'] / 2**20:.1f} MiB |")
    print(f"| export / load time | {t_export:.1f} s / {t_load:.1f} s |")
    print(f"| ppl fake-quant (seqlen {seqlen}, {ppl_fq['n_windows']} windows) | {ppl_fq['ppl']:.4f} |")
    print(f"| ppl reloaded packed | {ppl_ld['ppl']:.4f} (equal: {ppl_fq['ppl'] == ppl_ld['ppl']}) |")
    print(f"| max abs logit diff vs fake-quant, 1x64 tokens: torch backend / Triton backend | "
          f"{diffs['torch']:.3g} / {diffs['triton']:.3g} (max logit {ref.abs().max().item():.3g}) |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="Llama-3-8B shapes at M = 1, 16 and one SmolLM2 shape, "
                    "MXFP4 and NVFP4 only, no torch-backend timing, perplexity on 16 windows")
    ap.add_argument("--formats", default=None, help="comma-separated: mxfp4,nvfp4,mxint4,mxint8 "
                    "(default mxfp4,nvfp4,mxint4)")
    ap.add_argument("--model", default=os.environ.get("PTQ_SMOLLM2"), help="model dir for the export check "
                    "(default $PTQ_SMOLLM2; skipped when unset)")
    ap.add_argument("--path", choices=["old", "new", "both"], default="both", help="packed kernel: old (the tile "
                    "GEMM at every M), new (the decode kernel at M <= 16) or both, side by side (default)")
    ap.add_argument("--no-export", action="store_true", help="skip the export / perplexity check")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1: "
                    "checks this script's code paths, measures nothing")
    args = ap.parse_args(argv)
    paths = ("old", "new") if args.path == "both" else (args.path,)
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        rows = kernel_table(["mxfp4", "nvfp4", "mxint4", "mxint8"], [("tiny 96->40", 96, 40)], [1, 3],
                            torch_backend=True, device="cpu", paths=paths)
        print_table(rows)
        stories = os.environ.get("PTQ_STORIES260K", os.path.join(os.path.dirname(__file__), "..", "..", "shared",
                                                                  "models", "stories260k"))
        if os.path.isdir(stories) and not args.no_export:
            export_check(stories, 64, 2, device="cpu")
        return 0 if all(r["ok"] for r in rows) else 1
    if not torch.cuda.is_available():
        print("bench/packed_matmul.py: no CUDA device; nothing to measure (run it on the GPU machine).")
        return 0
    formats = (args.formats or ("mxfp4,nvfp4" if args.quick else "mxfp4,nvfp4,mxint4")).split(",")
    unknown = set(formats) - set(_specs())
    if unknown:
        ap.error(f"unknown formats {sorted(unknown)}")
    shapes = [s for s in SHAPES if s[0].startswith("l3")] + [SHAPES[1]] if args.quick else SHAPES
    ms = [1, 16] if args.quick else MS
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    t0 = time.perf_counter()
    rows = kernel_table(formats, shapes, ms, torch_backend=not args.quick, paths=paths)
    print_table(rows)
    print(f"(kernel table: {time.perf_counter() - t0:.0f} s including compilation and autotuning)")
    if args.model and not args.no_export:
        try:
            export_check(args.model, 2048, 16 if args.quick else None)
        except Exception as exc:  # the kernel table above must survive a problem here
            import traceback

            traceback.print_exc()
            print(f"export check failed: {type(exc).__name__}: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
