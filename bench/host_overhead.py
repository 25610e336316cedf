"""Host cost per call of the fake-quantize path: where a small-batch forward spends its time on the CPU.

    PYTHONPATH=. python bench/host_overhead.py

Per-call host microseconds (a loop of calls on a tiny bf16 tensor, so the GPU is never the bottleneck; median of
5 loops) under inference_mode: torch.add (baseline), the bare Triton launch of the kernel, the public
``fake_quantize``, and `LinearMX` vs `nn.Linear` forwards at M = 16. Without CUDA the script says so and exits 0.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch


def host_us(fn, n: int = 2000) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    loops = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        loops.append((time.perf_counter() - t0) / n * 1e6)
        torch.cuda.synchronize()
    return statistics.median(loops)


def main() -> int:
    if not torch.cuda.is_available():
        print("bench/host_overhead.py: no CUDA device here; nothing measured.")
        return 0
    import ptq.kernels.mx_quant as mq
    from ptq.config import LinearQuantConfig
    from ptq.formats import QuantSpec
    from ptq.modules import LinearMX
    from ptq.quantizers import fake_quantize

    spec = QuantSpec.mxint(4)
    x = torch.randn(16, 576, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    k = mq._launch_constants(spec, None)
    rows, L = x.shape
    total = rows * (L // k.block)
    grid = (-(-total // k.bpp),)
    xi = x.view(torch.int16)
    args = (xi, y.view(torch.int16), xi, xi, total, L, L // k.block)
    consts = dict(EVEN=True, FULL=total % k.bpp == 0, OUT_KIND=mq._out_kind(xi, True, k), USE_I64=False, **k.kwargs)
    def launch():
        mq._fake_quant_kernel[grid](*args, **consts)

    lin = torch.nn.Linear(576, 576, bias=False, device="cuda", dtype=torch.bfloat16)
    mx = LinearMX.from_linear(lin, LinearQuantConfig(weight=spec, data_in=spec))
    with torch.inference_mode():
        rows_out = [
            ("torch.add (baseline)", host_us(lambda: torch.add(x, x))),
            ("kernel[grid](...) (Triton's launch alone)", host_us(launch)),
            ("fake_quantize(x, spec)", host_us(lambda: fake_quantize(x, spec))),
            ("LinearMX forward, 16 x 576", host_us(lambda: mx(x))),
            ("nn.Linear forward, 16 x 576", host_us(lambda: lin(x))),
        ]
    print(f"device: {torch.cuda.get_device_name()}; host microseconds per call (median of 5 loops of 2000)")
    print("| call | host us | x torch.add |")
    print("|---|---:|---:|")
    base = rows_out[0][1]
    for name, us in rows_out:
        print(f"| {name} | {us:.1f} | {us / base:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
