"""GPTQ on single weight matrices of Llama-3-8B shape: the per-block Triton kernel against the torch column loop.

    PYTHONPATH=. python bench/gptq_solve.py [--shapes qkv,o,gate_up,down] [--repeat 2]

Each row is one `gptq_quantize` call as the GPTQ pass makes it for recipes/w4a4kv4_gptq.toml (MXINT4 blocks of 32,
act-order, output clip search; the pass merges q/k/v and gate/up into one call each) on a random bf16-like weight
and the Hessian of random correlated inputs, on the GPU. Baseline, measured in the same run on the same inputs:
the torch loop of `ptq.gptq.core.block_columns` (the kernel disabled), some twenty launches per column. The table
reports seconds per call (best of --repeat after a warm-up), the ratio, and whether both give the same weights
(they compute the same arithmetic; the GPU's fp32 GEMM may round a rare tie differently between runs, so the
fraction of differing elements is printed rather than asserted).
"""

from __future__ import annotations

import argparse
import sys
import time
from unittest import mock

import torch

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def timed(fn, repeat: int) -> tuple[float, torch.Tensor]:
    fn()  # warm-up: Triton compiles, cuBLAS picks its kernels
    best, out = float("inf"), None
    for _ in range(repeat):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/gptq_solve.py: no CUDA device here (nothing measured)")
        return 0
    from ptq.formats import QuantSpec
    from ptq.gptq import gptq_quantize

    spec = QuantSpec.mxint(4)
    g = torch.Generator(device="cuda").manual_seed(0)
    print("| matrix | out x in | torch loop s | kernel s | x faster | differing elements |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in args.shapes.split(","):
        out_f, in_f = SHAPES[name]
        w = (torch.randn(out_f, in_f, device="cuda", generator=g) * 0.02).bfloat16().float()
        x = torch.randn(8192, in_f, device="cuda", generator=g)
        x = x + 0.5 * torch.randn(8192, 1, device="cuda", generator=g)
        h = 2.0 / x.shape[0] * (x.T @ x)

        def run():
            return gptq_quantize(w, h, spec, act_order=True, clip="output").weight

        fast_s, fast = timed(run, args.repeat)
        with mock.patch("ptq.kernels.gptq_block.kernel_mode", return_value=None):
            slow_s, slow = timed(run, args.repeat)
        diff = float((fast != slow).float().mean())
        print(f"| {name} | {out_f} x {in_f} | {slow_s:.3f} | {fast_s:.3f} | {slow_s / fast_s:.1f} | {diff:.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
