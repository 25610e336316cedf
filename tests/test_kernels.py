"""Triton MX kernels vs the torch reference, compared bit for bit.

On the CPU the kernels run under TRITON_INTERPRET=1 (set by conftest), so shapes stay small; the tests marked
``gpu`` repeat the comparison on large CUDA tensors. Every random input is drawn fresh (seed printed on failure).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from ptq.errors import PtqError, QuantSpecError
from ptq.formats import QuantSpec

pytest.importorskip("triton")

import ptq.kernels as K  # noqa: E402
from ptq.quantizers import noise_shape, pack_nibbles, quantize, reference_fake_quantize  # noqa: E402
from bitcheck import bits

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1: the kernels cannot run here", allow_module_level=True)

# The interpreter evaluates masked-off and degenerate lanes too (x / 0 where s == 0, ...) and numpy warns about them.
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DT_IDS = ["fp32", "bf16", "fp16"]

# One spec per family / element format / rounding mode / scale rule the template specialises on.
SPECS = {
    "mxint8": QuantSpec.mxint(8),
    "mxint4": QuantSpec.mxint(4),
    "mxint2_b8": QuantSpec.mxint(2, block_size=8),
    "mxint4_b3": QuantSpec.mxint(4, block_size=3),
    "mxint4_nearest": QuantSpec.mxint(4, rounding="nearest"),
    "mxfp8_e4m3": QuantSpec.mxfp("e4m3"),
    "mxfp8_e5m2": QuantSpec.mxfp("e5m2"),
    "mxfp6_e2m3": QuantSpec.mxfp("e2m3"),
    "mxfp6_e3m2": QuantSpec.mxfp("e3m2"),
    "mxfp4_e2m1": QuantSpec.mxfp("e2m1"),
    "mxfp4_ceil": QuantSpec.mxfp("e2m1", scale_rule="ceil"),
    "mxfp4_b6": QuantSpec.mxfp("e2m1", block_size=6),
    "mxfp_e1m2": QuantSpec.mxfp((1, 2)),
    "mxfp_e8m10": QuantSpec.mxfp((8, 10)),
    "mxfp8_floor": QuantSpec.mxfp("e4m3", rounding="floor"),
    "mxfp4_stoch": QuantSpec.mxfp("e2m1", rounding="stochastic", seed=11),
    "mx6": QuantSpec.mx6(),
    "mx9": QuantSpec.mx9(),
    "mx6_stoch": QuantSpec.mx6(rounding="stochastic", seed=3),
    "nvfp4": QuantSpec.nvfp4(),
    "nvfp4_stoch": QuantSpec.nvfp4(rounding="stochastic", seed=5),
    "int4_sym": QuantSpec.int_(4, 32),
    "int4_asym": QuantSpec.int_(4, 32, symmetric=False),
    "int8_asym_b6": QuantSpec.int_(8, 6, symmetric=False),
    "int4_asym_stoch": QuantSpec.int_(4, 16, symmetric=False, rounding="stochastic", seed=9),
}

PACKED_SPECS = {
    "mxfp4": QuantSpec.mxfp("e2m1"),
    "mxfp4_b6": QuantSpec.mxfp("e2m1", block_size=6),
    "nvfp4": QuantSpec.nvfp4(),
    "mxint4": QuantSpec.mxint(4),
    "mxint8": QuantSpec.mxint(8),
    "mxint6": QuantSpec.mxint(6),
    "mxfp8_e4m3": QuantSpec.mxfp("e4m3"),
    "mxfp8_e5m2": QuantSpec.mxfp("e5m2"),
    "mxfp6_e3m2_ceil": QuantSpec.mxfp("e3m2", scale_rule="ceil"),
    "mxint4_stoch": QuantSpec.mxint(4, rounding="stochastic", seed=2),
}


# ---- helpers ---------------------------------------------------------------------------------------------------------
def fresh_generator() -> tuple[int, torch.Generator]:
    seed = int.from_bytes(os.urandom(4), "little")
    return seed, torch.Generator().manual_seed(seed)


def random_input(shape, dtype, gen: torch.Generator, device=DEVICE) -> torch.Tensor:
    """Gaussian rows at random magnitudes (2^-20 .. 2^20; narrower for fp16), drawn on the CPU generator."""
    span = 10 if dtype == torch.float16 else 20
    mags = torch.randint(-span, span + 1, (*shape[:-1], 1), generator=gen).float().exp2()
    return (torch.randn(shape, generator=gen) * mags).to(dtype).to(device)


def assert_bit_exact(y: torch.Tensor, ref: torch.Tensor, context: str = "") -> None:
    """Same shape and dtype, NaN in the same places, identical bits everywhere else (so -0.0 != +0.0)."""
    assert y.shape == ref.shape and y.dtype == ref.dtype, (context, y.shape, ref.shape, y.dtype, ref.dtype)
    y, ref = y.contiguous(), ref.contiguous()
    nan_y, nan_r = torch.isnan(y), torch.isnan(ref)
    assert torch.equal(nan_y, nan_r), f"{context}: NaN positions differ"
    diff = (bits(y) != bits(ref)) & ~nan_r
    if diff.any():
        idx = diff.nonzero()[:5].tolist()
        got = [y[tuple(i)].item() for i in idx]
        want = [ref[tuple(i)].item() for i in idx]
        raise AssertionError(f"{context}: {int(diff.sum())} of {y.numel()} elements differ; first at {idx}: "
                             f"kernel {got} vs reference {want}")


def edge_case_rows(spec: QuantSpec, dtype: torch.dtype) -> torch.Tensor:
    """Rows of hard cases, each 2 blocks + 3 elements long (a partial tail block)."""
    B = spec.block_size
    n = 2 * B + 3
    fi = torch.finfo(dtype)
    rows = []

    def row(vals):
        v = torch.as_tensor(vals, dtype=torch.float64).flatten()
        out = torch.zeros(n, dtype=torch.float64)
        k = min(n, v.numel())
        out[:k] = v[:k]
        return out

    rows.append(torch.zeros(n, dtype=torch.float64))  # all-zero blocks
    one = torch.zeros(n, dtype=torch.float64)
    one[B // 2] = -3.25
    one[B + 1] = 1e-3
    rows.append(one)  # one non-zero element per block
    rows.append(row([(-1) ** i * 2.0 ** (i % 13 - 6) for i in range(n)]))  # exact powers of two
    # Just below (and at) rounding carries: mantissas sweeping [1, 2) in 1/64 steps and their fp neighbours, the
    # block anchored at 2, so e.g. 1.76..1.99 sit below E2M1's carry to 2 relative to the block scale.
    sweep = 1.0 + torch.arange(64, dtype=torch.float64) / 64
    for scale in (1.0, 0.75):
        vals = torch.cat([torch.tensor([2.0]), sweep * scale])
        rows.append(row(vals))
        rows.append(row(torch.nextafter(vals.float(), torch.tensor(0.0)).double()))
        rows.append(row(torch.nextafter(vals.float(), torch.tensor(9.0)).double()))
    # subnormal inputs of the dtype, alone in a block and next to a normal value
    sub = fi.tiny * torch.tensor([0.5, 0.25, -0.125, 2.0 ** -10, 0.75, -0.375, 2.0 ** -20, 0.0], dtype=torch.float64)
    rows.append(row(sub.repeat(n // 8 + 1)))
    mixed = sub.repeat(n // 8 + 1)
    mixed[1] = 3.0 * fi.tiny * 4
    rows.append(row(mixed))
    # the largest finite element of each format, scaled, and the dtype's largest values
    big = [448.0, -57344.0, 6.0, 7.5, 28.0, 127 / 64, 1.75]
    rows.append(row([big[i % len(big)] * 2.0 ** (i // len(big) - 2) for i in range(n)]))
    rows.append(row([fi.max, -fi.max / 3, fi.tiny, 1.0] * n))
    rows.append(row([fi.max if i % 5 == 0 else (i + 1.0) for i in range(n)]))
    rows.append(row([fi.tiny * (i + 1) for i in range(n)]))
    # non-finite values and signed zeros among ordinary ones
    spec_row = torch.linspace(-2.0, 2.0, n, dtype=torch.float64)
    spec_row[1] = float("nan")
    spec_row[B + 2] = float("inf")
    spec_row[B + 5] = -float("inf")
    spec_row[3] = -0.0
    rows.append(spec_row)
    rows.append(row([float("nan")] * n))
    rows.append(row([-0.0] * n))
    return torch.stack(rows).to(dtype)


# ---- fake quantize vs reference -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("name", list(SPECS))
def test_random_bit_exact(name, dtype):
    spec = SPECS[name]
    seed, gen = fresh_generator()
    x = random_input((5, 3 * spec.block_size + 5), dtype, gen)
    assert_bit_exact(K.triton_fake_quantize(x, spec), reference_fake_quantize(x, spec), f"{spec} {dtype} seed={seed}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("name", list(SPECS))
def test_edge_cases_bit_exact(name, dtype):
    spec = SPECS[name]
    x = edge_case_rows(spec, dtype).to(DEVICE)
    y = K.triton_fake_quantize(x, spec)
    assert_bit_exact(y, reference_fake_quantize(x, spec), f"{spec} {dtype}")
    assert torch.isnan(y[torch.isnan(x)]).all(), "NaN must propagate element-wise"
    assert torch.equal(y[torch.isinf(x)], x[torch.isinf(x)]), "+-Inf must propagate element-wise"
    assert torch.all(y[0] == 0), "an all-zero block quantizes to zeros"
    # (Finite inputs near the dtype's max can leave the finite range: the ceil scale rule rounds 3.99 * 2^126 up to
    # 2^128, and the asymmetric int range max - min overflows; the kernel matches the reference there too.)
    ordinary = torch.isfinite(x) & (x.abs() < torch.finfo(dtype).max / 8)
    ordinary[12] = False  # the row holding max and -max / 3 in one block
    assert torch.isfinite(y[ordinary]).all()


@pytest.mark.parametrize("axis", [0, 1, 2, -2])
@pytest.mark.parametrize("name", ["mxfp4_e2m1", "mx6", "nvfp4", "int4_asym", "mxint8"])
def test_each_axis(name, axis):
    spec = SPECS[name].with_(block_size=4 if name != "nvfp4" else 16, axis=axis)
    seed, gen = fresh_generator()
    x = random_input((6, 18, 7), torch.bfloat16, gen)
    assert_bit_exact(K.triton_fake_quantize(x, spec), reference_fake_quantize(x, spec), f"{spec} seed={seed}")


def test_non_contiguous_and_empty_inputs():
    seed, gen = fresh_generator()
    spec = QuantSpec.mxint(4)
    x = random_input((40, 33), torch.float32, gen).t()  # a transposed view
    assert_bit_exact(K.triton_fake_quantize(x, spec), reference_fake_quantize(x, spec), f"seed={seed}")
    e = torch.empty(0, 32, device=DEVICE)
    assert K.triton_fake_quantize(e, spec).shape == (0, 32)


@pytest.mark.parametrize("name", ["mxfp4_b6", "nvfp4", "int4_asym_stoch", "mxint4"])
def test_layouts_read_in_place(name):
    """Dense tensors whose blocked axis has stride 1 (K / V as [b, h, s, d] views of [b, s, h, d], a transposed
    matrix blocked along dim 0, a row slice with a storage offset) are quantized without a copy and keep their
    strides; other layouts go through the copy. Stochastic noise follows the logical row order either way."""
    spec = SPECS[name]
    B = spec.block_size
    seed, gen = fresh_generator()
    kv = random_input((2, 5, 3, 2 * B + 3), torch.bfloat16, gen).transpose(1, 2)
    cases = [
        (kv, spec, True),
        (random_input((7, 2 * B), torch.float32, gen).t(), spec.with_(axis=0), True),
        (random_input((4, 2 * B), torch.float16, gen)[1:3], spec, True),
        (random_input((4, 3 * B), torch.bfloat16, gen)[:, : 2 * B], spec, False),  # not dense: copied
    ]
    for x, s, in_place in cases:
        y = K.triton_fake_quantize(x, s)
        assert_bit_exact(y, reference_fake_quantize(x, s), f"{s} {tuple(x.shape)} {x.stride()} seed={seed}")
        if in_place and s.rounding != "stochastic":
            assert y.stride() == x.stride()


@pytest.mark.parametrize("shape,block", [((3, 4100), 32), ((4, 1024), 32), ((2, 1000), 24), ((1, 5000), 2)])
def test_multi_program_tiles(shape, block):
    """Several programs, full and partial last tiles, non-power-of-two blocks (masked columns), tiny blocks."""
    seed, gen = fresh_generator()
    for spec in (QuantSpec.mxfp("e2m1", block_size=block), QuantSpec.int_(4, block, symmetric=False)):
        x = random_input(shape, torch.bfloat16, gen)
        assert_bit_exact(K.triton_fake_quantize(x, spec), reference_fake_quantize(x, spec), f"{spec} seed={seed}")


def test_stochastic_noise_is_the_references():
    spec = QuantSpec.mxfp("e2m1", block_size=8, rounding="stochastic", seed=4)
    seed, gen = fresh_generator()
    x = random_input((3, 21), torch.float32, gen)
    noise = torch.rand(noise_shape(x, spec), generator=gen).to(DEVICE)
    y = K.triton_fake_quantize(x, spec, noise=noise)
    assert_bit_exact(y, reference_fake_quantize(x, spec, noise=noise), f"seed={seed}")
    other = K.triton_fake_quantize(x, spec, noise=torch.rand(noise.shape, generator=gen).to(DEVICE))
    assert not torch.equal(y, other), "different noise must change stochastic rounding"
    assert torch.equal(K.triton_fake_quantize(x, spec), K.triton_fake_quantize(x, spec)), "seeded: reproducible"
    with pytest.raises(QuantSpecError, match="shape"):
        K.triton_fake_quantize(x, spec, noise=noise[..., :4])


@pytest.mark.parametrize("name", ["mxfp8_e4m3", "mxfp8_e5m2", "mx9", "mx6_stoch", "mxint8", "mxfp4_ceil",
                                  "mxfp8_floor", "mxfp_e1m2"])
def test_bf16_outputs_are_bf16_numbers(name):
    """The kernel skips the fp32 -> bf16 rounding step for these formats (``bf16_exact``): on bf16 inputs (all
    65,280 finite bit patterns, in random, same-magnitude and tiny blocks) the reference's fp32 results must
    already be bf16 numbers, and the kernel must match the reference there."""
    from ptq.kernels.mx_quant import bf16_exact

    spec = SPECS[name]
    assert bf16_exact(spec)
    seed, gen = fresh_generator()
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    every = every[torch.isfinite(every)]
    B = spec.block_size
    x = every[torch.randperm(every.numel(), generator=gen)][: (every.numel() // B) * B].reshape(-1, B)
    base = every[torch.randint(0, every.numel(), (x.shape[0], 1), generator=gen)].float()
    similar = (base * torch.rand(x.shape, generator=gen) * 2).to(torch.bfloat16)
    tiny = (x.float() * 2.0 ** -100).to(torch.bfloat16)
    for xb in (x, similar, tiny):
        y32 = reference_fake_quantize(xb.float(), spec)
        fin = torch.isfinite(y32)
        assert torch.equal(y32[fin].to(torch.bfloat16).float(), y32[fin]), f"{spec} seed={seed}"
    xs = torch.cat([x[:64], similar[:64], tiny[:64]]).to(DEVICE)
    assert_bit_exact(K.triton_fake_quantize(xs, spec), reference_fake_quantize(xs, spec), f"{spec} seed={seed}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_nvfp4_global_scale_kernel_matches_reference(dtype):
    from ptq.kernels.mx_quant import nvfp4_global_scale_fast
    from ptq.quantizers import nvfp4_global_scale

    seed, gen = fresh_generator()
    x = random_input((3, 9000), dtype, gen)  # several chunks, a partial last one
    x[1, 5] = float("nan")
    x[2, 7] = -float("inf")
    for t in (x, torch.zeros(5, 7, dtype=dtype, device=DEVICE), x[:, :100].t()):
        got, want = nvfp4_global_scale_fast(t), nvfp4_global_scale(t)
        assert got.shape == (1,) and torch.equal(got.view(torch.int32), want.reshape(1).view(torch.int32)), seed


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_nvfp4_global_scale_extreme_amax(dtype):
    """Amax whose g = amax / 2688 is subnormal or underflows to 0 (g = 1), the largest finite amax, all non-finite."""
    from ptq.kernels.mx_quant import nvfp4_global_scale_fast
    from ptq.quantizers import nvfp4_global_scale

    info = torch.finfo(dtype)
    cases = [torch.full((7,), info.tiny, dtype=dtype), torch.full((7,), info.max, dtype=dtype),
             torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype)]
    if dtype != torch.float16:
        cases.append(torch.tensor([2.0 ** -126 * 2688.5, -3e-38, 1e-39], dtype=torch.float32).to(dtype))
    sub = info.smallest_normal * torch.tensor([0.5, 2.0 ** -5, -0.75])  # input subnormals
    cases.append(sub.to(dtype))
    for t in cases:
        t = t.to(DEVICE)
        got, want = nvfp4_global_scale_fast(t), nvfp4_global_scale(t)
        assert torch.equal(got.view(torch.int32), want.reshape(1).view(torch.int32)), (t, got, want)


def test_nvfp4_global_scale_reduces_many_partials():
    """The one-program finalize loops over more partial maxima than its tile (several iterations, a partial last)."""
    from ptq.kernels.mx_quant import EXACT_FP_OPTIONS, _global_scale_kernel

    seed, gen = fresh_generator()
    partial = torch.rand(2500, generator=gen) * 100.0
    partial[2499] = 1234.5  # the maximum sits in the masked last tile
    buf = torch.cat([partial, torch.zeros(1)]).to(DEVICE)
    _global_scale_kernel[(1,)](buf, buf[2500:], 2500, DIVISOR=2688.0, BLOCK=1024, NITER=4, num_warps=4, **EXACT_FP_OPTIONS)
    want = torch.tensor(1234.5) / torch.tensor(2688.0)
    assert buf[2500].item() == want.item(), seed


def test_interpreter_never_gets_the_hardware_bf16_cast():
    """The interpreter's fp32 -> bf16 cast truncates: on the CPU every bf16 output is rounded by bit manipulation;
    on a GPU, formats whose outputs need rounding use the hardware's round-to-nearest-even cvt."""
    from ptq.kernels.mx_quant import OUT_BF16_BITS, OUT_BF16_HW, OUT_NATIVE, _launch_constants, _out_kind

    for name in ("nvfp4", "int4_sym", "mxint4"):
        k = _launch_constants(SPECS[name], None)
        assert _out_kind(torch.zeros(1), True, k) == OUT_BF16_BITS
        assert _out_kind(torch.zeros(1), False, k) == OUT_NATIVE
        if CUDA and os.environ.get("TRITON_INTERPRET") != "1":
            want = OUT_BF16_BITS if k.kwargs["BF16_EXACT"] else OUT_BF16_HW
            assert _out_kind(torch.zeros(1, device="cuda"), True, k) == want


@pytest.mark.parametrize("spec", [QuantSpec.int_(4, 32), QuantSpec.int_(4, 32, rounding="nearest"),
                                  QuantSpec.int_(4, 32, rounding="floor"), QuantSpec.int_(16, 32)], ids=str)
def test_int_symmetric_zero_signs_and_half_integers(spec):
    """int sym: zeros (of either sign, and elements rounding to 0) come out +0; quotients at exact half-integers
    round as the mode says; the block's amax maps to +-LEVELS; tiny (subnormal-scale) and huge blocks."""
    B = spec.block_size
    row = torch.zeros(B)
    row[0] = 7.0  # amax: scale = 1 exactly, so x / scale = x
    halves = torch.tensor([0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 3.5, 6.5, -6.5, 0.49999997, -0.0, 0.25, -0.25, 7.0])
    row[1:1 + halves.numel()] = halves
    scaled = torch.stack([row, row * 2.0 ** -140, row * 2.0 ** 100, -row * 3.0, row / 7.0 * 1e-38])
    for dtype in DTYPES:
        x = scaled.to(dtype).to(DEVICE)
        assert_bit_exact(K.triton_fake_quantize(x, spec), reference_fake_quantize(x, spec), str(dtype))


# ---- packed codes vs reference ---------------------------------------------------------------------------------
def _reference_packed(x, spec):
    q = quantize(x, spec)
    codes = pack_nibbles(q.codes) if spec.width == 4 else q.codes
    return codes, q.scales, q.global_scale


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("name", list(PACKED_SPECS))
def test_packed_bit_exact(name, dtype):
    spec = PACKED_SPECS[name]
    seed, gen = fresh_generator()
    x = random_input((4, 2 * spec.block_size + 6), dtype, gen)
    x[0, : spec.block_size] = 0  # an all-zero block
    x[1, 3] = -0.0
    p = K.triton_quantize_packed(x, spec)
    codes, scales, g = _reference_packed(x, spec)
    ctx = f"{spec} {dtype} seed={seed}"
    assert p.codes.dtype == codes.dtype and torch.equal(p.codes, codes), ctx
    assert p.scales.dtype == scales.dtype and torch.equal(p.scales.view(torch.uint8), scales.view(torch.uint8)), ctx
    if spec.family == "nvfp4":
        assert torch.equal(p.global_scale, g), ctx
    else:
        assert p.global_scale is None


def test_packed_edge_cases_and_nonfinite():
    for spec in (QuantSpec.mxfp("e2m1"), QuantSpec.nvfp4(), QuantSpec.mxint(4), QuantSpec.mxfp("e4m3")):
        x = edge_case_rows(spec, torch.float32)[:-3].to(DEVICE)  # finite rows only
        p = K.triton_quantize_packed(x, spec)
        codes, scales, _ = _reference_packed(x, spec)
        assert torch.equal(p.codes, codes) and torch.equal(p.scales.view(torch.uint8), scales.view(torch.uint8))
    x = torch.tensor([[1.0, float("nan"), -float("inf"), float("inf")] * 8], device=DEVICE)
    p = K.triton_quantize_packed(x, QuantSpec.mxfp("e5m2"))  # E5M2 has NaN and Inf codes
    assert torch.equal(p.codes, _reference_packed(x, QuantSpec.mxfp("e5m2"))[0])
    assert p.codes[0, 1].item() & 0x7F == 0x7F and p.codes[0, 2].item() == 0xFC and p.codes[0, 3].item() == 0x7C
    for spec in (QuantSpec.mxfp("e2m1"), QuantSpec.mxint(4), QuantSpec.nvfp4(), QuantSpec.mxfp("e4m3")):
        with pytest.raises(QuantSpecError, match="NaN|Inf"):
            K.triton_quantize_packed(x, spec)
    with pytest.raises(QuantSpecError, match="codes"):
        K.triton_quantize_packed(x, QuantSpec.mx6())


# ---- dispatch, support and bad input ---------------------------------------------------------------------------------
def test_fake_quantize_dispatch_uses_the_kernel():
    from ptq.quantizers import fake_quantize

    seed, gen = fresh_generator()
    spec = QuantSpec.mxfp("e4m3")
    x = random_input((4, 64), torch.bfloat16, gen)
    assert_bit_exact(fake_quantize(x, spec, backend="triton"), fake_quantize(x, spec, backend="torch"), f"{seed}")


def test_supports():
    x = torch.randn(4, 32, device=DEVICE)
    assert K.supports(QuantSpec.mxint(4), x)
    assert not K.supports(QuantSpec.mxint(4), x.to(torch.int32))
    assert not K.supports(QuantSpec.mx6(block_size=15), x)  # pairs share a prime bit: odd blocks impossible
    assert not K.supports(QuantSpec.mxint(4, axis=2), x)
    assert K.packed_supports(QuantSpec.nvfp4(), x) and not K.packed_supports(QuantSpec.mx9(), x)


def test_bad_input_raises_clear_errors():
    spec = QuantSpec.mxint(4)
    with pytest.raises(QuantSpecError, match="int32"):
        K.triton_fake_quantize(torch.ones(4, 32, dtype=torch.int32, device=DEVICE), spec)
    with pytest.raises(QuantSpecError, match="bool"):
        K.triton_quantize_packed(torch.ones(4, 32, dtype=torch.bool, device=DEVICE), spec)
    with pytest.raises(QuantSpecError, match="axis"):
        K.triton_fake_quantize(torch.ones(4, 32, device=DEVICE), spec.with_(axis=3))
    with pytest.raises(QuantSpecError, match="block_size"):
        QuantSpec.mxint(4, block_size=0)
    with pytest.raises(QuantSpecError, match="pairs"):
        K.triton_fake_quantize(torch.ones(4, 30, device=DEVICE), QuantSpec.mx6(block_size=15))
    with pytest.raises(QuantSpecError, match="noise"):
        K.triton_fake_quantize(torch.ones(4, 32, device=DEVICE), spec, noise=torch.zeros(4, 1, 32, device=DEVICE))
    if not CUDA:
        with pytest.raises(PtqError, match="CUDA"):
            env = dict(os.environ)
            try:
                os.environ.pop("TRITON_INTERPRET")
                K.triton_fake_quantize(torch.ones(4, 32), spec)
            finally:
                os.environ.clear()
                os.environ.update(env)


def test_import_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, ptq.kernels as K\nfrom ptq.formats import QuantSpec\n"
            "assert not K.triton_available()\n"
            "assert not K.supports(QuantSpec.mxint(4), torch.randn(2, 32))\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


# ---- GPU: large tensors, every family -------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("name", list(SPECS))
def test_gpu_bit_exact_large(name, dtype):
    spec = SPECS[name]
    seed, gen = fresh_generator()
    x = random_input((512, 8192 + spec.block_size // 2), dtype, gen)  # ~4M elements, partial tail blocks
    edges = edge_case_rows(spec, dtype).to(DEVICE)
    x[: edges.shape[0], : edges.shape[1]] = edges
    assert_bit_exact(K.triton_fake_quantize(x, spec), reference_fake_quantize(x, spec), f"{spec} {dtype} seed={seed}")
    xt = x[:, :4096].t()  # blocked along the other axis, non-contiguous input
    spec0 = spec.with_(axis=0)
    assert_bit_exact(K.triton_fake_quantize(xt, spec0), reference_fake_quantize(xt, spec0), f"{spec0} seed={seed}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("name", list(PACKED_SPECS))
def test_gpu_packed_large(name, dtype):
    spec = PACKED_SPECS[name]
    seed, gen = fresh_generator()
    x = random_input((256, 8192 + 2 * spec.block_size), dtype, gen)
    p = K.triton_quantize_packed(x, spec)
    codes, scales, g = _reference_packed(x, spec)
    assert torch.equal(p.codes, codes) and torch.equal(p.scales.view(torch.uint8), scales.view(torch.uint8)), seed
    if g is not None:
        assert torch.equal(p.global_scale, g)


@pytest.mark.gpu
def test_gpu_64bit_indexing():
    """More than 2^31 elements: offsets must be 64-bit. Checked on the first and last rows."""
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs ~20 GB of free GPU memory")
    seed, gen = fresh_generator()
    rows, cols = 2**18 + 3, 8192
    x = torch.empty(rows, cols, dtype=torch.bfloat16, device="cuda")
    x.normal_(generator=torch.Generator(device="cuda").manual_seed(seed))
    spec = QuantSpec.mxint(4)
    y = K.triton_fake_quantize(x, spec)
    for sl in (slice(0, 4), slice(rows - 4, rows)):
        assert_bit_exact(y[sl], reference_fake_quantize(x[sl], spec), f"rows {sl} seed={seed}")
