"""Bit-level comparison helpers and test data shared by the quantizer, codes and oracle tests."""

import torch

_INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # by element size


def ids(specs):
    return [str(s) for s in specs]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a tensor as a same-width integer view."""
    return t.view(_INT_VIEW[t.element_size()])


def assert_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    """Same dtype, shape and bits (NaN positions equal; -0 told from +0)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    finite = torch.isfinite(a)
    assert torch.equal(bits(a)[finite], bits(b)[finite])


def randn(gen: torch.Generator, *shape, spread: float = 1.0) -> torch.Tensor:
    """Gaussian values with a log-normal magnitude spread per element (heavy tails, mixed exponents)."""
    return torch.randn(*shape, generator=gen) * torch.exp(spread * torch.randn(*shape, generator=gen))
