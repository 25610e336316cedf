"""A random orthogonal stand-in for HadamardRotation, for module tests that must not depend on ptq.hadamard."""

import torch
from torch import nn


class OrthoRotation(nn.Module):
    """rot(t) = t @ H^T on the last dim with a seeded random orthogonal H; inverse(t) = t @ H."""

    def __init__(self, n: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        self.register_buffer("H", q.to(torch.float32))

    def forward(self, t):
        return (t.float() @ self.H.T).to(t.dtype)

    def inverse(self, t):
        return (t.float() @ self.H).to(t.dtype)
