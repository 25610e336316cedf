"""CPU speed of GPTQ and of the quick table, before and after the CPU work of issue 16, measured in one run.

    PYTHONPATH=. python bench/cpu_table.py [--layers N] [--table] [--baseline-table]

GPTQ: the shipped ``w4a4kv4_gptq.toml`` (MXINT4 W/A/KV, act-order, output clip search) on the built-in SmolLM2-135M
(fp32, CPU), calibration 32 x 512 tokens of the embedded WikiText-2 validation text, all 30 decoder layers unless
``--layers N`` keeps the first N (the baseline needs ~1-2 min per layer on a busy machine). Each variant runs in
its own process:

- ``before``: the code paths as they were: OpenMP's default (spinning) wait policy, the reference quantizers
  building their ``isfinite`` masks on every call, MXINT's +0 by compare-and-where.
- ``after``: this checkout as ``ptq`` runs it (the CLI sets ``OMP_WAIT_POLICY=PASSIVE`` unless the user set it).

Both must give bit-identical quantized weights (sha256 over every parameter and buffer; printed). Times: wall
seconds and process CPU seconds (user + system, all threads): on a machine shared with other work the CPU column is
the steadier one, so the load average is printed too.

``--table`` also times ``ptq table --quick`` (the three shipped recipes on the built-in model; after only, and with
``--baseline-table`` before as well, which takes far longer).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ the old paths
def _use_old_paths() -> None:
    """Put back the quantizer code paths of before the CPU work (same numbers, more passes over each tensor)."""
    import torch

    import ptq.quantizers.common as common
    import ptq.quantizers.mx as mx

    def never_sure(x):  # every caller then takes its isfinite-mask path, as all of them did before
        return False

    def old_mxint_elements(v, spec, noise=None, rounding=None):
        rounding = rounding or spec.rounding
        frac = float(1 << spec.mxint_frac_bits)
        m = torch.clamp(common.round_magnitude(v.abs() * frac, rounding, noise), max=float(spec.int_levels))
        m = torch.where(m > 0, torch.copysign(m, v), torch.zeros_like(m))
        return m / frac

    common.surely_finite = never_sure
    mx.surely_finite = never_sure
    mx.mxint_elements = old_mxint_elements


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ------------------------------------------------------------------------------------------------- children
def child_gptq(layers: int | None) -> dict:
    import torch

    import ptq
    from ptq.io import digest_tensors
    from ptq.passes.pipeline import quantize_module_transform_pass
    from ptq.recipe import load_recipe

    model, tok = ptq.load_model(None, dtype="float32", device="cpu")
    if layers is not None:
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
    recipe = load_recipe(ROOT / "recipes" / "w4a4kv4_gptq.toml")
    with tempfile.TemporaryDirectory(prefix="ptq-bench-cpu-") as ck:
        gcfg = recipe.gptq.model_copy(update={"checkpoint_dir": ck, "nsamples": 32, "seqlen": 512})
        recipe = recipe.model_copy(update={"gptq": gcfg})
        t0, c0 = time.perf_counter(), _cpu_seconds()
        model, info = quantize_module_transform_pass(model, recipe, tokenizer=tok, device="cpu", progress=False)
        wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    named = sorted(list(model.state_dict().items()), key=lambda kv: kv[0])
    g = info["gptq"]
    return {"wall": wall, "cpu": cpu, "layers": g["layers"], "phases": g.get("time_breakdown", {}),
            "digest": digest_tensors(named), "threads": torch.get_num_threads()}


def child_table(out: str) -> dict:
    from ptq.cli import main

    t0, c0 = time.perf_counter(), _cpu_seconds()
    rc = main(["table", "--quick", "--out", out, "--no-plot", "--no-progress"])
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    report = json.loads((Path(out) / "table.json").read_text())
    return {"wall": wall, "cpu": cpu, "rc": rc, "rows": [(r["label"], r.get("ppl"), r.get("quantize_seconds"))
                                                          for r in report["rows"]]}


def run_child(variant: str, what: str, extra: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("OMP_WAIT_POLICY", None)
    if variant == "after":
        env["OMP_WAIT_POLICY"] = "PASSIVE"  # what ptq.cli sets
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", what, "--variant", variant, *extra]
    load0 = os.getloadavg()[0]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"bench/cpu_table.py: the {variant} {what} run failed")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["load"] = (load0, os.getloadavg()[0])
    return result


# --------------------------------------------------------------------------------------------------- report
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=None, help="GPTQ on the first N decoder layers only")
    p.add_argument("--table", action="store_true", help="also time `ptq table --quick` (after)")
    p.add_argument("--baseline-table", action="store_true", help="and the quick table before (slow)")
    p.add_argument("--skip-gptq", action="store_true")
    p.add_argument("--child", choices=("gptq", "table"), help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=("before", "after"), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        if args.variant == "before":
            _use_old_paths()
        res = child_gptq(args.layers) if args.child == "gptq" else child_table(args.out)
        print(json.dumps(res))
        return 0

    print(f"bench/cpu_table.py: {os.cpu_count()} CPUs, load average at start {os.getloadavg()} "
          f"(other work on this machine shares them)", flush=True)
    rows = []
    if not args.skip_gptq:
        extra = ["--layers", str(args.layers)] if args.layers else []
        res = {v: run_child(v, "gptq", extra) for v in ("before", "after")}
        n = res["after"]["layers"]
        same = res["before"]["digest"] == res["after"]["digest"]
        rows.append((f"GPTQ, {n} layers, 32 x 512 tokens", res))
        print(f"quantized weights bit-identical before / after: {'yes' if same else 'NO'} "
              f"(sha256 {res['after']['digest'][:16]})")
        for v in ("before", "after"):
            ph = ", ".join(f"{k} {x:.1f}" for k, x in res[v]["phases"].items())
            print(f"  {v:<6} phases (wall s): {ph}")
        if not same:
            print("bench/cpu_table.py: the two variants disagree", file=sys.stderr)
    if args.table or args.baseline_table:
        res = {}
        for v in (("before", "after") if args.baseline_table else ("after",)):
            with tempfile.TemporaryDirectory(prefix="ptq-bench-table-") as out:
                res[v] = run_child(v, "table", ["--out", out])
        rows.append(("ptq table --quick (4 rows)", res))
        for label, ppl, qs in res["after"]["rows"]:
            print(f"  quick table row {label:<18} ppl {ppl if ppl is None else round(ppl, 3)}  quantize s "
                  f"{qs if qs is None else round(qs, 1)}")

    print(f"\n{'what':<34}{'before wall s':>14}{'after wall s':>13}{'ratio':>7}{'before cpu s':>14}"
          f"{'after cpu s':>12}{'ratio':>7}  load (start, end)")
    for what, res in rows:
        a = res["after"]
        b = res.get("before")
        bw = f"{b['wall']:>14.1f}" if b else f"{'-':>14}"
        bc = f"{b['cpu']:>14.1f}" if b else f"{'-':>14}"
        rw = f"{b['wall'] / a['wall']:>6.1f}x" if b else f"{'-':>7}"
        rc = f"{b['cpu'] / a['cpu']:>6.1f}x" if b else f"{'-':>7}"
        loads = "; ".join(f"{v} {r['load'][0]:.1f}, {r['load'][1]:.1f}" for v, r in res.items())
        print(f"{what:<34}{bw}{a['wall']:>13.1f}{rw}{bc}{a['cpu']:>12.1f}{rc}  {loads}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
