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
_VARIANT_ENVS = [
    {"PTQ_HADAMARD_VARIANT": "r2"},
    {"PTQ_HADAMARD_VARIANT": "r4", "PTQ_HADAMARD_TILE": "512,1"},
    {"PTQ_HADAMARD_VARIANT": "xor"},
    {"PTQ_HADAMARD_VARIANT": "xor1", "PTQ_HADAMARD_MIXG": "1"},
    {"PTQ_HADAMARD_VARIANT": "xor3", "PTQ_HADAMARD_UNROLL": "0"},
    {"PTQ_HADAMARD_VARIANT": "xor2", "PTQ_HADAMARD_MIXG": "1", "PTQ_HADAMARD_UNROLL": "0",
     "PTQ_HADAMARD_TILE": "1024,2"},
]


@pytest.mark.parametrize("env", _VARIANT_ENVS, ids=lambda e: "-".join(f"{k[13:]}={v}" for k, v in e.items()))
@pytest.mark.parametrize("size,kind,block", [(256, "full", None), (48, "full", None), (576, "full", None),
                                             (128, "block", 32), (128, "block", 64), (96, "block", 16)])
def test_every_variant_is_bit_exact(monkeypatch, env, size, kind, block):
    """Each butterfly formulation / tile / mixing form: the same bits as the reference, fused and unfused (bf16
    takes the int32-pair load path, float32 the native one)."""
    from ptq.kernels.hadamard import rotate_fake_quantize, triton_rotate
    from ptq.quantizers import fake_quantize

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    g = torch.Generator().manual_seed(size + len(env))
    rot = HadamardRotation(size, kind, block, backend="torch")
    for dtype in (torch.bfloat16, torch.float32):
        x = (torch.randn(3, 7, size, generator=g) * 2).to(dtype)  # 21 rows: the last program is partial
        x[0, 0, :5] = -0.0
        _assert_bits_equal(triton_rotate(x, rot), rot(x), f"rotate {env} {dtype}")
        _assert_bits_equal(triton_rotate(x, rot, inverse=True), rot.inverse(x), f"inverse {env} {dtype}")
        spec = QuantSpec.mxint(4)
        _assert_bits_equal(rotate_fake_quantize(x, rot, spec, backend="triton"),
                           fake_quantize(rot(x), spec, backend="torch"), f"fused {env} {dtype}")


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",  # inf arithmetic in the interpreter
                            "ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("variant", ["r2", "r4", "xor", "xor2"])
def test_partner_fetch_survives_extreme_bit_patterns(monkeypatch, variant):
    """The partner-fetch stage recovers a partner's bits as (v + partner) - v in wrapping int32 arithmetic: values
    whose patterns overflow that sum (large negatives, -0.0, subnormals, infinities) must come through unchanged."""
    from ptq.kernels.hadamard import triton_rotate

    monkeypatch.setenv("PTQ_HADAMARD_VARIANT", variant)
    vals = torch.tensor([-3.0e38, -1.0e-45, -0.0, 0.0, 3.0e38, -float("inf"), 1.0e-40, -2.5], dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    x = vals[torch.randint(0, len(vals), (4, 64), generator=g)]
    rot = HadamardRotation(64, backend="torch")
    got, expect = triton_rotate(x, rot), rot(x)
    nan = torch.isnan(expect)  # inf - inf: NaN on both sides (payloads may differ), everything else bit-exact
    assert torch.equal(torch.isnan(got), nan)
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


def test_variant_environment_is_validated(monkeypatch):
    from ptq.kernels.hadamard import MODE_RADIX2, MODE_RADIX4, MODE_XOR, _env_config, default_config

    rot = HadamardRotation(4096)
    base = default_config(rot)
    # the defaults the H100 measurement picked (see default_config)
    assert base.mode == MODE_XOR and base.xor_stages == 5
    assert default_config(HadamardRotation(64, "block", 32)).mode == MODE_RADIX2
    monkeypatch.setenv("PTQ_HADAMARD_VARIANT", "r4")
    monkeypatch.setenv("PTQ_HADAMARD_TILE", "8192,8")
    cfg = _env_config(base)
    assert (cfg.mode, cfg.elems, cfg.warps) == (MODE_RADIX4, 8192, 8)
    for var, val, msg in [("PTQ_HADAMARD_VARIANT", "fast", "PTQ_HADAMARD_VARIANT"),
                          ("PTQ_HADAMARD_TILE", "4096", "ELEMS,WARPS"),
                          ("PTQ_HADAMARD_TILE", "3000,4", "power of two")]:
        monkeypatch.setenv(var, val)
        with pytest.raises(PtqError, match=msg):
            _env_config(base)
        monkeypatch.delenv(var)


def test_bench_variants_parse_and_are_exact(monkeypatch):
    """Every variant the GPU benchmark runs by default is a valid configuration with the reference's bits."""
    import importlib.util
    import os

    from ptq.kernels.hadamard import _env_config, default_config, rotate_fake_quantize
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
            with bench._Env(bench.variant_env(v)):
                _env_config(default_config(rot))
                _assert_bits_equal(rotate_fake_quantize(x, rot, spec, backend="triton"), expect, f"{size} {v}")
    with pytest.raises(SystemExit):
        bench.variant_env("xor/fast")


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["r2", "r4", "xor", "xor3", "xor5"])
@pytest.mark.parametrize("size,kind,block", [(4096, "full", None), (576, "full", None), (4096, "block", 32),
                                             (8192, "full", None)])
def test_gpu_variants_bit_exact(monkeypatch, variant, size, kind, block):
    """The compiled paths the interpreter never takes (hardware bf16 rounding, int32-pair loads) in every
    butterfly formulation, and both mixing forms."""
    from ptq.kernels.hadamard import rotate_fake_quantize, triton_rotate
    from ptq.quantizers import fake_quantize

    monkeypatch.setenv("PTQ_HADAMARD_VARIANT", variant)
    x = (torch.randn(77, size, device="cuda") * 3).to(torch.bfloat16)
    rot = HadamardRotation(size, kind, block).cuda()
    ref = rotate_reference(x, size, kind=kind, block_size=block)
    for mixg in ("4", "1"):
        monkeypatch.setenv("PTQ_HADAMARD_MIXG", mixg)
        _assert_bits_equal(triton_rotate(x, rot), ref, f"rotate {variant} g{mixg}")
        for spec in (QuantSpec.mxint(4), QuantSpec.int_(4, block_size=32)):  # bf16-exact store / rounded store
            _assert_bits_equal(rotate_fake_quantize(x, rot, spec), fake_quantize(ref, spec, backend="torch"),
                               f"fused {spec} {variant} g{mixg}")
