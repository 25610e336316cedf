"""Host cost of launching the MX fake-quantize kernel: Triton's normal launch vs `ptq.kernels.launch.DirectLauncher`.

    PYTHONPATH=. python bench/launch.py

Per-call host microseconds (a loop of launches on a tiny bf16 tensor, so the GPU is never the bottleneck; median of
5 loops): torch.add (baseline), the kernel through ``kernel[grid](...)``, the same kernel through DirectLauncher,
the public ``fake_quantize`` and a `LinearMX` forward at M = 16. Also checks that both launch paths write the same
bits. Without CUDA the script says so and exits 0.
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
        print("bench/launch.py: no CUDA device here; nothing measured.")
        return 0
    import ptq.kernels.mx_quant as mq
    from ptq.config import LinearQuantConfig
    from ptq.formats import QuantSpec
    from ptq.kernels.launch import DirectLauncher
    from ptq.modules import LinearMX
    from ptq.quantizers import fake_quantize

    spec = QuantSpec.mxint(4)
    x = torch.randn(16, 576, device="cuda", dtype=torch.bfloat16)
    y_normal, y_direct = torch.empty_like(x), torch.empty_like(x)
    k = mq._launch_constants(spec, None)
    rows, L = x.shape
    total = rows * (L // k.block)
    grid = (-(-total // k.bpp),)
    xi = x.view(torch.int16)
    args_n = (xi, y_normal.view(torch.int16), xi, xi, total, L, L // k.block)
    args_d = (xi, y_direct.view(torch.int16), xi, xi, total, L, L // k.block)
    consts = dict(EVEN=True, FULL=total % k.bpp == 0, OUT_KIND=mq._out_kind(xi, True, k), USE_I64=False, **k.kwargs)
    direct = DirectLauncher(mq._fake_quant_kernel)

    def normal_launch():
        mq._fake_quant_kernel[grid](*args_n, **consts)

    def direct_launch():
        direct.launch(grid, args_d, consts)

    lin = torch.nn.Linear(576, 576, bias=False, device="cuda", dtype=torch.bfloat16)
    mx = LinearMX.from_linear(lin, LinearQuantConfig(weight=spec, data_in=spec))
    rows_out = [
        ("torch.add (baseline)", host_us(lambda: torch.add(x, x))),
        ("kernel[grid](...) (Triton's launch)", host_us(normal_launch)),
        ("DirectLauncher.launch", host_us(direct_launch)),
        ("fake_quantize(x, spec)", host_us(lambda: fake_quantize(x, spec))),
        ("LinearMX forward, 16 x 576", host_us(lambda: mx(x))),
        ("nn.Linear forward, 16 x 576", host_us(lambda: lin(x))),
    ]
    torch.cuda.synchronize()
    same = torch.equal(y_normal.view(torch.int16), y_direct.view(torch.int16))
    print(f"device: {torch.cuda.get_device_name()}; host microseconds per call (median of 5 loops of 2000)")
    print("| call | host us | x torch.add |")
    print("|---|---:|---:|")
    base = rows_out[0][1]
    for name, us in rows_out:
        print(f"| {name} | {us:.1f} | {us / base:.1f} |")
    print(f"direct launch writes the same bits as Triton's launch: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
