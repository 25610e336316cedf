"""Benchmark: fused Hadamard rotate + MX fake-quantize vs quantize alone, and the Triton FWHT vs the torch reference.

    PYTHONPATH=. python bench/hadamard.py [--quick] [--search] [--model DIR]

Activations of shape 8 x 2048 x {576, 1536, 4096, 8192} in bf16, MXINT4 / MXFP4 blocks of 32, rotations "full"
(the whole hidden dim; 576 = 36 x 16 and 1536 = 12 x 128 use the known orders) and block-diagonal 32 / 64 / 128.
Ratios are against `fake_quantize` alone measured in the same run (target: fused <= 1.2x). Every configuration is
first checked bit-exact against the torch reference. ``--search`` also times the rotation search of
``recipes/w4a4kv4_gptq_rot.toml`` (without GPTQ) on the model in ``--model`` / ``$PTQ_SMOLLM2`` and prints the chosen
types. Exits cleanly without CUDA.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _time_ms(fn, iters: int) -> float:
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


def kernels(quick: bool) -> None:
    import torch

    from ptq.formats import QuantSpec
    from ptq.hadamard import rotate_reference
    from ptq.kernels.hadamard import fusable, rotate_fake_quantize, triton_rotate
    from ptq.modules.rotation import HadamardRotation
    from ptq.quantizers import fake_quantize

    dims = [576, 4096] if quick else [576, 1536, 4096, 8192]
    rots = [("full", None), ("block", 32), ("block", 64), ("block", 128)]
    specs = [QuantSpec.mxint(4)] if quick else [QuantSpec.mxint(4), QuantSpec.mxfp("e2m1")]
    iters = 5 if quick else 20
    try:
        import fast_hadamard_transform  # noqa: F401
        have_fht = True
    except ImportError:
        have_fht = False

    print(f"device: {torch.cuda.get_device_name()}; x = 8 x 2048 x dim, bf16; times in ms (best of 3 x {iters})")
    print()
    print("| dim | rotation | format | quantize | rotate+quantize (fused?) | ratio | exact |")
    print("|---:|---|---|---:|---:|---:|:---:|")
    ratios = []
    for dim in dims:
        x = torch.randn(8, 2048, dim, device="cuda", dtype=torch.bfloat16)
        for kind, block in rots:
            if block is not None and dim % block:
                print(f"| {dim} | block {block} | - | - | n/a ({dim} is not a multiple of {block}) | - | - |")
                continue
            rot = HadamardRotation(dim, kind, block).cuda()
            for spec in specs:
                exact = torch.equal(rotate_fake_quantize(x, rot, spec).view(torch.int16),
                                    fake_quantize(rotate_reference(x, dim, kind=kind, block_size=block), spec,
                                                  backend="torch").view(torch.int16))
                tq = _time_ms(lambda: fake_quantize(x, spec), iters)
                tf = _time_ms(lambda: rotate_fake_quantize(x, rot, spec), iters)
                ratios.append(tf / tq)
                print(f"| {dim} | {kind}{'' if block is None else f' {block}'} | {spec.name} | {tq:.3f} | {tf:.3f} "
                      f"({'yes' if fusable(x, rot, spec) else 'no'}) | {tf / tq:.2f}x | {'yes' if exact else 'NO'} |")
    print(f"\nfused / quantize-alone: median {sorted(ratios)[len(ratios) // 2]:.2f}x, max {max(ratios):.2f}x "
          "(target <= 1.2x)")

    print()
    print("| dim | rotation | torch reference | triton | speed-up | triton radix-2 | exact |"
          + (" fast_hadamard_transform |" if have_fht else ""))
    print("|---:|---|---:|---:|---:|---:|:---:|" + ("---:|" if have_fht else ""))
    for dim in dims + ([] if quick else [14336, 32768]):
        x = torch.randn(8, 2048 if dim <= 8192 else 256, dim, device="cuda", dtype=torch.bfloat16)
        for kind, block in ([("full", None)] + ([] if dim > 8192 else [("block", 64)])):
            rot = HadamardRotation(dim, kind, block).cuda()
            exact = torch.equal(triton_rotate(x, rot).view(torch.int16),
                                rotate_reference(x, dim, kind=kind, block_size=block).view(torch.int16))
            tr = _time_ms(lambda: rotate_reference(x, dim, kind=kind, block_size=block), max(2, iters // 4))
            tt = _time_ms(lambda: triton_rotate(x, rot), iters)
            os.environ["PTQ_HADAMARD_RADIX"] = "2"  # one butterfly stage per register shuffle instead of two
            t2 = _time_ms(lambda: triton_rotate(x, rot), iters)
            os.environ.pop("PTQ_HADAMARD_RADIX")
            row = f"| {dim} | {kind}{'' if block is None else f' {block}'} | {tr:.3f} | {tt:.3f} | {tr / tt:.1f}x | " \
                  f"{t2:.3f} | {'yes' if exact else 'NO'} |"
            if have_fht:
                if rot.m == 1:
                    fht = HadamardRotation(dim, kind, block, backend="fast_hadamard_transform").cuda()
                    row += f" {_time_ms(lambda: fht(x), iters):.3f} |"
                else:
                    row += " n/a (not a power of two) |"
            print(row)


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
    ap.add_argument("--quick", action="store_true", help="fewer sizes and iterations")
    ap.add_argument("--search", action="store_true", help="also time the rotation search on SmolLM2-135M")
    ap.add_argument("--model", default=None, help="model directory for --search (default: $PTQ_SMOLLM2 or the "
                    "built-in default)")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench/hadamard.py: no CUDA device; nothing to measure.")
        return 0
    kernels(args.quick)
    if args.search:
        search(args.model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
