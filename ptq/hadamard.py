"""Hadamard matrices and the torch reference of the (normalised) Hadamard transform.

Sizes. A rotation of size ``n`` uses ``H_n = (H_m kron H_p) / sqrt(n)`` with ``p`` a power of two (Sylvester,
applied as a fast Walsh-Hadamard transform) and ``m`` either 1 or one of the known orders ``KNOWN_ORDERS``
(applied as a small +-1 matrix). ``n = m * p`` must factor that way; the odd part of ``n`` picks ``m``. How each
known order is built (all are checked ``H H^T = m I`` when built):

- Paley I (``q`` prime, ``q = 3 mod 4``, order ``q + 1``): 12 (q=11), 20 (q=19), 60 (q=59), 108 (q=107),
  140 (q=139).
- Paley II (``q`` prime, ``q = 1 mod 4``, order ``2(q + 1)``): 28 (q=13), 36 (q=17).
- Williamson array ``[[A, B, C, D], [-B, A, -D, C], [-C, D, A, -B], [-D, -C, B, A]]`` of four circulant +-1
  matrices with ``A A^T + B B^T + C C^T + D D^T = 4t I``: 52 (t=13), 156 (t=39), 172 (t=43). The first rows are
  published data (t=13 and t=43: Baumert and Hall, in M. Hall, "Combinatorial Theory", 1983; t=39: Londhe, 2013).
- 40 is 20 kron 2, i.e. the odd part 5 with a power of two, so it needs no matrix of its own.

Every order of the issue's list (12, 20, 28, 36, 40, 52, 60, 108, 140, 156, 172) is constructed. Other sizes raise
``ModelError`` naming the size and the block-diagonal alternative.

Exact operation order of the reference transform (the Triton kernels in ``ptq.kernels.hadamard`` follow it, so
both give the same fp32 bits). For a row ``x`` of length ``n = m * p`` in fp32, viewed as ``[m, p]``:

1. (``m > 1`` only) ``y[i] = s[i,0] x[0] + s[i,1] x[1] + ... + s[i,m-1] x[m-1]``, summed left to right
   (``s`` = the +-1 matrix: ``H_m`` for the forward rotation, ``H_m^T`` for the inverse). Products by +-1 are
   exact, so only the order of the additions matters.
2. Butterfly stages along ``p`` for ``h = 1, 2, 4, ..., p/2``: for each pair ``(a, b) = (y[k], y[k + h])`` with
   ``k mod 2h < h``: ``(a + b, a - b)``.
3. One multiply by ``scale = fp32(1 / sqrt(n))`` (exact when ``n`` is a power of 4).

The result is cast to the input dtype (round to nearest even). Block-diagonal rotations apply the same to every
block of ``block_size`` consecutive elements, with ``n = block_size``.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from ptq.errors import ModelError

# order -> (construction, parameter)
_CONSTRUCTIONS: dict[int, tuple[str, object]] = {
    12: ("paley1", 11),
    20: ("paley1", 19),
    28: ("paley2", 13),
    36: ("paley2", 17),
    52: ("williamson", 13),
    60: ("paley1", 59),
    108: ("paley1", 107),
    140: ("paley1", 139),
    156: ("williamson", 39),
    172: ("williamson", 43),
}
KNOWN_ORDERS: tuple[int, ...] = tuple(sorted(_CONSTRUCTIONS))
ISSUE_ORDERS: tuple[int, ...] = (12, 20, 28, 36, 40, 52, 60, 108, 140, 156, 172)

# First rows of circulant Williamson-type quadruples (published data; '+' = 1, '-' = -1).
_WILLIAMSON_ROWS: dict[int, tuple[str, str, str, str]] = {
    13: ("++++-+--+-+++", "+---+-++-+---", "++---+--+---+", "++---+--+---+"),
    39: ("+++--+-+-----+--++----++--+-----+-+--++", "+++--++-+---+-+--+----+--+-+---+-++--++",
         "++++---+--++----+-+--+-+----++--+---+++", "+---++-+-+-----+++-++-+++-----+-+-++---"),
    43: ("++---++++-+--+--++--------++--+--+-++++---+", "+++-+-++--+-+-++++-+----+-++++-+-+--++-+-++",
         "++-++++++----+-+--++-++-++--+-+----++++++-+", "+---++--++++-+-+++-++--++-+++-+-++++--++---"),
}


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _odd_part(n: int) -> int:
    while n % 2 == 0:
        n //= 2
    return n


def factor_size(n: int) -> tuple[int, int]:
    """``n -> (m, p)`` with ``n = m * p``, ``p`` a power of two and ``m`` 1 or a known order.

    Raises ModelError naming the size and the alternatives when ``n`` has no such factorisation."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ModelError(f"Hadamard size must be a positive integer, got {n!r}")
    if is_power_of_two(n):
        return 1, n
    odd = _odd_part(n)
    m = 4 * odd
    if m in _CONSTRUCTIONS and n % m == 0:
        return m, n // m
    raise ModelError(
        f"no Hadamard matrix of size {n}: supported sizes are powers of two and m * 2^k for m in "
        f"{', '.join(map(str, KNOWN_ORDERS))}; use a block-diagonal rotation instead (kind='block' with a "
        f"block_size that divides {n}, e.g. {largest_supported_block(n)})")


def is_supported_size(n: int) -> bool:
    try:
        factor_size(n)
    except ModelError:
        return False
    return True


def largest_supported_block(n: int, limit: int = 256) -> int:
    """The largest supported Hadamard size <= ``limit`` that divides ``n`` (1 if none)."""
    best = 1
    for b in range(2, min(n, limit) + 1):
        if n % b == 0 and (is_power_of_two(b) or (4 * _odd_part(b) in _CONSTRUCTIONS and b % (4 * _odd_part(b)) == 0)):
            best = b
    return best


def _legendre(q: int) -> list[int]:
    """Quadratic character of Z_q (q prime): chi[0] = 0, chi[a] = +-1."""
    squares = {(a * a) % q for a in range(1, q)}
    return [0] + [1 if a in squares else -1 for a in range(1, q)]


def _jacobsthal(q: int) -> torch.Tensor:
    chi = _legendre(q)
    idx = torch.arange(q)
    return torch.tensor(chi, dtype=torch.int64)[(idx[None, :] - idx[:, None]) % q]


def _paley1(q: int) -> torch.Tensor:
    # q = 3 mod 4: Q is skew; S = [[0, 1^T], [-1, Q]] is skew with S S^T = q I, and H = I + S.
    n = q + 1
    s = torch.zeros(n, n, dtype=torch.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return torch.eye(n, dtype=torch.int64) + s


def _paley2(q: int) -> torch.Tensor:
    # q = 1 mod 4: C = [[0, 1^T], [1, Q]] is a symmetric conference matrix; replace 0 by [[1,-1],[-1,-1]] and
    # +-1 by +-[[1,1],[1,-1]].
    n = q + 1
    c = torch.zeros(n, n, dtype=torch.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    plus = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
    zero = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int64)
    return torch.kron(c, plus) + torch.kron(torch.eye(n, dtype=torch.int64), zero)


def _circulant(row: torch.Tensor) -> torch.Tensor:
    t = row.numel()
    idx = torch.arange(t)
    return row[(idx[None, :] - idx[:, None]) % t]


def _williamson(t: int) -> torch.Tensor:
    a, b, c, d = (_circulant(torch.tensor([1 if ch == "+" else -1 for ch in s], dtype=torch.int64))
                  for s in _WILLIAMSON_ROWS[t])
    return torch.cat([
        torch.cat([a, b, c, d], 1),
        torch.cat([-b, a, -d, c], 1),
        torch.cat([-c, d, a, -b], 1),
        torch.cat([-d, -c, b, a], 1),
    ], 0)


@lru_cache(maxsize=None)
def _known_pm1(m: int) -> torch.Tensor:
    kind, param = _CONSTRUCTIONS[m]
    h = {"paley1": _paley1, "paley2": _paley2, "williamson": _williamson}[kind](param)  # type: ignore[operator]
    if h.shape != (m, m) or not torch.equal(h @ h.T, m * torch.eye(m, dtype=torch.int64)):
        raise AssertionError(f"internal error: the {kind} construction of order {m} is not a Hadamard matrix")
    return h.to(torch.int8)


def known_hadamard(m: int) -> torch.Tensor:
    """The +-1 (int8) Hadamard matrix of a known order ``m`` (unnormalised, ``H H^T = m I``)."""
    if m not in _CONSTRUCTIONS:
        raise ModelError(f"no stored Hadamard matrix of order {m}; known orders: {', '.join(map(str, KNOWN_ORDERS))}")
    return _known_pm1(m).clone()


def sylvester(p: int) -> torch.Tensor:
    """The +-1 (int8) Sylvester-Hadamard matrix of a power-of-two order ``p`` (natural / Walsh order)."""
    if not is_power_of_two(p):
        raise ModelError(f"Sylvester Hadamard matrices have power-of-two orders, got {p}")
    h = torch.ones(1, 1, dtype=torch.int64)
    base = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
    while h.shape[0] < p:
        h = torch.kron(base, h)
    return h.to(torch.int8)


def hadamard_matrix(n: int, *, normalized: bool = True, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The ``n x n`` Hadamard matrix ``H_m kron H_p`` (divided by sqrt(n) when ``normalized``: ``H H^T = I``).

    The same matrix the transform applies: ``rotate(x) == x @ hadamard_matrix(n).T`` up to rounding."""
    m, p = factor_size(n)
    pm = torch.kron(_pm1_or_one(m).to(torch.int64), sylvester(p).to(torch.int64))
    h = pm.to(dtype)
    return h / math.sqrt(n) if normalized else h


def _pm1_or_one(m: int) -> torch.Tensor:
    return torch.ones(1, 1, dtype=torch.int8) if m == 1 else _known_pm1(m)


def transform_scale(n: int) -> float:
    """The fp32 normalisation factor applied after the butterflies (as a Python float holding an fp32 value)."""
    return float(torch.tensor(1.0 / math.sqrt(n), dtype=torch.float32))


def fwht_reference(x: torch.Tensor, n: int, *, inverse: bool = False) -> torch.Tensor:
    """The reference transform of the last dim of ``x`` (length ``n``) in fp32, operation order as documented.

    Returns fp32 (``x`` must already be fp32 on entry for bit-level reproducibility; callers upcast)."""
    if x.shape[-1] != n:
        raise ModelError(f"Hadamard transform of size {n} got a tensor whose last dim is {x.shape[-1]}")
    m, p = factor_size(n)
    lead = x.shape[:-1]
    y = x.to(torch.float32).reshape(-1, m, p)
    if m > 1:
        s = _known_pm1(m).to(device=x.device, dtype=torch.float32)
        if inverse:
            s = s.T
        yt = y.transpose(0, 1).contiguous()  # [m, rows, p]: each term of the sum is one contiguous slab
        acc = s[:, 0].view(m, 1, 1) * yt[0]
        for j in range(1, m):
            acc.addcmul_(s[:, j].view(m, 1, 1), yt[j])  # acc + (+-1 * y_j): the product is exact, one rounding
        y = acc.transpose(0, 1)
    rows = y.shape[0] * m
    h = 1
    while h < p:
        v = y.reshape(rows, p // (2 * h), 2, h)
        a, b = v[:, :, 0, :], v[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    y = y.reshape(*lead, n) * transform_scale(n)
    return y


def rotate_reference(x: torch.Tensor, size: int, *, kind: str = "full", block_size: int | None = None,
                     inverse: bool = False) -> torch.Tensor:
    """Torch reference rotation of the last dim: ``x @ H^T`` (``inverse``: ``x @ H``) in fp32, cast back to
    ``x.dtype`` (round to nearest even). ``kind="block"``: block-diagonal with blocks of ``block_size``."""
    check_input(x, size)
    n = block_of(size, kind, block_size)
    xf = x.to(torch.float32)
    if n != size:
        xf = xf.reshape(*x.shape[:-1], size // n, n)
    y = fwht_reference(xf, n, inverse=inverse).reshape(x.shape)
    return y.to(x.dtype)


def block_of(size: int, kind: str, block_size: int | None) -> int:
    """The transform length: ``size`` (full) or ``block_size`` (block); validates the combination."""
    if kind == "full":
        factor_size(size)
        return size
    if kind != "block":
        raise ModelError(f"unknown Hadamard rotation kind {kind!r}; use 'full' or 'block'")
    if block_size is None:
        raise ModelError("a block-diagonal Hadamard rotation (kind='block') needs block_size")
    if size % block_size:
        raise ModelError(
            f"block-diagonal Hadamard: size {size} is not divisible by block_size {block_size}; "
            f"use a block_size dividing {size} (e.g. {largest_supported_block(size)}) or kind='full'")
    factor_size(block_size)
    return block_size


def check_input(x: torch.Tensor, size: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise ModelError(f"Hadamard rotation expects a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ModelError(f"Hadamard rotation needs a floating-point tensor, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != size:
        raise ModelError(
            f"Hadamard rotation of size {size} got a tensor of shape {tuple(x.shape)}: its last dim must be {size}")
