"""Benchmark of the Triton MX kernels against the device copy bandwidth and the torch reference.

    PYTHONPATH=. python bench/kernels.py [--quick] [--json PATH] [--no-compile] [--budget-s 360]

For each format family (and the packed-code emitters) on shapes that include 8 x 2048 x 8192 bf16 (256 MiB): the
median over >= 20 timed batches of 5 back-to-back runs (CUDA events, warm-up first, L2 flushed per batch), the effective
bandwidth (bytes read + written, each tensor counted once), that bandwidth as a % of a device-to-device copy
(``y.copy_(x)`` on the same bytes) measured in the same run, the same % with every pass's bytes counted (NVFP4 reads
x twice: its global amax pass, then the quantize pass; 2 reads + 1 write), and the speed-up over the torch
reference, eager and under ``torch.compile`` (timed whether or not the compiled code reproduces the reference bit for
bit; a column says which: Inductor may turn a division into a reciprocal multiply). For NVFP4 the two passes are also
timed on their own. Every kernel
output is first checked bit for bit against the reference (output memory poisoned first). Tables are printed in
Markdown as they complete, so a run cut short still reports.

Expectations (the two numbers, worked out before any GPU run). Bytes: one read + one write of x, so 8x2048x8192
bf16 moves 512 MiB: ~0.18 ms at a 3.0 TB/s copy. Arithmetic: SASS compiled offline for sm_90 (triton 3.6) has,
per bf16 element, ~22 instructions for mxint, ~26-28 mxfp, ~25 mx6/mx9, ~50-57 int (one correctly rounded
division per element) and ~60 nvfp4 (division + bf16 rounding of arbitrary fp32 values); 128-bit loads/stores
throughout. At ~30 T thread-instructions/s (132 SMs x 128 lanes x ~1.75 GHz) memory speed allows ~40 per bf16
element, so mxint / mxfp / mx6 / mx9 should be memory-bound (>= 85% of copy), int and nvfp4 on bf16 are likely
issue-bound (~65-80% of copy); fp32 inputs (twice the bytes per element) leave every family memory-bound. NVFP4
also reads x once more for its global amax (counted in its time, not in the "% of copy" bytes), so its ceiling in
that column is 2/3 of copy (~67%); the "all passes" column counts that read: the amax pass is one read (~0.09 ms
here) plus a one-program finalize, no torch ops.
Per-element division: int and nvfp4 used a correctly rounded division per element (div_rn: a reciprocal, FCHK and
a branch to a slow path, ~12 instructions in a region the compiler cannot interleave with other elements). They now
multiply by a per-block reciprocal and correct twice with fused multiply-adds (``_triton_utils.div_exact``, exact,
proof in its docstring). SASS of the main path per bf16 element (offline, sm_90, tile 4096/8, div_rn slow paths
excluded): int4 sym 33.4 -> 26.9, int4 asym 39.6 -> 31.2, nvfp4 45.6 -> 34.5 (also: its block-scale division by the
tensor's 6 g against per-program constants, E2M1 / E4M3 rounding by a magic-number add, no prescale unless the
tensor is tiny); mxint4 22.5, mxfp4 28.0 for comparison. Measured on an H100 (same shape, copy 0.180 ms): int4
sym 0.265 -> 0.185 ms (68% -> 97% of copy), int4 asym 0.233 -> 0.197 ms (78% -> 92%), nvfp4 0.406 -> 0.315 ms
(all passes 67% -> 86%; amax pass 0.098 -> 0.094 ms, quantize pass 0.304 -> 0.216 ms).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch

from ptq.formats import QuantSpec

FAMILIES: dict[str, QuantSpec] = {
    "mxint8": QuantSpec.mxint(8),
    "mxint4": QuantSpec.mxint(4),
    "mxfp8_e4m3": QuantSpec.mxfp("e4m3"),
    "mxfp8_e5m2": QuantSpec.mxfp("e5m2"),
    "mxfp6_e2m3": QuantSpec.mxfp("e2m3"),
    "mxfp6_e3m2": QuantSpec.mxfp("e3m2"),
    "mxfp4_e2m1": QuantSpec.mxfp("e2m1"),
    "mx6": QuantSpec.mx6(),
    "mx9": QuantSpec.mx9(),
    "nvfp4": QuantSpec.nvfp4(),
    "int4_sym_g128": QuantSpec.int_(4, 128),
    "int4_asym_g128": QuantSpec.int_(4, 128, symmetric=False),
}
QUICK_FAMILIES = ("mxint4", "mxfp8_e4m3", "mxfp4_e2m1", "mx6", "nvfp4", "int4_sym_g128")
PACKED: dict[str, QuantSpec] = {
    "mxfp4": QuantSpec.mxfp("e2m1"),
    "nvfp4": QuantSpec.nvfp4(),
    "mxint4": QuantSpec.mxint(4),
    "mxint8": QuantSpec.mxint(8),
}
HEADLINE = ((8, 2048, 8192), torch.bfloat16)
EXTRA_SHAPES = (((8, 2048, 8192), torch.float32), ((4096, 4096), torch.bfloat16), ((16, 4096, 8192), torch.bfloat16))
TILES = ((2048, 4), (4096, 4), (4096, 8), (8192, 8), (16384, 16))


class Timer:
    """Median over ``n`` batches of the mean time (ms) of ``per`` back-to-back calls of ``fn``, timed with CUDA
    events after a warm-up; L2 is flushed before each batch. Back-to-back calls keep the host's launch overhead
    (Python, argument checks) off the device timeline, as in a real model, where the host runs ahead; the inputs
    timed are >= 64 MB, larger than the 50 MB L2, so later calls of a batch gain nothing from the cache."""

    def __init__(self, n: int, per: int, warmup: int):
        self.n, self.per, self.warmup = n, per, warmup
        self.flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.n)]
        for s, e in zip(starts, ends):
            self.flush.zero_()
            s.record()
            for _ in range(self.per):
                fn()
            e.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) / self.per for s, e in zip(starts, ends))


def random_input(shape, dtype) -> torch.Tensor:
    # Real data, never zeros: rows at different magnitudes, like activations.
    x = torch.randn(shape, device="cuda", dtype=torch.float32)
    x *= torch.exp2(torch.randint(-6, 7, (*shape[:-1], 1), device="cuda").float())
    return x.to(dtype)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    view = torch.int16 if a.element_size() == 2 else (torch.int32 if a.element_size() == 4 else torch.uint8)
    nan = torch.isnan(a) if a.is_floating_point() else torch.zeros_like(a, dtype=torch.bool)
    return bool(torch.equal(nan, torch.isnan(b) if b.is_floating_point() else nan)) and bool(
        torch.equal(a.view(view)[~nan], b.view(view)[~nan]))


def poisoned_call(fn, like: torch.Tensor):
    """Run ``fn`` right after freeing a NaN-filled block the size of its output, so memory the kernel fails to
    write shows up in the bit-exact check instead of holding a previous run's correct values."""
    poison = torch.full_like(like, float("nan")) if like.is_floating_point() else torch.full_like(like, 0x5A)
    del poison
    return fn()


def fmt(v, spec=".3f"):
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


class Report:
    def __init__(self, path: str | None):
        self.path, self.data = path, {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                      "tables": {}}

    def table(self, name: str, header: list[str]):
        self.data["tables"][name] = {"header": header, "rows": []}
        print(f"\n### {name}\n\n| " + " | ".join(header) + " |\n|" + "---|" * len(header), flush=True)

    def row(self, name: str, values: list):
        self.data["tables"][name]["rows"].append(values)
        print("| " + " | ".join(str(v) for v in values) + " |", flush=True)
        self.save()

    def save(self):
        if self.path:
            from ptq.io import atomic_write_json

            atomic_write_json(self.path, self.data)


def pass_bytes(spec: QuantSpec) -> float:
    """Bytes every pass moves, over one read + one write of x: NVFP4's amax pass reads x once more."""
    return 1.5 if spec.family == "nvfp4" else 1.0


def nvfp4_passes(rep: Report, timer: Timer, x: torch.Tensor, spec: QuantSpec, t_copy: float) -> None:
    """Time NVFP4's two passes on their own: the global amax (one read of x + a one-program finalize) and the
    quantize pass with that global scale given (one read + one write)."""
    from ptq.kernels.mx_quant import fake_quantize_2d, nvfp4_global_scale_fast

    x2 = x.reshape(-1, x.shape[-1])
    g = nvfp4_global_scale_fast(x2)
    t_amax = timer(lambda: nvfp4_global_scale_fast(x2))
    t_quant = timer(lambda: fake_quantize_2d(x2, spec, None, g))
    read = t_copy / 2  # a copy reads and writes the same bytes
    title = "NVFP4 passes, headline shape (ideal: a read at copy speed; read + write at copy speed)"
    rep.table(title, ["pass", "ms", "ideal ms", "% of copy speed"])
    rep.row(title, ["global amax (read x, finalize)", fmt(t_amax), fmt(read), f"{100 * read / t_amax:.1f}"])
    rep.row(title, ["quantize (read x, write y)", fmt(t_quant), fmt(t_copy), f"{100 * t_copy / t_quant:.1f}"])
    rep.row(title, ["both (2 reads + 1 write)", fmt(t_amax + t_quant), fmt(read + t_copy),
                    f"{100 * (read + t_copy) / (t_amax + t_quant):.1f}"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="headline shape, six families, fewer runs")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    ap.add_argument("--budget-s", type=float, default=360.0,
                    help="stop starting torch.compile runs after this many seconds (compiles are slow)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/kernels.py: no CUDA device here; the kernels are benchmarked on a GPU (nothing to do).")
        return 0

    import ptq.kernels as K
    from ptq.kernels.mx_quant import fake_quantize_2d
    from ptq.quantizers import pack_nibbles, quantize, reference_fake_quantize

    t0 = time.time()
    timer = Timer(n=20 if args.quick else 25, per=5, warmup=3)
    rep = Report(args.json)
    print(f"device: {rep.data['device']}, torch {torch.__version__}", flush=True)
    families = {k: v for k, v in FAMILIES.items() if not args.quick or k in QUICK_FAMILIES}

    # ---- headline shape: every family vs copy, eager reference, compiled reference -----------------------------
    shape, dtype = HEADLINE
    x = random_input(shape, dtype)
    nbytes = 2 * x.numel() * x.element_size()
    y = torch.empty_like(x)
    t_copy = timer(lambda: y.copy_(x))
    copy_gbs = nbytes / t_copy / 1e6
    rep.data["copy"] = {f"{shape} {dtype}": {"ms": t_copy, "GB/s": copy_gbs}}
    title = f"fake quantize, {'x'.join(map(str, shape))} {str(dtype).replace('torch.', '')} " \
            f"({x.numel() * x.element_size() / 2**20:.0f} MiB in); copy {t_copy:.3f} ms = {copy_gbs:.0f} GB/s"
    rep.table(title, ["format", "bit-exact", "triton ms", "GB/s", "% of copy", "% of copy, all passes", "eager ms",
                      "x eager", "compiled ms", "x compiled", "compiled bit-exact"])
    for name, spec in families.items():
        ref = reference_fake_quantize(x, spec)
        out = poisoned_call(lambda: K.triton_fake_quantize(x, spec), x)
        exact = bits_equal(out, ref)
        del out, ref
        t_tri = timer(lambda: K.triton_fake_quantize(x, spec))
        t_eager = timer(lambda: reference_fake_quantize(x, spec))
        t_comp, comp_exact = None, None
        if not args.no_compile and time.time() - t0 < args.budget_s:
            try:
                comp = torch.compile(lambda t, s=spec: reference_fake_quantize(t, s), dynamic=False)
                cref = comp(x)
                comp_exact = bits_equal(cref, reference_fake_quantize(x, spec))
                t_comp = timer(lambda: comp(x))
                del cref
            except Exception as exc:  # report, keep benchmarking the rest
                print(f"<!-- torch.compile failed for {name}: {type(exc).__name__}: {str(exc)[:200]} -->")
        gbs = nbytes / t_tri / 1e6
        all_pass = gbs * pass_bytes(spec)
        rep.row(title, [name, "yes" if exact else "NO", fmt(t_tri), f"{gbs:.0f}", f"{100 * gbs / copy_gbs:.1f}",
                        f"{100 * all_pass / copy_gbs:.1f}", fmt(t_eager), f"{t_eager / t_tri:.1f}", fmt(t_comp),
                        fmt(t_comp / t_tri if t_comp else None, ".2f"),
                        "n/a" if comp_exact is None else ("yes" if comp_exact else "no")])
        torch.compiler.reset()
    if "nvfp4" in families:
        nvfp4_passes(rep, timer, x, families["nvfp4"], t_copy)

    # ---- tile sweep on the headline shape ----------------------------------------------------------------------
    sweep = ("mxint4", "mxfp8_e4m3", "int4_sym_g128") if not args.quick else ("mxint4",)
    x2 = x.reshape(-1, shape[-1])
    title = "tile sweep (elements per program, warps), headline shape, GB/s"
    rep.table(title, ["format"] + [f"{e}/{w}" for e, w in TILES])
    for name in sweep:
        spec = FAMILIES[name]
        cells = []
        for tile in TILES:
            ok = bits_equal(poisoned_call(lambda: fake_quantize_2d(x2, spec, None, None, tile), x2),
                            reference_fake_quantize(x2, spec))
            t = timer(lambda: fake_quantize_2d(x2, spec, None, None, tile))
            cells.append(f"{nbytes / t / 1e6:.0f}" + ("" if ok else " (NOT EXACT)"))
        rep.row(title, [name] + cells)

    # ---- other shapes / dtypes: kernel vs copy -----------------------------------------------------------------
    if not args.quick:
        title = "other shapes: triton GB/s (% of copy of the same bytes)"
        names = list(families)
        rep.table(title, ["shape", "dtype", "copy GB/s"] + names)
        for shp, dt in EXTRA_SHAPES:
            del x2
            x = random_input(shp, dt)
            x2 = x.reshape(-1, shp[-1])
            y = torch.empty_like(x)
            nb = 2 * x.numel() * x.element_size()
            cg = nb / timer(lambda: y.copy_(x)) / 1e6
            cells = []
            for name in names:
                spec = families[name]
                gbs = nb / timer(lambda: K.triton_fake_quantize(x, spec)) / 1e6
                cells.append(f"{gbs:.0f} ({100 * gbs / cg:.0f}%)")
            rep.row(title, ["x".join(map(str, shp)), str(dt).replace("torch.", ""), f"{cg:.0f}"] + cells)
        del y
        x = random_input(shape, dtype)

    # ---- packed emitters ----------------------------------------------------------------------------------------
    title = f"packed codes + scales, {'x'.join(map(str, shape))} {str(dtype).replace('torch.', '')}"
    rep.table(title, ["format", "bit-exact", "triton ms (incl. host sync of the NaN/Inf check)",
                      "GB/s (x in + codes/scales out)", "% of copy", "reference ms", "x reference"])
    for name, spec in PACKED.items():
        def reference(spec=spec):
            q = quantize(x, spec)
            return (pack_nibbles(q.codes) if spec.width == 4 else q.codes), q.scales

        rc, rs = reference()
        p = K.triton_quantize_packed(x, spec)
        exact = bits_equal(p.codes, rc) and bits_equal(p.scales.view(torch.uint8), rs.view(torch.uint8))
        nb = x.numel() * x.element_size() + p.codes.numel() * p.codes.element_size() + p.scales.numel()
        del p, rc, rs
        t_tri = timer(lambda: K.triton_quantize_packed(x, spec))
        t_ref = timer(reference)
        gbs = nb / t_tri / 1e6
        rep.row(title, [name, "yes" if exact else "NO", fmt(t_tri), f"{gbs:.0f}", f"{100 * gbs / copy_gbs:.1f}",
                        fmt(t_ref), f"{t_ref / t_tri:.1f}"])
    print(f"\n(total {time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
