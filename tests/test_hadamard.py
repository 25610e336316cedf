"""Hadamard matrices, the torch reference transform and the Triton kernels (bit-exact under TRITON_INTERPRET=1)."""

import math

import pytest
import torch

from ptq.errors import ModelError, PtqError
from ptq.formats import QuantSpec
from ptq.hadamard import (
    ISSUE_ORDERS,
    KNOWN_ORDERS,
    factor_size,
    hadamard_matrix,
    is_supported_size,
    known_hadamard,
    rotate_reference,
    sylvester,
)
from ptq.modules.rotation import HadamardRotation
from bitcheck import bits


def _assert_bits_equal(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, what
    same = torch.equal(bits(a), bits(b))
    assert same, f"{what}: max |diff| {(a.double() - b.double()).abs().max().item()}"


# ---- matrices ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m", KNOWN_ORDERS)
def test_known_orders_are_hadamard(m):
    h = known_hadamard(m).to(torch.int64)
    assert set(h.unique().tolist()) == {-1, 1}
    assert torch.equal(h @ h.T, m * torch.eye(m, dtype=torch.int64))


def test_every_order_of_the_issue_is_supported():
    for m in ISSUE_ORDERS:
        assert factor_size(m)[0] * factor_size(m)[1] == m
    assert factor_size(40) == (20, 2)
    assert factor_size(172) == (172, 1)
    assert factor_size(576) == (36, 16)
    assert factor_size(1536) == (12, 128)
    assert factor_size(14336) == (28, 512)


# every supported size up to 512 plus two large ones (larger sizes are Kronecker products of the same factors)
_SIZES = [n for n in range(1, 513) if is_supported_size(n)] + [1536, 172 * 16]


def test_orthonormal_for_every_supported_size():
    assert len(_SIZES) > 40
    for n in _SIZES:
        h = hadamard_matrix(n)
        err = (h @ h.T - torch.eye(n, dtype=torch.float64)).abs().max().item()
        assert err < 1e-12, (n, err)


def test_sylvester_matches_kron_definition():
    h = sylvester(8).to(torch.int64)
    assert torch.equal(h, h.T) and torch.equal(h @ h, 8 * torch.eye(8, dtype=torch.int64))


@pytest.mark.parametrize("n", [6, 44, 100, 11 * 256, 86])
def test_unsupported_size_names_size_and_block_alternative(n):
    with pytest.raises(ModelError) as e:
        HadamardRotation(n)
    msg = str(e.value)
    assert str(n) in msg and "kind='block'" in msg


def test_block_size_must_divide():
    with pytest.raises(ModelError, match="not divisible by block_size 32"):
        HadamardRotation(172, "block", 32)
    with pytest.raises(ModelError, match="needs block_size"):
        HadamardRotation(64, "block")
    with pytest.raises(ModelError, match="needs kind='block'"):
        HadamardRotation(64, "full", 16)


# ---- the torch reference ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,kind,block", [(64, "full", None), (172, "full", None), (576, "full", None),
                                             (96, "block", 32), (172, "block", 4), (80, "block", 40)])
def test_reference_equals_matrix_product_and_inverts(size, kind, block):
    torch.manual_seed(0)
    rot = HadamardRotation(size, kind, block, backend="torch")
    x = torch.randn(3, 7, size)
    y = rot(x)
    expect = x.double() @ rot.matrix().T
    # fp32 butterflies: each output is a sum of n terms with log2(n) (+ m for the mixing) roundings
    tol = 1e-6 * math.sqrt(size) * (1 + rot.m / 16)
    assert (y.double() - expect).abs().max().item() < tol
    assert (rot.inverse(y).double() - x.double()).abs().max().item() < 4 * tol
    assert torch.allclose(rot.inverse(x).double(), x.double() @ rot.matrix(), atol=tol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_dtype_and_rounding(dtype):
    x = torch.randn(4, 64).to(dtype)
    y = rotate_reference(x, 64)
    assert y.dtype == dtype
    # fp32 computation then one round-to-nearest-even cast
    assert torch.equal(bits(y), bits(rotate_reference(x.float(), 64).to(dtype)))


def test_rotation_module_has_no_state_and_survives_dtype_moves():
    rot = HadamardRotation(172)
    assert rot.state_dict() == {}
    rot = rot.to(torch.bfloat16)
    assert rot.pm1.dtype == torch.int8
    assert HadamardRotation(**rot.config()).extra_repr() == rot.extra_repr()


def test_rotation_refuses_bad_inputs():
    rot = HadamardRotation(64)
    with pytest.raises(ModelError, match="last dim must be 64"):
        rot(torch.zeros(2, 32))
    with pytest.raises(ModelError, match="floating-point"):
        rot(torch.zeros(2, 64, dtype=torch.int32))


# ---- Triton (TRITON_INTERPRET=1 on the CPU, real kernels on the GPU) -------------------------------------------
CASES = [(64, "full", None), (12, "full", None), (172, "full", None), (576, "full", None), (1536, "full", None),
         (128, "block", 16), (96, "block", 32), (120, "block", 40), (256, "block", 256)]


@pytest.mark.parametrize("size,kind,block", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_transform_is_bit_exact(size, kind, block, dtype):
    from ptq.kernels.hadamard import triton_rotate

    g = torch.Generator().manual_seed(size)
    x = (torch.randn(3, 5, size, generator=g) * 4).to(dtype)
    x[0, 0, :3] = 0.0
    x[0, 1, :] = -0.0  # signs of zeros survive like in the reference
    ref = HadamardRotation(size, kind, block, backend="torch")
    for inverse in (False, True):
        expect = ref.inverse(x) if inverse else ref(x)
        got = triton_rotate(x, ref, inverse=inverse)
        _assert_bits_equal(got, expect, f"{size} {kind} {block} {dtype} inverse={inverse}")


@pytest.mark.parametrize("size", [16384, 32768, 12 * 2048])
def test_triton_long_rows_two_pass(size):
    from ptq.kernels.hadamard import MAX_TILE, triton_rotate

    rot = HadamardRotation(size, backend="torch")
    assert rot.p > MAX_TILE or rot.m * rot.p > MAX_TILE
    x = torch.randn(2, size).to(torch.bfloat16)
    _assert_bits_equal(triton_rotate(x, rot), rot(x), f"size {size}")


SPECS = [QuantSpec.mxint(4), QuantSpec.mxfp("e2m1"), QuantSpec.mxfp("e4m3"), QuantSpec.mxint(8, block_size=16),
         QuantSpec.mx6(), QuantSpec.int_(4, block_size=32), QuantSpec.int_(8, block_size=64, symmetric=False),
         QuantSpec.mxfp("e2m1", rounding="stochastic", seed=3), QuantSpec.nvfp4(), QuantSpec.mxint(4, block_size=24)]


@pytest.mark.parametrize("size,kind,block", [(64, "full", None), (576, "full", None), (96, "block", 16),
                                             (128, "block", 64), (172, "full", None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rotate_quantize_is_bit_exact(size, kind, block, dtype):
    from ptq.kernels.hadamard import fusable, rotate_fake_quantize
    from ptq.quantizers import fake_quantize

    g = torch.Generator().manual_seed(7)
    x = (torch.randn(4, 3, size, generator=g) * 3).to(dtype)
    rot = HadamardRotation(size, kind, block, backend="torch")
    fused = 0
    for spec in SPECS:
        expect = fake_quantize(rot(x), spec, backend="torch")
        got = rotate_fake_quantize(x, rot, spec, backend="triton")
        _assert_bits_equal(got, expect, f"{size} {kind} {block} {spec} {dtype}")
        _assert_bits_equal(rotate_fake_quantize(x, rot, spec, backend="torch"), expect, "torch backend")
        fused += fusable(x, rot, spec)
    # the single-kernel path covers every power-of-two MX block here except the 172 row (no whole blocks)
    assert fused == (0 if size == 172 else 8 - (size == 96 and kind == "block"))


def test_fusable_rules():
    from ptq.kernels.hadamard import fusable

    x = torch.zeros(2, 576)
    assert fusable(x, HadamardRotation(576), QuantSpec.mxint(4))
    assert not fusable(x, HadamardRotation(576), QuantSpec.nvfp4())  # needs the rotated tensor's global amax
    assert not fusable(x, HadamardRotation(576), QuantSpec.mxint(4, axis=0))
    assert not fusable(torch.zeros(2, 172), HadamardRotation(172), QuantSpec.mxint(4))


@pytest.mark.gpu
@pytest.mark.parametrize("size,kind,block", [(4096, "full", None), (576, "full", None), (1536, "full", None),
                                             (8192, "block", 128), (14336, "full", None), (32768, "full", None)])
def test_gpu_bit_exact(size, kind, block):
    from ptq.kernels.hadamard import rotate_fake_quantize, triton_rotate
    from ptq.quantizers import fake_quantize

    x = torch.randn(64, size, device="cuda").to(torch.bfloat16)
    rot = HadamardRotation(size, kind, block).cuda()
    _assert_bits_equal(triton_rotate(x, rot), rotate_reference(x, size, kind=kind, block_size=block), "rotate")
    for spec in (QuantSpec.mxint(4), QuantSpec.mxfp("e2m1")):
        expect = fake_quantize(rotate_reference(x, size, kind=kind, block_size=block), spec, backend="torch")
        _assert_bits_equal(rotate_fake_quantize(x, rot, spec), expect, f"fused {spec}")


def test_backend_dispatch(monkeypatch):
    x = torch.randn(4, 96).to(torch.bfloat16)
    ref = HadamardRotation(96, backend="torch")
    assert ref.resolve_backend(x) == "torch"  # CPU tensors use the reference unless asked otherwise
    tri = HadamardRotation(96, backend="triton")
    _assert_bits_equal(tri(x), ref(x), "module with backend='triton'")
    _assert_bits_equal(tri.inverse(x), ref.inverse(x), "inverse with backend='triton'")
    monkeypatch.setenv("PTQ_BACKEND", "triton")
    assert HadamardRotation(96).resolve_backend(x) == "triton"
    monkeypatch.setenv("PTQ_BACKEND", "bogus")
    with pytest.raises(Exception, match="PTQ_BACKEND"):
        HadamardRotation(96)(x)
    with pytest.raises(ModelError, match="unknown Hadamard backend"):
        HadamardRotation(96, backend="cuda")
    with pytest.raises(Exception, match="CUDA"):
        HadamardRotation(64, backend="fast_hadamard_transform")(torch.zeros(2, 64))


# ---- kernel variants (ptq.kernels.hadamard.TileConfig; bench/hadamard.py times them on the GPU) -----------------
_VARIANTS = ["r2", "r4/512x1", "xor", "xor1/g1", "xor3/u0", "xor2/g1/u0/1024x2", "q0", "rows", "rows/l2",
             "rows/l2/i1/2048x2", "rows/l4/i1/256x1", "rows/l1/q0/8192x8"]


def _config(variant: str, rot):
    from ptq.kernels.hadamard import default_config, parse_variant

    return parse_variant(variant, default_config(rot))


@pytest.mark.parametrize("variant", _VARIANTS)
@pytest.mark.parametrize("size,kind,block", [(256, "full", None), (48, "full", None), (576, "full", None),
                                             (128, "block", 32), (128, "block", 64), (96, "block", 16)])
def test_every_variant_is_bit_exact(variant, size, kind, block):
    """Each butterfly formulation / tile / mixing form / quantization tail: the same bits as the reference, fused
    and unfused (bf16 takes the int32-pair load path, float32 the native one)."""
    from ptq.kernels.hadamard import rotate_fake_quantize, triton_rotate
    from ptq.quantizers import fake_quantize

    g = torch.Generator().manual_seed(size + len(variant))
    rot = HadamardRotation(size, kind, block, backend="torch")
    cfg = _config(variant, rot)
    if variant.startswith("rows") and rot.m > 1:
        with pytest.raises(PtqError, match="MODE_ROWS"):
            triton_rotate(torch.zeros(2, size), rot, config=cfg)
        return
    for dtype in (torch.bfloat16, torch.float32):
        x = (torch.randn(3, 7, size, generator=g) * 2).to(dtype)  # 21 rows: the last program is partial
        x[0, 0, :5] = -0.0
        _assert_bits_equal(triton_rotate(x, rot, config=cfg), rot(x), f"rotate {variant} {dtype}")
        _assert_bits_equal(triton_rotate(x, rot, inverse=True, config=cfg), rot.inverse(x),
                           f"inverse {variant} {dtype}")
        spec = QuantSpec.mxint(4)
        _assert_bits_equal(rotate_fake_quantize(x, rot, spec, backend="triton", config=cfg),
                           fake_quantize(rot(x), spec, backend="torch"), f"fused {variant} {dtype}")


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",  # inf arithmetic in the interpreter
                            "ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("variant", ["r2", "r4", "xor", "xor2", "rows/l4", "rows/l8/i1"])
def test_partner_fetch_survives_extreme_bit_patterns(variant):
    """The partner-fetch stage recovers a partner's bits as (v + partner) - v in wrapping int32 arithmetic: values
    whose patterns overflow that sum (large negatives, -0.0, subnormals, infinities) must come through unchanged."""
    from ptq.kernels.hadamard import triton_rotate

    vals = torch.tensor([-3.0e38, -1.0e-45, -0.0, 0.0, 3.0e38, -float("inf"), 1.0e-40, -2.5], dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    x = vals[torch.randint(0, len(vals), (4, 64), generator=g)]
    rot = HadamardRotation(64, backend="torch")
    got, expect = triton_rotate(x, rot, config=_config(variant, rot)), rot(x)
    nan = torch.isnan(expect)  # inf - inf: NaN on both sides (payloads may differ), everything else bit-exact
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(bits(got)[~nan], bits(expect)[~nan])


def _adversarial(g: torch.Generator, rows: int, n: int) -> torch.Tensor:
    """fp32 values that stress an MX tail: heavy-tailed magnitudes over the whole exponent range, signed zeros,
    subnormals, infinities and NaN inside otherwise finite blocks, whole blocks of tiny values (the shared exponent
    clamped at -127) and blocks at the top of the range."""
    from bitcheck import randn

    x = randn(g, rows, n, spread=3.0) * torch.exp2(torch.randint(-140, 120, (rows, 1), generator=g).float())
    x[0, :n // 2] = -0.0
    x[1, 3] = float("inf")
    x[1, 9] = -float("inf")
    x[2, 5] = float("nan")
    x[3] = torch.randn(n, generator=g) * 2.0 ** -135  # subnormal block
    x[4] = torch.randn(n, generator=g) * 2.0 ** 126  # saturating block
    x[5, ::3] = 0.0
    return x


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                            "ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spec", [QuantSpec.mxint(4), QuantSpec.mxint(8), QuantSpec.mxint(2, block_size=16),
                                  QuantSpec.mxint(6, block_size=64)], ids=str)
def test_lean_mxint_tail_matches_the_reference_on_extreme_values(spec, dtype):
    """``_mxint_even_tile`` (the shortened MXINT tail) against the torch reference and the generic tail, on values
    the shortcuts could get wrong. A block-diagonal rotation of block 1 is the identity, so the fused kernel
    quantizes exactly the input."""
    from ptq.kernels.hadamard import rotate_fake_quantize
    from ptq.quantizers import fake_quantize

    g = torch.Generator().manual_seed(spec.width)
    x = _adversarial(g, 8, 128).to(dtype)
    expect = fake_quantize(x, spec, backend="torch")
    nan = torch.isnan(expect)
    for size, block in [(128, 1), (128, 2), (128, 8)]:
        rot = HadamardRotation(size, "block", block, backend="torch")
        ref = fake_quantize(rot(x), spec, backend="torch")
        nan = torch.isnan(ref)
        for variant in ("rows", "rows/q0", "r2"):
            got = rotate_fake_quantize(x, rot, spec, backend="triton", config=_config(variant, rot))
            assert torch.equal(torch.isnan(got), nan), f"{size} {block} {variant}"
            assert torch.equal(bits(got)[~nan], bits(ref)[~nan]), f"{size} {block} {variant}"
            if block == 1:
                assert torch.equal(bits(got)[~nan], bits(expect)[~nan])


def test_unaligned_bf16_input_uses_the_int16_path():
    """A bf16 view at an odd element offset cannot be read as int32 pairs; the kernel falls back, same bits."""
    from ptq.kernels.hadamard import rotate_fake_quantize

    buf = torch.randn(1 + 5 * 64).to(torch.bfloat16)
    x = buf[1:].view(5, 64)
    assert x.data_ptr() % 4 != 0
    rot = HadamardRotation(64, "block", 32, backend="torch")
    from ptq.quantizers import fake_quantize

    spec = QuantSpec.mxfp("e2m1")
    _assert_bits_equal(rotate_fake_quantize(x, rot, spec, backend="triton"),
                       fake_quantize(rot(x), spec, backend="torch"), "unaligned")


def test_variant_strings_are_validated():
    from ptq.kernels.hadamard import (MODE_RADIX2, MODE_RADIX4, MODE_ROWS, MODE_XOR, TileConfig, default_config,
                                      parse_variant)

    base = default_config(HadamardRotation(4096))
    # the defaults the H100 measurements picked (see default_config)
    assert base.mode == MODE_XOR and base.xor_stages == 6
    assert default_config(HadamardRotation(2048)).xor_stages == 5  # an even number of stages left for radix-4
    b32, b64 = default_config(HadamardRotation(64, "block", 32)), default_config(HadamardRotation(64, "block", 64))
    assert (b32.mode, b32.lanes, b32.interleave) == (MODE_ROWS, 2, True)
    assert (b64.mode, b64.lanes, b64.interleave) == (MODE_ROWS, 2, False)
    assert default_config(HadamardRotation(576)).mode == MODE_XOR
    cfg = parse_variant("r4/8192x8", base)
    assert (cfg.mode, cfg.elems, cfg.warps) == (MODE_RADIX4, 8192, 8)
    cfg = parse_variant("rows/l2/i1/q0/c1", TileConfig())
    assert (cfg.mode, cfg.lanes, cfg.interleave, cfg.lean, cfg.pair_cvt) == (MODE_ROWS, 2, True, False, True)
    assert parse_variant("default", base) == base and parse_variant("r2", base).mode == MODE_RADIX2
    for bad in ("fast", "4096", "3000x4", "4096x3", "l3", "xor/q2"):
        with pytest.raises(PtqError, match="unknown token"):
            parse_variant(bad, base)


class _RecordingEnv(dict):
    """A stand-in for os.environ that records which names are read."""

    def __init__(self, env):
        super().__init__(env)
        self.read = []

    def get(self, key, default=None):
        self.read.append(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.read.append(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.read.append(key)
        return super().__contains__(key)


def test_configuration_is_not_read_from_the_environment(monkeypatch):
    """The launch path reads no PTQ_* environment variable per call; a configuration is passed explicitly."""
    import os

    from ptq.kernels.hadamard import rotate_fake_quantize, triton_rotate
    from ptq.quantizers import fake_quantize

    rot = HadamardRotation(64, "block", 32, backend="torch")
    x = torch.randn(4, 64)
    spec = QuantSpec.mxint(4)
    expect_rot, expect_q = rot(x), fake_quantize(rot(x), spec, backend="torch")
    triton_rotate(x, rot)  # compile / warm the caches first
    rotate_fake_quantize(x, rot, spec, backend="triton")
    monkeypatch.setenv("PTQ_HADAMARD_VARIANT", "r4")  # the former override: now without effect
    env = _RecordingEnv(os.environ)
    monkeypatch.setattr(os, "environ", env)
    got_rot, got_q = triton_rotate(x, rot), rotate_fake_quantize(x, rot, spec, backend="triton")
    assert not [k for k in env.read if k.startswith("PTQ_")]
    _assert_bits_equal(got_rot, expect_rot, "rotate")
    _assert_bits_equal(got_q, expect_q, "fused")


def test_bench_variants_parse_and_are_exact():
    """Every variant the GPU benchmark runs by default is a valid configuration with the reference's bits."""
    import importlib.util
    import os

    from ptq.kernels.hadamard import rotate_fake_quantize
    from ptq.quantizers import fake_quantize

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "hadamard.py")
    spec_ = importlib.util.spec_from_file_location("bench_hadamard", path)
    bench = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(bench)
    spec = QuantSpec.mxint(4)
    for size, kind, block in [(576, "full", None), (4096, "full", None), (128, "block", 32)]:
        rot = HadamardRotation(size, kind, block, backend="torch")
        x = torch.randn(2, size).to(torch.bfloat16)
        expect = fake_quantize(rot(x), spec, backend="torch")
        for v in bench.default_variants(rot):
            cfg = bench.variant_config(v, rot)
            _assert_bits_equal(rotate_fake_quantize(x, rot, spec, backend="triton", config=cfg), expect, f"{size} {v}")
    with pytest.raises(SystemExit):
        bench.check_variant("xor/fast")


_GPU_VARIANTS = [  # (size, kind, block, variants): each case with the formulations that apply to it
    (4096, "full", None, ["default", "xor3/q0", "r4/c1", "xor7/c1"]),
    (8192, "full", None, ["default"]),
    (576, "full", None, ["default", "r2/g1/c1/q0"]),
    (4096, "block", 32, ["default", "c1", "r2", "rows/l2/i1/c1", "rows/l4"]),
    (576, "block", 64, ["default", "rows/l1/8192x8/c1"]),
    (96, "block", 16, ["default", "rows/l2/c1/q0"]),
]


@pytest.mark.gpu
@pytest.mark.parametrize("size,kind,block,variant", [(n, k, b, v) for n, k, b, vs in _GPU_VARIANTS for v in vs])
def test_gpu_variants_bit_exact(size, kind, block, variant):
    """The compiled paths the interpreter never takes (hardware bf16 rounding, paired cvt, int32-pair loads) in
    every butterfly formulation, both mixing forms and both quantization tails."""
    from ptq.kernels.hadamard import rotate_fake_quantize, triton_rotate
    from ptq.quantizers import fake_quantize

    rot = HadamardRotation(size, kind, block).cuda()
    cfg = _config(variant, rot)
    x = (torch.randn(77, size, device="cuda") * 3).to(torch.bfloat16)
    x[3, :7] = -0.0
    x[5, 1] = float("inf")
    ref = rotate_reference(x, size, kind=kind, block_size=block)
    nan = torch.isnan(ref)
    got = triton_rotate(x, rot, config=cfg)
    assert torch.equal(torch.isnan(got), nan) and torch.equal(bits(got)[~nan], bits(ref)[~nan]), f"rotate {variant}"
    for spec in (QuantSpec.mxint(4), QuantSpec.int_(4, block_size=32), QuantSpec.mxint(8, block_size=16)):
        # bf16-exact store (lean tail for mxint) / rounded store
        expect = fake_quantize(ref, spec, backend="torch")
        nan = torch.isnan(expect)
        got = rotate_fake_quantize(x, rot, spec, config=cfg)
        assert torch.equal(torch.isnan(got), nan), f"fused {spec} {variant}"
        assert torch.equal(bits(got)[~nan], bits(expect)[~nan]), f"fused {spec} {variant}"


@pytest.mark.gpu
@pytest.mark.parametrize("spec", [QuantSpec.mxint(4), QuantSpec.mxint(8, block_size=16)], ids=str)
def test_gpu_lean_mxint_tail_on_extreme_values(spec):
    from ptq.kernels.hadamard import rotate_fake_quantize
    from ptq.quantizers import fake_quantize

    g = torch.Generator().manual_seed(spec.width)
    x = _adversarial(g, 64, 256).to(torch.bfloat16).cuda()
    for size, block in [(256, 1), (256, 32)]:
        rot = HadamardRotation(size, "block", block).cuda()
        ref = fake_quantize(rotate_reference(x, size, kind="block", block_size=block), spec, backend="torch")
        nan = torch.isnan(ref)
        for variant in ("default", "c1", "q0"):
            got = rotate_fake_quantize(x, rot, spec, config=_config(variant, rot))
            assert torch.equal(torch.isnan(got), nan), f"{block} {variant}"
            assert torch.equal(bits(got)[~nan], bits(ref)[~nan]), f"{block} {variant}"
