"""Launching a compiled Triton kernel without Triton's per-call argument binding.

``kernel[grid](*args, **constexprs)`` re-binds every argument, rebuilds the specialization key (pointer alignment,
integer divisibility, every constexpr) and looks the compiled kernel up on each call. For the MX kernels, which take
two dozen constexprs, that costs tens of microseconds of host time per launch, more than the GPU needs to quantize a
decode-step activation, so at small sizes the model's forward waits on Python instead of on memory.

`DirectLauncher` does the first launch for a given specialization the normal way (compiling if needed), keeps the
returned `CompiledKernel`, and afterwards calls its launcher directly with the arguments in signature order. Its own
cache key covers everything Triton specializes on for the argument kinds these kernels use: tensor dtypes and 16-byte
alignment of their data pointers, the integer class (i32 / u32 / i64 by value range) and the ``== 1`` and
``% 16 == 0`` properties of integers, and the constexprs and launch options (fixed per call site). Any other
argument kind, or the interpreter (``TRITON_INTERPRET=1``, where there is no compiled kernel), takes the normal path.
"""

from __future__ import annotations

import os

import torch
import triton


def _int_class(v: int) -> tuple:
    if -(2**31) <= v < 2**31:
        width = 0
    elif 2**31 <= v < 2**32:
        width = 1
    else:
        width = 2
    return (width, v == 1, v % 16 == 0)


def _arg_key(a) -> tuple | None:
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    if isinstance(a, bool):  # before int: bool is an int subclass, and Triton types it i1
        return ("b", a)
    if isinstance(a, int):
        return _int_class(a)
    if isinstance(a, float):
        return ("f",)
    return None  # anything else: let Triton handle it


class DirectLauncher:
    """Low-overhead launches of one ``@triton.jit`` function from one call site.

    ``launch(grid, args, constexprs)``: ``args`` are the runtime arguments in the kernel's order (the leading
    parameters), ``constexprs`` the remaining parameters and launch options by name (``num_warps`` ...). Results are
    those of ``fn[grid](*args, **constexprs)``.
    """

    def __init__(self, fn):
        self.fn = fn
        self._compiled: dict[tuple, tuple] = {}
        self._interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

    def launch(self, grid: tuple, args: tuple, constexprs: dict) -> None:
        if (self._interpret or not args or not isinstance(args[0], torch.Tensor) or not args[0].is_cuda
                or triton.knobs.runtime.launch_enter_hook is not None):  # profilers' hooks: the normal path
            self.fn[grid](*args, **constexprs)
            return
        arg_keys = tuple(_arg_key(a) for a in args)
        if None in arg_keys:
            self.fn[grid](*args, **constexprs)
            return
        device = args[0].device.index
        key = (device, arg_keys, tuple(constexprs.items()))
        hit = self._compiled.get(key)
        if hit is None:
            compiled = self.fn[grid](*args, **constexprs)
            names = self.fn.arg_names
            # the launcher takes every parameter in signature order (it skips the constexpr slots itself)
            rest = names[len(args):]
            init = getattr(compiled, "_init_handles", None)
            if init is None or any(n not in constexprs for n in rest):
                return  # a defaulted parameter or an unexpected compiled object: keep using the normal path
            init()  # loads the module and sets .function (lazily done by Triton's own launch)
            tail = tuple(constexprs[n] for n in rest)
            self._compiled[key] = (compiled, tail)
            return
        compiled, tail = hit
        g = grid + (1,) * (3 - len(grid))
        stream = torch.cuda.current_stream(args[0].device).cuda_stream
        compiled.run(g[0], g[1], g[2], stream, compiled.function, compiled.packed_metadata, None, None, None,
                     *args, *tail)
