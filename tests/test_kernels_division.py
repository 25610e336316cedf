"""The kernels' exact division (``div_exact`` / ``fma_rn`` in ``ptq.kernels._triton_utils``) and the INT / NVFP4
fake quantization built on it, on random and adversarial inputs.

``div_exact`` replaces a correctly rounded division per element by a multiply and four fused multiply-adds against
a per-block reciprocal; its docstring proves it returns fl(a / d). These tests check that claim where it can fail:
quotients next to fp32 rounding midpoints (where Markstein's correction step decides), next to the half-integer
boundaries of integer rounding and the E2M1 midpoints (where the element rounding decides), exact ties, divisors
with a mantissa near 2 (the tightest case of the proof), subnormal, huge and zero divisors. On the CPU they run
under TRITON_INTERPRET=1, where ``fma_rn`` is emulated in fp64; the ``gpu`` tests repeat them on CUDA, where it is
the hardware FFMA, on many more inputs.
"""

from __future__ import annotations

import os
from fractions import Fraction

import pytest
import torch

from ptq.formats import QuantSpec

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import ptq.kernels as K  # noqa: E402
from ptq.kernels._triton_utils import div_exact, divisor_consts, fma_rn  # noqa: E402
from ptq.kernels.mx_quant import EXACT_FP_OPTIONS  # noqa: E402
from ptq.quantizers import reference_fake_quantize  # noqa: E402
from ptq.quantizers.nvfp4 import nvfp4_block_scales, nvfp4_global_scale  # noqa: E402
from bitcheck import bits  # noqa: E402

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if CUDA and not INTERPRET else "cpu"
if not CUDA and not INTERPRET:
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1: the kernels cannot run here", allow_module_level=True)

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DT_IDS = ["fp32", "bf16", "fp16"]
TINY_Q = 2.0 ** -80  # below this div_exact only promises a result under 2^-26 in magnitude
E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


# ---- element-wise kernels around the helpers -------------------------------------------------------------------------
@triton.jit
def _div_kernel(a_ptr, d_ptr, out_ptr, n, ZERO_DIVISOR: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    a = tl.load(a_ptr + offs, mask=m, other=0.0)
    d = tl.load(d_ptr + offs, mask=m, other=1.0)
    p, nds, r = divisor_consts(d)
    tl.store(out_ptr + offs, div_exact(a, p, nds, r, ZERO_DIVISOR), mask=m)


@triton.jit
def _fma_kernel(x_ptr, y_ptr, z_ptr, out_ptr, n, PLAIN: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0.0)
    y = tl.load(y_ptr + offs, mask=m, other=0.0)
    z = tl.load(z_ptr + offs, mask=m, other=0.0)
    if PLAIN:
        out = tl.fma(x, y, z)
    else:
        out = fma_rn(x, y, z)
    tl.store(out_ptr + offs, out, mask=m)


def _block() -> int:
    return 4096 if DEVICE == "cuda" else 1 << 16  # the interpreter runs programs one after another


def run_div(a: torch.Tensor, d: torch.Tensor, zero_divisor: bool = False) -> torch.Tensor:
    a, d = a.float().contiguous().to(DEVICE), d.float().contiguous().to(DEVICE)
    out = torch.empty_like(a)
    _div_kernel[(triton.cdiv(a.numel(), _block()),)](a, d, out, a.numel(), ZERO_DIVISOR=zero_divisor,
                                                      BLOCK=_block(), **EXACT_FP_OPTIONS)
    return out.cpu()


def run_fma(x, y, z, plain: bool = False) -> torch.Tensor:
    x, y, z = (t.float().contiguous().to(DEVICE) for t in (x, y, z))
    out = torch.empty_like(x)
    _fma_kernel[(triton.cdiv(x.numel(), _block()),)](x, y, z, out, x.numel(), PLAIN=plain, BLOCK=_block(),
                                                      **EXACT_FP_OPTIONS)
    return out.cpu()


# ---- inputs ----------------------------------------------------------------------------------------------------------
def fresh_generator() -> tuple[int, torch.Generator]:
    seed = int.from_bytes(os.urandom(4), "little")
    return seed, torch.Generator().manual_seed(seed)


def ulp_steps(v: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``v`` moved by ``k`` (integer tensor, |k| <= 4) units in the last place of its own dtype: away from zero for
    k > 0 (zeros towards +inf), towards zero for k < 0."""
    away = torch.where(v < 0, -float("inf"), float("inf")).to(v.dtype)
    out = v.clone()
    for step in range(1, 5):
        out = torch.where(k >= step, torch.nextafter(out, away), out)
        out = torch.where(k <= -step, torch.nextafter(out, torch.zeros_like(out)), out)
    return out


def random_fp32(gen: torch.Generator, n: int, lo: int, hi: int) -> torch.Tensor:
    """Positive fp32 values: uniform random 24-bit mantissas, exponents in [lo, hi] (subnormal below -126)."""
    mant = torch.randint(1 << 23, 1 << 24, (n,), generator=gen, dtype=torch.int64).double()
    e = torch.randint(lo, hi + 1, (n,), generator=gen, dtype=torch.int64).double()
    return (mant * torch.exp2(e - 23)).float()


def divisors(gen: torch.Generator, n: int, lo: int = -149, hi: int = 127) -> torch.Tensor:
    """Random divisors, a quarter of them with a mantissa within a few ulps of 2 (the proof's tightest case) and
    an eighth with few significant bits (many exact quotients and ties)."""
    d = random_fp32(gen, n, lo, hi)
    e = torch.randint(lo, hi + 1, (n,), generator=gen).double()
    near2 = ((2.0 - torch.randint(1, 9, (n,), generator=gen).double() * 2.0 ** -23) * torch.exp2(e)).float()
    few = (torch.randint(1, 256, (n,), generator=gen).double() * torch.exp2(e - 7)).float()
    pick = torch.rand(n, generator=gen)
    d = torch.where(pick < 0.25, near2, torch.where(pick < 0.375, few, d))
    d = torch.where(d > 0, d, torch.full_like(d, 2.0 ** -149))
    return torch.where(torch.isfinite(d), d, torch.full_like(d, 2.0 ** 127))


def near_targets(gen: torch.Generator, d: torch.Tensor, target: torch.Tensor, spread: int = 3) -> torch.Tensor:
    """Dividends a with a / d within a few ulps of ``target`` (float64, exactly representable times d in fp64)."""
    a = (target * d.double()).float()
    return ulp_steps(a, torch.randint(-spread, spread + 1, a.shape, generator=gen))


def midpoint_targets(gen: torch.Generator, n: int) -> torch.Tensor:
    """Midpoints between consecutive fp32 numbers (25 significant bits), where the last correction decides."""
    y = random_fp32(gen, n, -60, 60).double()
    ulp = torch.exp2(torch.floor(torch.log2(y)) - 23)
    return y + ulp / 2


def boundary_targets(gen: torch.Generator, n: int, centres: torch.Tensor) -> torch.Tensor:
    """The element roundings' decision points: half-integers / E2M1 midpoints ``centres`` themselves and the fp32
    midpoints on either side of them (fl(q) == centre exactly when q lies between those)."""
    c = centres[torch.randint(0, centres.numel(), (n,), generator=gen)]
    half_ulp = torch.exp2(torch.floor(torch.log2(c)) - 24)
    below = torch.where(c == torch.exp2(torch.floor(torch.log2(c))), half_ulp / 2, half_ulp)
    which = torch.randint(0, 3, (n,), generator=gen)
    return torch.where(which == 0, c, torch.where(which == 1, c + half_ulp, c - below))


def _inverse_mod_pow2(v: torch.Tensor, s: int) -> torch.Tensor:
    """v^-1 mod 2^s for odd int64 ``v`` < 2^25 (Newton: each step doubles the correct low bits; products < 2^50)."""
    mask = (1 << s) - 1
    x = v.clone()
    for _ in range(5):
        x = (x * ((2 - v * x) & mask)) & mask
    return x


def hard_pairs(gen: torch.Generator, n: int, midpoints: torch.Tensor | None = None,
               exp_range: int = 60) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, d) fp32 pairs whose quotient lies within j * 2^(e-47) / m (|j| <= 31 odd; the proof's quantum) of an
    fp32 rounding midpoint: the cases where only an exact last step rounds right, about 2^-20 of random pairs.
    ``midpoints``: the 25-bit midpoints to aim at (float64, e.g. half-integers +- half an ulp), else random ones.

    With mu = M 2^(e-24) (M odd, 25 bits), d = D 2^(g-23) and a = A 2^(s+e+g-47): a / d = mu + j 2^(e+g-47) / d
    exactly when A 2^s = M D + j, i.e. M D = -j (mod 2^s), solved for the free one of M, D (s = 24 or 25, so that A
    has 24 bits whether or not M D carries)."""
    j = (torch.randint(0, 16, (n,), generator=gen) * 2 + 1) * torch.where(torch.rand(n, generator=gen) < 0.5, -1, 1)
    if midpoints is None:
        D = torch.randint(1 << 22, 1 << 23, (n,), generator=gen) * 2 + 1
        e = torch.randint(-exp_range, exp_range + 1, (n,), generator=gen)
    else:
        mu = midpoints[torch.randint(0, midpoints.numel(), (n,), generator=gen)]
        e = torch.floor(torch.log2(mu)).long()
        M = (mu * torch.exp2(24.0 - e.double())).long()
        assert bool(((M & 1) == 1).all()), "midpoints need 25 significant bits"
    a_parts, d_parts = [], []
    for s in (24, 25):
        mask = (1 << s) - 1
        if midpoints is None:
            Ms = ((-j) * _inverse_mod_pow2(D, s)) & mask
            Ms = Ms + (1 << 24) if s == 24 else Ms
            Ds = D
        else:
            Ms = M
            Ds = ((-j) * _inverse_mod_pow2(M, s)) & mask
        A = (Ms * Ds + j) >> s
        ok = (Ms >= 1 << 24) & (Ms < 1 << 25) & (Ds >= 1 << 23) & (Ds < 1 << 24) & (A >= 1 << 23) & (A < 1 << 24)
        g = torch.randint(-exp_range, exp_range + 1, (n,), generator=gen)
        d_parts.append((Ds.double() * torch.exp2(g.double() - 23)).float()[ok])
        a_parts.append((A.double() * torch.exp2((s + e + g - 47).double())).float()[ok])
    return torch.cat(a_parts), torch.cat(d_parts)


def boundary_midpoints(centres: list[float]) -> torch.Tensor:
    """The fp32 midpoints on either side of each centre (fl(q) == centre exactly between them)."""
    c = torch.tensor(centres, dtype=torch.float64)
    half_ulp = torch.exp2(torch.floor(torch.log2(c)) - 24)
    below = torch.where(c == torch.exp2(torch.floor(torch.log2(c))), half_ulp / 2, half_ulp)
    return torch.cat([c + half_ulp, c - below])


def quotient_cases(gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, d) pairs: random over the whole range, near fp32 midpoints, near integer-rounding and E2M1 boundaries."""
    parts = []
    d = divisors(gen, n)
    # quotients 2^-90 .. 2^90 over every divisor exponent (div_exact covers |q| < 2^100)
    e_d = torch.floor(torch.log2(d.double()))
    j = torch.randint(-90, 91, (n,), generator=gen).double()
    a = (torch.randint(1 << 23, 1 << 24, (n,), generator=gen).double() * torch.exp2(e_d + j - 23)).float()
    a = torch.where(torch.isfinite(a) & (a > 0), a, torch.ones_like(a))
    parts.append((a, d))
    d = divisors(gen, n, -100, 100)
    parts.append((near_targets(gen, d, midpoint_targets(gen, n)), d))
    half_integers = torch.arange(0, 400, dtype=torch.float64) + 0.5
    for centres in (half_integers, torch.tensor(E2M1_MIDPOINTS + (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0),
                                                dtype=torch.float64)):
        d = divisors(gen, n)
        target = boundary_targets(gen, n, centres)
        parts.append((near_targets(gen, d, target), d))
        parts.append((near_targets(gen, d, target, spread=0), d))  # exact ties where b * d is representable
    parts.append(hard_pairs(gen, n))
    parts.append(hard_pairs(gen, n, boundary_midpoints([k + 0.5 for k in range(300)] + list(E2M1_MIDPOINTS))))
    a = torch.cat([p[0] for p in parts])
    d = torch.cat([p[1] for p in parts])
    sign = torch.where(torch.rand(a.shape, generator=gen) < 0.5, -1.0, 1.0)
    return a * sign, d


def assert_quotients(a: torch.Tensor, d: torch.Tensor, got: torch.Tensor, context: str,
                     min_covered: float = 0.9) -> None:
    want = a / d  # torch's fp32 division on the CPU: IEEE, correctly rounded
    exact = torch.isfinite(want) & (want.abs() >= TINY_Q)
    diff = exact & (bits(got) != bits(want))
    if diff.any():
        i = diff.nonzero()[:5].flatten().tolist()
        raise AssertionError(f"{context}: {int(diff.sum())} of {int(exact.sum())} quotients differ, e.g. "
                             f"{[(a[j].item(), d[j].item(), got[j].item(), want[j].item()) for j in i]}")
    tiny = torch.isfinite(want) & ~exact
    assert (got[tiny].abs() < 2.0 ** -26).all(), context
    assert exact.sum() >= min_covered * a.numel(), "the cases must mostly be quotients the proof covers"


def exact_fma(x: float, y: float, z: float) -> float:
    """x * y + z rounded once to the nearest fp32 (ties to even), from exact rationals (finite, in range)."""
    v = Fraction(x) * Fraction(y) + Fraction(z)
    if v == 0:
        return 0.0
    e = max(abs(v).numerator.bit_length() - abs(v).denominator.bit_length(), -130)
    while Fraction(2) ** e > abs(v):
        e -= 1
    while Fraction(2) ** (e + 1) <= abs(v):
        e += 1
    quantum = Fraction(2) ** (max(e, -126) - 23)
    return float(round(v / quantum) * quantum)  # round() on a Fraction ties to even


# ---- fma_rn ----------------------------------------------------------------------------------------------------------
def fma_cases(gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random triples, half of them with z cancelling x * y to a few bits (the residuals of div_exact), some with
    x * y + z at an fp32 midpoint or next to one."""
    x = random_fp32(gen, n, -40, 40) * torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    y = random_fp32(gen, n, -40, 40)
    z = random_fp32(gen, n, -80, 80)
    prod = x.double() * y.double()
    cancel = (-prod).float()
    near = ulp_steps(cancel, torch.randint(-2, 3, (n,), generator=gen))
    pick = torch.rand(n, generator=gen)
    z = torch.where(pick < 0.5, near, z)
    return x, y, z


def test_fma_rn_rounds_once():
    seed, gen = fresh_generator()
    x, y, z = fma_cases(gen, 3000)
    got = run_fma(x, y, z)
    want = torch.tensor([exact_fma(a, b, c) for a, b, c in zip(x.tolist(), y.tolist(), z.tolist())],
                        dtype=torch.float32)
    assert torch.equal(bits(got), bits(want)), f"seed={seed}"


@pytest.mark.skipif(not INTERPRET, reason="about the interpreter's tl.fma")
def test_interpreter_fma_is_not_fused():
    """Why ``fma_rn`` exists: the interpreter's ``tl.fma`` rounds the product before adding. (1 + 2^-12)^2 - 1 is
    2^-11 + 2^-24 exactly; rounding the product first loses the 2^-24."""
    x = torch.tensor([1.0 + 2.0 ** -12])
    z = torch.tensor([-1.0])
    assert run_fma(x, x, z, plain=True).item() == 2.0 ** -11
    assert run_fma(x, x, z).item() == 2.0 ** -11 + 2.0 ** -24


# ---- div_exact -------------------------------------------------------------------------------------------------------
def test_div_exact_matches_division():
    seed, gen = fresh_generator()
    a, d = quotient_cases(gen, 20000)
    assert_quotients(a, d, run_div(a, d), f"seed={seed}")


def test_div_exact_special_values():
    """Zero dividends (either sign), exact quotients, quotients at the edges of the covered range, the extreme
    divisors (smallest subnormal, largest finite) and, with ZERO_DIVISOR, division by zero."""
    tiny, big = 2.0 ** -149, 3.4028234663852886e38
    a = torch.tensor([0.0, -0.0, 6.0, -7.5, tiny, 2.0 ** -140, big, 2.0 ** -100, 3.0 * 2.0 ** -149, 1.5, 2.0 ** 100,
                      1.0, big, 5.0 * tiny])
    d = torch.tensor([3.0, 3.0, 2.0, 2.5, tiny, tiny, big, 1.0, tiny, 1.0, 2.0 ** 30, 1.0 - 2.0 ** -24, 2.0 ** 40,
                      2.0 ** 120])
    got = run_div(a, d)
    assert_quotients(a, d, got, "special", min_covered=0.5)
    assert got[0].item() == 0.0
    a0 = torch.tensor([1.5, -2.0, 0.0, 3.0])
    d0 = torch.tensor([0.0, 0.0, 0.0, 2.0])
    z = run_div(a0, d0, zero_divisor=True)
    assert z[0].item() == float("inf") and z[1].item() == -float("inf") and torch.isnan(z[2]) and z[3].item() == 1.5


@pytest.mark.gpu
def test_gpu_div_exact_many():
    """The hardware FFMA path on ~10^7 random and adversarial quotients."""
    seed, gen = fresh_generator()
    for _ in range(4):
        a, d = quotient_cases(gen, 400000)
        assert_quotients(a, d, run_div(a, d), f"seed={seed}")


# ---- fake quantization at the rounding boundaries --------------------------------------------------------------------
def int_sym_blocks(gen: torch.Generator, spec: QuantSpec, dtype: torch.dtype, nblocks: int) -> torch.Tensor:
    """Blocks whose elements sit at, and a few dtype ulps around, (k + 1/2) * scale and its fp32 neighbourhood."""
    B, L = spec.block_size, spec.int_levels
    fi = torch.finfo(dtype)
    e = torch.randint(-10 if dtype == torch.float16 else -60, 11 if dtype == torch.float16 else 61, (nblocks, 1),
                      generator=gen).double()
    amax = torch.rand(nblocks, 1, generator=gen).double() + 1.0
    few = L * torch.randint(1, 16, (nblocks, 1), generator=gen).double() / 8  # scale with few bits: exact ties
    amax = torch.where(torch.rand(nblocks, 1, generator=gen) < 0.5, few, amax) * torch.exp2(e)
    amax = amax.clamp(max=fi.max / 2).to(dtype)
    scale = amax.float() / L
    k = torch.randint(0, L, (nblocks, B), generator=gen).double()
    target = boundary_targets(gen, nblocks * B, torch.arange(0, L, dtype=torch.float64) + 0.5).reshape(nblocks, B)
    target = torch.where(torch.rand(nblocks, B, generator=gen) < 0.5, k + 0.5, target)
    x = (target * scale.double()).to(dtype)
    x = ulp_steps(x, torch.randint(-2, 3, x.shape, generator=gen))
    x = torch.minimum(x.abs(), amax.abs())
    x = torch.where(torch.rand(x.shape, generator=gen) < 0.5, -x, x)
    x[:, :1] = amax * torch.where(torch.rand(nblocks, 1, generator=gen) < 0.5, -1.0, 1.0).to(dtype)
    return x


def int_asym_blocks(gen: torch.Generator, spec: QuantSpec, dtype: torch.dtype, nblocks: int) -> torch.Tensor:
    """Blocks with lo < 0 < hi whose elements sit at and around (k + 1/2) * scale, k over the whole code range."""
    B, L = spec.block_size, spec.int_levels
    e = torch.randint(-8, 9, (nblocks, 1), generator=gen).double()
    lo = -(torch.rand(nblocks, 1, generator=gen).double() + 0.25) * torch.exp2(e)
    hi = (torch.rand(nblocks, 1, generator=gen).double() + 0.25) * torch.exp2(e)
    lo, hi = lo.to(dtype), hi.to(dtype)
    scale = (hi.float() - lo.float()) / L
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo.float() / safe).double()
    k = torch.floor(torch.rand(nblocks, B, generator=gen).double() * (L + 1)) - zero - 1
    x = ((k + 0.5) * scale.double()).to(dtype)
    x = ulp_steps(x, torch.randint(-2, 3, x.shape, generator=gen))
    x = torch.minimum(torch.maximum(x, lo), hi)
    x[:, :1] = lo
    x[:, 1:2] = hi
    return x


def nvfp4_blocks(gen: torch.Generator, dtype: torch.dtype, nblocks: int) -> torch.Tensor:
    """NVFP4 blocks whose elements sit at and around the E2M1 midpoints (and grid points) times s * g."""
    spec = QuantSpec.nvfp4()
    B = spec.block_size
    e = torch.randint(-6, 7, (nblocks, 1), generator=gen).double()
    amax = ((torch.rand(nblocks, 1, generator=gen).double() + 1.0) * torch.exp2(e)).to(dtype)
    amax[0] = amax.abs().max() * 2  # the tensor's amax, in block 0
    g = nvfp4_global_scale(amax.float())
    s = nvfp4_block_scales(amax.float(), g)
    d = (s * g).double()
    centres = torch.tensor(E2M1_MIDPOINTS + (0.5, 1.0, 1.5, 2.0, 3.0, 4.0), dtype=torch.float64)
    target = boundary_targets(gen, nblocks * B, centres).reshape(nblocks, B)
    x = (target * d).to(dtype)
    x = ulp_steps(x, torch.randint(-2, 3, x.shape, generator=gen))
    x = torch.minimum(x, amax)
    x = torch.where(torch.rand(x.shape, generator=gen) < 0.5, -x, x)
    x[:, :1] = amax
    return x


def hard_blocks(gen: torch.Generator, spec: QuantSpec, nblocks: int) -> torch.Tensor:
    """fp32 blocks whose scale is the divisor of a `hard_pairs` case and which hold that case's dividend (either
    sign): x / scale lies within a few 2^-47 (relative) of the fp32 midpoint next to a rounding boundary.
    int sym: amax = RN(d L); int asym: lo = -R / 2, hi = R / 2 with R = RN(d L); nvfp4: s = 1, g = d."""
    B = spec.block_size
    if spec.family == "nvfp4":
        centres, mult = list(E2M1_MIDPOINTS), 6.0
    else:
        L = spec.int_levels
        top = L if spec.symmetric else L // 2 - 1
        centres, mult = [k + 0.5 for k in range(top)], float(L)
    a, d = hard_pairs(gen, 8 * nblocks, boundary_midpoints(centres), exp_range=20)
    big = (d.double() * mult).float()  # amax, range R or the block amax 6 d
    ok = (big / mult) == d  # the block scale the kernel derives is d again
    if spec.family == "nvfp4":
        top_amax = (d.double() * 2688.0).float()
        ok &= (top_amax / 2688.0) == d
    a, d, big = a[ok][:nblocks], d[ok][:nblocks], big[ok][:nblocks]
    n = a.numel()
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    fill = torch.rand(n, B, generator=gen) * torch.where(torch.rand(n, B, generator=gen) < 0.5, -0.4, 0.4)
    x = fill * big[:, None]
    x[:, 2] = a * sign
    if spec.family == "nvfp4":
        x[:, 0] = big
        # one tensor per divisor: block 0 carries the tensor amax 2688 d, so g = d and s = 1 in block 1
        return torch.stack([torch.cat([torch.full((B,), 2688.0) * d[i], x[i]]) for i in range(n)])
    if spec.symmetric:
        x[:, 0] = big * sign
    else:
        x[:, 0], x[:, 1] = -big / 2, big / 2
    return x


BOUNDARY_SPECS = {
    "int4_sym_g32": QuantSpec.int_(4, 32),
    "int8_sym_g16": QuantSpec.int_(8, 16),
    "int4_sym_g128": QuantSpec.int_(4, 128),
    "int4_sym_stoch": QuantSpec.int_(4, 32, rounding="stochastic", seed=3),
    "int4_sym_nearest": QuantSpec.int_(4, 32, rounding="nearest"),
    "int4_asym_g32": QuantSpec.int_(4, 32, symmetric=False),
    "int8_asym_g16": QuantSpec.int_(8, 16, symmetric=False),
    "int4_asym_floor": QuantSpec.int_(4, 32, symmetric=False, rounding="floor"),
    "int4_asym_stoch": QuantSpec.int_(4, 32, symmetric=False, rounding="stochastic", seed=7),
    "nvfp4": QuantSpec.nvfp4(),
    "nvfp4_stoch": QuantSpec.nvfp4(rounding="stochastic", seed=5),
}


def boundary_input(name: str, dtype: torch.dtype, gen: torch.Generator, nblocks: int) -> torch.Tensor:
    spec = BOUNDARY_SPECS[name]
    if spec.family == "nvfp4":
        return nvfp4_blocks(gen, dtype, nblocks)
    if spec.symmetric:
        return int_sym_blocks(gen, spec, dtype, nblocks)
    return int_asym_blocks(gen, spec, dtype, nblocks)


def assert_fake_quant(x: torch.Tensor, spec: QuantSpec, context: str) -> None:
    x = x.to(DEVICE)
    y, ref = K.triton_fake_quantize(x, spec).cpu(), reference_fake_quantize(x, spec).cpu()
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(y), nan), context
    diff = (bits(y) != bits(ref)) & ~nan
    if diff.any():
        i = diff.nonzero()[:4].tolist()
        raise AssertionError(f"{context}: {int(diff.sum())} elements differ, e.g. "
                             f"{[(x[tuple(j)].item(), y[tuple(j)].item(), ref[tuple(j)].item()) for j in i]}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("name", list(BOUNDARY_SPECS))
def test_fake_quant_at_rounding_boundaries(name, dtype):
    check_boundary_blocks(name, dtype, 48)


def check_boundary_blocks(name, dtype, n_blocks):
    seed, gen = fresh_generator()
    x = boundary_input(name, dtype, gen, n_blocks)
    assert_fake_quant(x, BOUNDARY_SPECS[name], f"{name} {dtype} seed={seed}")


@pytest.mark.parametrize("name", ["int4_sym_g32", "int8_sym_g16", "int4_sym_stoch", "int4_asym_g32", "int8_asym_g16",
                                  "int4_asym_stoch", "nvfp4", "nvfp4_stoch"])
def test_fake_quant_hard_quotients(name):
    """Quotients x / scale next to the fp32 midpoints around the rounding boundaries (fp32 inputs only: such a
    dividend needs 24 significant bits)."""
    spec = BOUNDARY_SPECS[name]
    seed, gen = fresh_generator()
    x = hard_blocks(gen, spec, 64)
    assert x.shape[0] >= 16, f"too few valid cases, seed={seed}"
    if spec.family == "nvfp4":  # one tensor (one global scale) per case
        for row in x:
            assert_fake_quant(row[None], spec, f"{name} seed={seed}")
    else:
        assert_fake_quant(x, spec, f"{name} seed={seed}")


def test_boundary_inputs_hit_ties():
    """The adversarial inputs really reach the decision points: some int quotients x / scale are exact ties."""
    seed, gen = fresh_generator()
    spec = BOUNDARY_SPECS["int4_sym_g32"]
    for dtype in DTYPES:
        x = int_sym_blocks(gen, spec, dtype, 48).float()
        scale = x.abs().amax(dim=1, keepdim=True) / spec.int_levels
        q = (x / scale).abs()
        assert ((q - q.floor()) == 0.5).sum() > 20, f"{dtype} seed={seed}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("name", list(BOUNDARY_SPECS))
def test_gpu_fake_quant_at_rounding_boundaries(name, dtype):
    check_boundary_blocks(name, dtype, 20000)


# ---- NVFP4's amax pass -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_nvfp4_amax_pass_chunking(dtype, monkeypatch):
    """Several chunks per program, several programs, a partial last chunk and a partial last program, the maximum
    (and NaN / Inf, which must not count) in various places; small chunk sizes stand in for the real ones."""
    import ptq.kernels.mx_quant as M
    from ptq.quantizers import nvfp4_global_scale

    monkeypatch.setattr(M, "_AMAX_BLOCK", 64)
    monkeypatch.setattr(M, "_AMAX_CHUNKS", 3)
    monkeypatch.setattr(M, "_FINAL_TILE", 4)
    seed, gen = fresh_generator()
    for n in (1, 64, 191, 192, 193, 1000):
        x = (torch.randn(n, generator=gen) * 3).to(dtype)
        x[torch.randint(0, n, (1,), generator=gen)] = 40.0
        if n > 10:
            x[3] = float("nan")
            x[n - 2] = -float("inf")
        got, want = M.nvfp4_global_scale_fast(x.to(DEVICE)), nvfp4_global_scale(x)
        assert torch.equal(got.cpu().view(torch.int32), want.reshape(1).view(torch.int32)), (n, seed)


# ---- the GPU's NaN handling in min / max, emulated in the interpreter ------------------------------------------------
@pytest.fixture
def gpu_min_max(monkeypatch):
    """Make the interpreter's tl.minimum / tl.maximum return the non-NaN operand, as the GPU's min.f32 / max.f32
    do (the interpreter uses np.minimum, which propagates NaN). NaN-propagating min/max keep np.minimum."""
    import numpy as np
    from triton.runtime import interpreter

    b = interpreter.InterpreterBuilder
    monkeypatch.setattr(b, "create_minnumf", lambda self, lhs, rhs: self.binary_op(lhs, rhs, np.fmin))
    monkeypatch.setattr(b, "create_maxnumf", lambda self, lhs, rhs: self.binary_op(lhs, rhs, np.fmax))


@pytest.mark.skipif(not INTERPRET, reason="emulates the GPU in the interpreter; the gpu tests run the real thing")
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("name", ["int4_sym_g32", "int4_asym_g32", "int8_asym_g16", "int4_asym_stoch", "nvfp4",
                                  "nvfp4_stoch"])
def test_edge_cases_with_gpu_nan_semantics(name, dtype, gpu_min_max):
    """Blocks whose scale overflows (asym range max - min = inf: x / inf must be 0, not NaN, or the GPU's min/max
    turn the NaN into a clamp bound) and tensors so small that NVFP4's s * g underflows to 0 (0 / 0 = NaN must
    survive the E2M1 saturation)."""
    from test_kernels import edge_case_rows

    spec = BOUNDARY_SPECS[name]
    assert_fake_quant(edge_case_rows(spec, dtype), spec, f"{name} {dtype}")
    if spec.family == "nvfp4" and dtype == torch.float32:
        x = torch.zeros(1, 32)
        x[0, 0] = 2.0 ** -131  # g = RN(amax / 2688) is subnormal; block 2: s = 2^-9 > 0 but s * g rounds to 0
        x[0, 16:19] = torch.tensor([2.0 ** -149, -(2.0 ** -149), 2.0 ** -148])
        assert_fake_quant(x, spec, "s * g == 0")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_nvfp4_tiny_tensors(dtype):
    """Tensors with a global scale on either side of ``NV_FAST_G`` (the element division without a prescale) and
    far below it, down to subnormal inputs where s * g underflows."""
    from ptq.kernels.mx_quant import NV_FAST_G

    spec = QuantSpec.nvfp4()
    seed, gen = fresh_generator()
    threshold = NV_FAST_G.value * 2688  # the tensor amax whose g is NV_FAST_G
    for amax in (threshold * 1.01, threshold, threshold * 0.99, 2.0 ** -100, 2.0 ** -125, 2.0 ** -133):
        x = torch.randn(6, 64, generator=gen)
        x = x / x.abs().max() * amax
        x[torch.rand(x.shape, generator=gen) < 0.2] *= 2.0 ** -12  # tiny blocks: s near or at 0
        assert_fake_quant(x.to(dtype), spec, f"amax={amax} {dtype} seed={seed}")
