"""Benchmark: fused Hadamard rotate + MX fake-quantize vs quantize alone, per kernel variant (and the Triton FWHT).

Also compares the Triton FWHT with the torch reference (full runs only).

    PYTHONPATH=. python bench/hadamard.py [--quick] [--dims D,...] [--rots R,...] [--variants V1,V2,...] [--search]
    PYTHONPATH=. python bench/hadamard.py --sass [--quick] [--variants ...]    # offline, no GPU needed

Activations 8 x 2048 x dim in bf16, MXINT4 blocks of 32 (``--quick``: dims 576 and 4096, rotations full / block 32 /
block 64; otherwise also 1536 and 8192, block 128 and MXFP4). 576 = 36 x 16 and 1536 = 12 x 128 use the known
orders. Times are GPU time from ``triton.testing.do_bench_cudagraph`` (CUDA-graph replay, so host launch cost is
excluded on both sides); the "eager" column is host-inclusive back-to-back launches timed with events. Ratios are
against ``fake_quantize`` alone measured in the same run (target: fused <= 1.2x).

Variants (``ptq.kernels.hadamard.parse_variant``; identical bits, different speed), written as '/'-joined tokens:
``default`` (the shipped configuration), a butterfly mode (``r2``, ``r4``, ``xor``, ``xorK`` = K partner-fetch
stages then radix-4, ``rows`` = rows in registers, m == 1 only), a tile ``ELEMSxWARPS`` (e.g. ``4096x8``), ``lN``
(rows: N threads per row), ``i0`` / ``i1`` (rows: contiguous / interleaved vectors), ``g1`` / ``g4`` (mixing rows
one / four at a time, m > 1 only), ``u0`` / ``u1`` (mixing loop unrolled), ``q0`` / ``q1`` (the reference MX tail /
the short MXINT one), ``c0`` / ``c1`` (bf16 rounding one / two elements per cvt). E.g.
``--variants default,r4,xor5/8192x8``. The launch configuration is passed to the kernels explicitly (no environment
variables). Without ``--variants`` each case gets a short list chosen for it; variants that do not apply to a case
(``rows`` with m > 1) are left out. ``--rots`` picks rotations (``full``, ``block32``, ...). Every variant is first
checked bit-exact against the torch reference. The last lines print the "fused / quantize-alone" summary for the
default configuration and for the best variant of each case.
``--search`` also times the rotation search of ``recipes/w4a4kv4_gptq_rot.toml`` (without GPTQ) on the model in
``--model`` / ``$PTQ_SMOLLM2``. Exits cleanly without CUDA.

``--sass`` needs no GPU: it compiles each case's variants for sm_90 (``triton.compile`` with a CUDA target, the
ptxas / nvdisasm shipped with triton) and prints SASS instructions per element, shared-memory bytes, barriers and
shuffles, registers and local-memory traffic. An H100 issues ~30 T thread-instructions/s, so memory speed allows
~40 per bf16 element read and written; where the data stay in L2 (dim 576) the budget is about half that. The
counts guide, the timings decide: one thread per 32-element row was the shortest SASS and among the slowest.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

def variant_config(variant: str, rot):
    """The launch configuration of one variant string for a rotation (see the module docstring)."""
    from ptq.kernels.hadamard import default_config, parse_variant

    return parse_variant(variant, default_config(rot))


def check_variant(variant: str) -> None:
    """Refuse a malformed variant before any GPU work."""
    from ptq.errors import PtqError
    from ptq.kernels.hadamard import TileConfig, parse_variant

    try:
        parse_variant(variant, TileConfig())
    except PtqError as e:
        raise SystemExit(f"bench/hadamard.py: {e}") from None


def describe(cfg, rot) -> str:
    """A variant's configuration in the bench's own tokens."""
    mode = {0: "r2", 1: "r4", 2: "xor", 3: "rows"}[cfg.mode]
    if cfg.mode == 2 and cfg.xor_stages >= 0:
        mode += str(cfg.xor_stages)
    ilv = int(cfg.interleave and cfg.lanes > 1)
    extra = f" l{cfg.lanes} i{ilv}" if cfg.mode == 3 else f" g{cfg.mix_group}" if rot.m > 1 else ""
    return f"{mode} {cfg.elems}x{cfg.warps}{extra} q{int(cfg.lean)} c{int(cfg.pair_cvt)}"


def default_variants(rot) -> list[str]:
    """A short list per case: the default, the former default, the runners-up of the H100 measurement."""
    if rot.m > 1:
        return ["default", "q0", "c1", "r2"]
    if rot.p >= 512:
        return ["default", "xor5/q0", "xor5", "xor7", "c1", "r4"]
    return ["default", "r2/q0", "rows/l1", "rows/l1/c1", "rows/l2/i0", "rows/l2/i1", "rows/1024x1"]


def _time_eager_ms(fn, iters: int) -> float:
    """Host-inclusive: back-to-back eager launches timed with events (best of 3)."""
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(3):
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / iters)
    return best


def _time_graph_ms(fn, rep: int) -> float:
    """GPU time per call from CUDA-graph replay (median)."""
    import triton

    return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")


def _variant_row(x, rot, spec, v: str, expect, rep: int, iters: int):
    """(graph ms, eager ms, exact, config text) of one variant, or None where it does not apply to the rotation."""
    import torch

    from ptq.errors import PtqError
    from ptq.kernels.hadamard import rotate_fake_quantize

    cfg = variant_config(v, rot)
    try:
        got = rotate_fake_quantize(x, rot, spec, config=cfg)  # compiles; then the bit check
    except PtqError:
        return None  # e.g. MODE_ROWS for a rotation with a known-order factor
    exact = torch.equal(got.view(torch.int16), expect)
    tg = _time_graph_ms(lambda: rotate_fake_quantize(x, rot, spec, config=cfg), rep)
    te = _time_eager_ms(lambda: rotate_fake_quantize(x, rot, spec, config=cfg), iters)
    return tg, te, exact, describe(cfg, rot)


ROTS = {"full": ("full", None), "block32": ("block", 32), "block64": ("block", 64), "block128": ("block", 128)}


def kernels(quick: bool, variants: list[str] | None, dims: list[int] | None = None,
            rot_names: list[str] | None = None) -> None:
    import torch

    from ptq.formats import QuantSpec
    from ptq.hadamard import rotate_reference
    from ptq.kernels.hadamard import fusable, triton_rotate
    from ptq.modules.rotation import HadamardRotation
    from ptq.quantizers import fake_quantize

    dims = dims or ([576, 4096] if quick else [576, 1536, 4096, 8192])
    rots = [ROTS[r] for r in rot_names or (["full", "block32", "block64"] + ([] if quick else ["block128"]))]
    specs = [QuantSpec.mxint(4)] if quick else [QuantSpec.mxint(4), QuantSpec.mxfp("e2m1")]
    rep = 10 if quick else 25
    iters = 10 if quick else 20
    t_start = time.perf_counter()

    print(f"device: {torch.cuda.get_device_name()}; x = 8 x 2048 x dim, bf16; ms; 'graph' = CUDA-graph GPU time "
          f"(median), 'eager' = host-inclusive back-to-back launches")
    print()
    print("| dim | rotation | format | variant | config | graph | eager | graph / quantize | exact |")
    print("|---:|---|---|---|---|---:|---:|---:|:---:|")
    summary = []  # (case, t_quant_graph, t_quant_eager, t_default, t_unfused, best_variant, t_best, all_exact)
    for dim in dims:
        x = torch.randn(8, 2048, dim, device="cuda", dtype=torch.bfloat16)
        for kind, block in rots:
            if block is not None and dim % block:
                continue
            rot = HadamardRotation(dim, kind, block).cuda()
            for spec in specs:
                case = f"{dim} {kind}{'' if block is None else f' {block}'} {spec.name}"
                expect = fake_quantize(rotate_reference(x, dim, kind=kind, block_size=block), spec,
                                       backend="torch").view(torch.int16)
                tq = _time_graph_ms(lambda: fake_quantize(x, spec), rep)
                tqe = _time_eager_ms(lambda: fake_quantize(x, spec), iters)
                print(f"| {dim} | {case.split(' ', 1)[1].rsplit(' ', 1)[0]} | {spec.name} | quantize alone | - | "
                      f"{tq:.4f} | {tqe:.4f} | 1.00x | - |")
                unfused = _time_graph_ms(lambda: fake_quantize(triton_rotate(x, rot), spec), rep)
                print(f"| {dim} | | | rotate, then quantize (2 kernels) | - | {unfused:.4f} | - | "
                      f"{unfused / tq:.2f}x | - |")
                times = {}
                all_exact = True
                fused = "" if fusable(x, rot, spec) else " (NOT fused)"
                for v in variants or default_variants(rot):
                    row = _variant_row(x, rot, spec, v, expect, rep, iters)
                    if row is None:
                        continue
                    tg, te, exact, conf = row
                    all_exact &= exact
                    times[v] = tg
                    print(f"| {dim} | | | {v}{fused} | {conf} | {tg:.4f} | {te:.4f} | {tg / tq:.2f}x | "
                          f"{'yes' if exact else 'NO'} |", flush=True)
                tq2 = _time_graph_ms(lambda: fake_quantize(x, spec), rep)  # the spread of the baseline
                print(f"| {dim} | | | quantize alone, again | - | {tq2:.4f} | - | {tq2 / tq:.2f}x | - |")
                best = min(times, key=times.get)
                summary.append((case, tq, tqe, times.get("default", float("nan")), unfused, best, times[best],
                                all_exact))
        del x
        torch.cuda.empty_cache()

    print()
    print("| case | quantize graph | quantize eager | fused default | ratio | best variant | best | ratio | "
          "unfused ratio | exact |")
    print("|---|---:|---:|---:|---:|---|---:|---:|---:|:---:|")
    for case, tq, tqe, td, tu, bv, tb, ex in summary:
        print(f"| {case} | {tq:.4f} | {tqe:.4f} | {td:.4f} | {td / tq:.2f}x | {bv} | {tb:.4f} | {tb / tq:.2f}x | "
              f"{tu / tq:.2f}x | {'yes' if ex else 'NO'} |")
    rd = sorted(td / tq for _, tq, _, td, *_ in summary)
    rb = sorted(tb / tq for _, tq, _, _, _, _, tb, _ in summary)
    print(f"\nkernel table took {time.perf_counter() - t_start:.0f} s")
    print(f"best variants: {'; '.join(f'{c}: {bv}' for c, _, _, _, _, bv, _, _ in summary)}")
    print(f"fused / quantize-alone (best variant per case): median {rb[len(rb) // 2]:.2f}x, max {max(rb):.2f}x")
    print(f"fused / quantize-alone (CUDA-graph GPU time, default config): median {rd[len(rd) // 2]:.2f}x, "
          f"max {max(rd):.2f}x (target <= 1.2x); all bit-exact: {'yes' if all(s[-1] for s in summary) else 'NO'}")
    if not quick:
        rotate_table(dims)


def rotate_table(dims) -> None:
    import torch

    from ptq.hadamard import rotate_reference
    from ptq.kernels.hadamard import triton_rotate
    from ptq.modules.rotation import HadamardRotation

    try:
        import fast_hadamard_transform  # noqa: F401
        have_fht = True
    except ImportError:
        have_fht = False
    print()
    print("| dim | rotation | torch reference | triton | speed-up | exact |" + (" fast_hadamard_transform |"
                                                                             if have_fht else ""))
    print("|---:|---|---:|---:|---:|:---:|" + ("---:|" if have_fht else ""))
    for dim in dims + [14336, 32768]:
        x = torch.randn(8, 2048 if dim <= 8192 else 256, dim, device="cuda", dtype=torch.bfloat16)
        for kind, block in ([("full", None)] + ([] if dim > 8192 else [("block", 64)])):
            rot = HadamardRotation(dim, kind, block).cuda()
            exact = torch.equal(triton_rotate(x, rot).view(torch.int16),
                                rotate_reference(x, dim, kind=kind, block_size=block).view(torch.int16))
            tr = _time_graph_ms(lambda: rotate_reference(x, dim, kind=kind, block_size=block), 25)
            tt = _time_graph_ms(lambda: triton_rotate(x, rot), 25)
            row = f"| {dim} | {kind}{'' if block is None else f' {block}'} | {tr:.3f} | {tt:.3f} | {tr / tt:.1f}x | " \
                  f"{'yes' if exact else 'NO'} |"
            if have_fht:
                if rot.m == 1:
                    fht = HadamardRotation(dim, kind, block, backend="fast_hadamard_transform").cuda()
                    row += f" {_time_graph_ms(lambda: fht(x), 25):.3f} |"
                else:
                    row += " n/a (not a power of two) |"
            print(row)


def _compile_sm90(kernel, sig: dict, const: dict, warps: int) -> tuple[collections.Counter, int, int]:
    """(SASS opcode counts, shared-memory bytes, registers per thread) of a kernel compiled offline for sm_90."""
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ptq.kernels.mx_quant import EXACT_FP_OPTIONS

    sig = dict(sig, **{k: "constexpr" for k in const})
    attrs = {(i,): [["tt.divisibility", 16]] for i, (_, v) in enumerate(sig.items()) if v.startswith("*")}
    k = triton.compile(ASTSource(kernel, sig, const, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=warps, **EXACT_FP_OPTIONS))
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        text = subprocess.run([os.path.join(tools, "nvdisasm"), "-c", f.name], capture_output=True, text=True,
                              check=True).stdout
        res = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    ops = collections.Counter(m.group(1) for m in re.finditer(
        r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)", text))
    return ops, k.metadata.shared, int(re.search(r"REG:(\d+)", res).group(1))


def _quantize_alone_sass(spec) -> float:
    from ptq.kernels.mx_quant import EXACT_FP_OPTIONS, _fake_quant_kernel, _launch_constants

    lk = _launch_constants(spec, None)
    kw = {k: v for k, v in lk.kwargs.items() if k not in ("num_warps",) + tuple(EXACT_FP_OPTIONS)}
    kw.update(EVEN=True, FULL=True, OUT_KIND=1, USE_I64=False)
    sig = {"x_ptr": "*i16", "y_ptr": "*i16", "noise_ptr": "*i16", "g_ptr": "*i16", "total_blocks": "i32",
           "L": "i32", "NB": "i32"}
    warps = lk.kwargs["num_warps"]
    ops, _, regs = _compile_sm90(_fake_quant_kernel, sig, kw, warps)
    return sum(ops.values()) / (lk.bpp * lk.block_p2 / (32 * warps)), regs


def _variant_sass(rot, spec, cfg) -> dict:
    """Per-element SASS counts of the fused kernel a configuration launches (bf16 input, MXINT)."""
    import torch

    from ptq.kernels import hadamard as H

    kernel, t, meta = H.tile_meta(rot, spec, cfg, torch.bfloat16, gpu=True)
    const = {k: v for k, v in meta.items() if k not in ("num_warps", "enable_fp_fusion")}
    x_t = "*i32" if meta["IN_KIND"] == 2 else "*i16"
    if kernel is H._rows_kernel:
        sig = {"x_ptr": x_t, "y_ptr": "*i16", "noise_ptr": "*i16", "n_rows": "i32", "scale": "fp32"}
    else:
        sig = {"x_ptr": x_t, "s_ptr": "*fp32", "y_ptr": "*i16", "noise_ptr": "*i16", "n_flat": "i32",
               "scale": "fp32"}
    warps = meta["num_warps"]
    ops, smem, regs = _compile_sm90(kernel, sig, dict(const, USE_I64=False), warps)
    per = t * rot.p / (32 * warps)  # elements per thread
    return dict(n=sum(ops.values()) / per, smem=smem, regs=regs, bar=ops["BAR"] / per, shfl=ops["SHFL"] / per,
                lsts=(ops["LDS"] + ops["STS"] + ops["LDSM"] + ops["STSM"]) / per,
                local=(ops["LDL"] + ops["STL"]) / per, warps=warps)


def sass(quick: bool, variants: list[str] | None, dims: list[int] | None = None,
         rot_names: list[str] | None = None) -> None:
    """Offline: SASS instruction counts per element of every case / variant, compiled for sm_90."""
    from ptq.formats import QuantSpec
    from ptq.modules.rotation import HadamardRotation

    spec = QuantSpec.mxint(4)
    q, q_regs = _quantize_alone_sass(spec)
    print(f"quantize alone ({spec.name}, bf16): {q:.1f} SASS instructions per element, {q_regs} registers")
    print()
    print("| dim | rotation | variant | config | instr / element | vs quantize | registers | warps | smem bytes | "
          "BAR / elem | SHFL / elem | shared ld/st / elem | local ld/st / elem |")
    print("|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for dim in dims or ([576, 4096] if quick else [576, 1536, 4096, 8192]):
        for name in rot_names or (["full", "block32", "block64"] + ([] if quick else ["block128"])):
            kind, block = ROTS[name]
            if block is not None and dim % block:
                continue
            rot = HadamardRotation(dim, kind, block)
            for v in variants or default_variants(rot):
                cfg = variant_config(v, rot)
                if cfg.mode == 3 and rot.m > 1:
                    continue  # MODE_ROWS: m == 1 only
                c = _variant_sass(rot, spec, cfg)
                print(f"| {dim} | {name} | {v} | {describe(cfg, rot)} | {c['n']:.1f} | {c['n'] / q:.2f}x | "
                      f"{c['regs']} | {c['warps']} | {c['smem']} | {c['bar']:.2f} | {c['shfl']:.2f} | "
                      f"{c['lsts']:.2f} | {c['local']:.2f} |", flush=True)


def search(model_dir: str | None) -> None:
    import torch

    from ptq.models import load_model
    from ptq.passes.pipeline import quantize_module_transform_pass
    from ptq.recipe import load_recipe

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # the RTN recipe plus the [rotation_search] table of the rotation recipe (no GPTQ, no cache: always search)
    rs = load_recipe(os.path.join(root, "recipes", "w4a4kv4_gptq_rot.toml")).rotation_search
    rs = rs.model_copy(update={"cache_path": None})
    recipe = load_recipe(os.path.join(root, "recipes", "w4a4kv4.toml")).model_copy(update={"rotation_search": rs})
    model, tok = load_model(model_dir or os.environ.get("PTQ_SMOLLM2"), dtype=torch.bfloat16, device="cuda")
    t0 = time.perf_counter()
    model, info = quantize_module_transform_pass(model, recipe, tokenizer=tok, progress=False)
    total = time.perf_counter() - t0
    ri = info["rotation_search"]
    print(f"\nrotation search ({rs.calib_nsamples} x {rs.calib_seqlen} tokens, kind={rs.kind}, mode={rs.mode}): "
          f"{ri['seconds']:.1f} s for {ri['evaluations']} evaluations (pipeline {total:.1f} s; target < 120 s)")
    print(f"candidates: {ri['candidates']}\nchosen: {ri['chosen']}")
    print(f"calibration CE: baseline {ri['baseline_loss']:.4f} -> {[round(x, 4) for x in ri['round_losses']]}")
    for r in ri["rounds"]:
        trials = ", ".join(f"{k} {v:.4f}" for k, v in sorted(r["trials"].items(), key=lambda kv: kv[1]))
        print(f"  round {r['round']} on top of {r['base'] or '-'}: {trials} -> {r['chosen']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="dims 576 / 4096, MXINT4, fewer repetitions")
    ap.add_argument("--variants", default=None,
                    help="comma-separated variants for every case (default: a short list per case)")
    ap.add_argument("--dims", default=None, help="comma-separated hidden sizes (default: by --quick)")
    ap.add_argument("--rots", default=None, help="comma-separated rotations among " + ", ".join(ROTS)
                    + " (default: by --quick)")
    ap.add_argument("--search", action="store_true", help="also time the rotation search on SmolLM2-135M")
    ap.add_argument("--sass", action="store_true", help="offline (no GPU): SASS instruction counts per variant")
    ap.add_argument("--model", default=None, help="model directory for --search (default: $PTQ_SMOLLM2 or the "
                    "built-in default)")
    args = ap.parse_args(argv)
    variants = args.variants.split(",") if args.variants else None
    dims = [int(d) for d in args.dims.split(",")] if args.dims else None
    for v in variants or []:
        check_variant(v)
    rot_names = args.rots.split(",") if args.rots else None
    if any(r not in ROTS for r in rot_names or []):
        raise SystemExit(f"bench/hadamard.py: --rots takes {', '.join(ROTS)}")
    if args.sass:
        sass(args.quick, variants, dims, rot_names)
        return 0
    import torch

    if not torch.cuda.is_available():
        print("bench/hadamard.py: no CUDA device; nothing to measure.")
        return 0
    kernels(args.quick, variants, dims, rot_names)
    if args.search:
        search(args.model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
