"""``HadamardRotation``: an online orthonormal Hadamard rotation of a tensor's last dim.

``forward(t) = t @ H^T`` and ``inverse(t) = t @ H`` with ``H`` the normalised Hadamard matrix of
``ptq.hadamard.hadamard_matrix`` (full size, or block-diagonal with blocks of ``block_size``), so
``inverse(forward(t)) == t`` up to fp32 rounding. Computed in fp32, returned in the input dtype.

Backends: ``"torch"`` (the reference, ``ptq.hadamard.rotate_reference``), ``"triton"`` (bit-identical to it),
``"fast_hadamard_transform"`` (the optional CUDA package, power-of-two full sizes only; faster, but its summation
order differs, so results agree only to fp32 rounding). ``None`` / ``"auto"``: Triton for CUDA tensors, torch
elsewhere; the environment variable ``PTQ_BACKEND`` (auto|torch|triton) overrides the automatic choice, as it
does for ``ptq.quantizers.fake_quantize``.

The rotation is determined by ``(size, kind, block_size)``: it has no learned state and adds nothing to the state
dict (the small +-1 matrix of non-power-of-two sizes is a non-persistent int8 buffer, which ``.to(dtype)`` leaves
alone). ``config()`` returns the dict that rebuilds it: ``HadamardRotation(**rot.config())``.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ptq import hadamard as _h
from ptq.errors import ModelError, PtqError

BACKENDS = ("auto", "torch", "triton", "fast_hadamard_transform")


class HadamardRotation(nn.Module):
    """Orthonormal Hadamard rotation of the last dim (see the module docstring)."""

    def __init__(self, size: int, kind: str = "full", block_size: int | None = None, backend: str | None = None):
        super().__init__()
        if kind == "full" and block_size is not None and block_size != size:
            raise ModelError(f"kind='full' rotates all {size} elements; block_size={block_size} needs kind='block'")
        if backend is not None and backend not in BACKENDS:
            raise ModelError(f"unknown Hadamard backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.size = int(size)
        self.kind = kind
        self.n = _h.block_of(self.size, kind, block_size)  # validates size / kind / block_size
        self.block_size = self.n if kind == "block" else None
        self.backend = backend
        self.m, self.p = _h.factor_size(self.n)
        self.scale = _h.transform_scale(self.n)
        pm = _h.known_hadamard(self.m) if self.m > 1 else torch.ones(1, 1, dtype=torch.int8)
        self.register_buffer("pm1", pm, persistent=False)

    def config(self) -> dict:
        return {"size": self.size, "kind": self.kind, "block_size": self.block_size}

    def extra_repr(self) -> str:
        s = f"size={self.size}, kind={self.kind}"
        if self.kind == "block":
            s += f", block_size={self.block_size}"
        if self.m > 1:
            s += f", H={self.m}x{self.p}"
        return s

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The full ``size x size`` orthonormal matrix ``H`` (block-diagonal for kind='block')."""
        hb = _h.hadamard_matrix(self.n, dtype=dtype)
        if self.n == self.size:
            return hb
        return torch.block_diag(*([hb] * (self.size // self.n)))

    def resolve_backend(self, t: torch.Tensor) -> str:
        choice = self.backend or os.environ.get("PTQ_BACKEND", "auto") or "auto"
        if choice not in BACKENDS:
            raise PtqError(f"PTQ_BACKEND={choice!r} is not one of auto, torch, triton")
        if choice == "auto":
            return "triton" if t.is_cuda and _triton_available() else "torch"
        if choice == "triton" and not (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
            raise PtqError("Hadamard backend 'triton' needs a CUDA tensor (or TRITON_INTERPRET=1); "
                           "use backend='torch' on the CPU")
        if choice == "fast_hadamard_transform":
            if not t.is_cuda:
                raise PtqError("the fast_hadamard_transform backend needs a CUDA tensor; use backend='torch'")
            if self.m != 1:
                raise PtqError(f"the fast_hadamard_transform backend handles power-of-two sizes only, not "
                               f"{self.n}; use backend='triton'")
        return choice

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self._apply_rotation(t, inverse=False)

    def inverse(self, t: torch.Tensor) -> torch.Tensor:
        return self._apply_rotation(t, inverse=True)

    def _apply_rotation(self, t: torch.Tensor, inverse: bool) -> torch.Tensor:
        _h.check_input(t, self.size)
        backend = self.resolve_backend(t)
        if backend != "torch" and t.requires_grad and torch.is_grad_enabled():
            # the kernels have no autograd; H is orthogonal, so the gradient is the opposite rotation
            return _KernelRotation.apply(t, self, backend, inverse)
        return self._rotate_with(t, backend, inverse)

    def _rotate_with(self, t: torch.Tensor, backend: str, inverse: bool) -> torch.Tensor:
        if backend == "triton":
            from ptq.kernels.hadamard import triton_rotate

            return triton_rotate(t, self, inverse=inverse)
        if backend == "fast_hadamard_transform":
            return _fht_rotate(t, self)
        return _h.rotate_reference(t, self.size, kind=self.kind, block_size=self.block_size, inverse=inverse)


class _KernelRotation(torch.autograd.Function):
    """A kernel rotation ``y = t H^T`` (or ``t H``) with its exact backward ``g H`` (or ``g H^T``)."""

    @staticmethod
    def forward(ctx, t, rot, backend, inverse):
        ctx.rot, ctx.backend, ctx.inverse = rot, backend, inverse
        return rot._rotate_with(t.detach(), backend, inverse)

    @staticmethod
    def backward(ctx, grad):
        return ctx.rot._rotate_with(grad.contiguous(), ctx.backend, not ctx.inverse), None, None, None


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _fht_rotate(t: torch.Tensor, rot: HadamardRotation) -> torch.Tensor:
    # Sylvester matrices are symmetric, so forward and inverse are the same transform.
    try:
        from fast_hadamard_transform import hadamard_transform
    except ImportError as e:
        raise PtqError("backend 'fast_hadamard_transform' needs the optional package: "
                       "pip install fast-hadamard-transform (or use backend='triton')") from e
    x = t.to(torch.float32).reshape(-1, rot.n)
    y = hadamard_transform(x, scale=rot.scale)
    return y.reshape(t.shape).to(t.dtype)
