"""PackedLinear and the Triton packed GEMM (CPU: the kernel runs under TRITON_INTERPRET with tiny shapes).

What is asserted:
- torch backend == fake-quant LinearMX, bit for bit (fp32 and bf16; with and without rotations; GPTQ-style weights);
- Triton kernel == exact dequantized reference within the rounding of the output dtype (plus an fp32
  accumulation slack), for MXFP4 / NVFP4 / MXINT4 / MXINT8, odd shapes, several K chunks and split-K;
- state-dict round trip into an empty skeleton (also through safetensors bytes) reproduces outputs exactly;
- ``.to(dtype)`` leaves the packed codes and scales bit-identical; ``.to(device)`` moves them;
- backend selection (module attribute, environment variable, warning on fallback) and clear errors.
"""

import warnings

import pytest
import torch
from torch import nn

from ptq.config import LinearQuantConfig
from ptq.errors import ModelError, PtqError, QuantSpecError
from ptq.formats import QuantSpec
from ptq.modules.linear import LinearMX
from ptq.modules.packed import PackedLinear, same_bits
from ptq.quantizers import fake_quantize

SPECS = {
    "mxfp4": QuantSpec.mxfp("e2m1"),
    "nvfp4": QuantSpec.nvfp4(),
    "mxint4": QuantSpec.mxint(4),
    "mxint8": QuantSpec.mxint(8),
}


def _linear_mx(spec, in_f=72, out_f=40, bias=True, data_in=QuantSpec.mxint(8), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g) * 0.05)
        if bias:
            lin.bias.copy_(torch.randn(out_f, generator=g) * 0.1)
    return LinearMX.from_linear(lin.to(dtype), LinearQuantConfig(weight=spec, data_in=data_in)).eval()


def _x(*shape, dtype=torch.float32, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---- torch backend == LinearMX ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend_equals_linear_mx_bitwise(name, dtype):
    m = _linear_mx(SPECS[name], dtype=dtype)
    p = PackedLinear.from_linear_mx(m, backend="torch")
    x = _x(3, 5, 72, dtype=dtype)
    with torch.no_grad():
        y_ref, y = m(x), p(x)
    assert y.dtype == dtype
    assert same_bits(y, y_ref)
    assert same_bits(p.dequantized_weight(dtype), m.effective_weight())


@pytest.mark.parametrize("mode", ["matched", "activation_only"])
def test_rotation_is_stored_and_applied(mode):
    from ptq.modules.rotation import HadamardRotation

    m = _linear_mx(SPECS["mxfp4"], in_f=64)
    m.set_rotation(HadamardRotation(64), mode)
    p = PackedLinear.from_linear_mx(m, backend="torch")
    assert p.rotation is m.rotation and p.rotation_mode == mode
    assert p.config()["rotation"] == {"type": "HadamardRotation", "size": 64, "kind": "full", "block_size": None}
    x = _x(4, 64)
    with torch.no_grad():
        assert same_bits(p(x), m(x))
    # the rotation matters: without it the output differs
    plain = PackedLinear.from_linear_mx(_linear_mx(SPECS["mxfp4"], in_f=64), backend="torch")
    with torch.no_grad():
        assert not torch.equal(plain(x), p(x))


@pytest.mark.parametrize("name", list(SPECS))
def test_gptq_weight_on_the_grid_is_packed_exactly(name):
    """A GPTQ result is already on the grid: quantize() of it reproduces it bit for bit, so packing is lossless."""
    spec = SPECS[name]
    m = _linear_mx(spec, in_f=64, out_f=48)
    m.cfg = LinearQuantConfig(weight=spec, data_in=m.cfg.data_in, gptq=True)
    noisy = m.weight_to_quantize() + 0.01 * _x(48, 64, seed=7)
    m.set_quantized_weight(fake_quantize(noisy, spec))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a mismatch would warn
        p = PackedLinear.from_linear_mx(m, backend="torch")
    assert same_bits(p.dequantized_weight(torch.float32), m.effective_weight())
    x = _x(2, 64)
    with torch.no_grad():
        assert same_bits(p(x), m(x))


# ---- Triton kernel ---------------------------------------------------------------------------------------------------
def _check_close_to_exact(y, x, w_exact, bias=None):
    """|y - x @ W^T| <= half an ulp of y's dtype (relative) + fp32 accumulation slack."""
    ref = x.double() @ w_exact.double().t()
    if bias is not None:
        ref = ref + bias.double()
    slack = 1e-5 * (x.double().abs() @ w_exact.double().abs().t()) + 1e-30
    rel = 2.0 ** -8 if y.dtype == torch.bfloat16 else 2.0 ** -11 if y.dtype == torch.float16 else 0.0
    bound = rel * ref.abs() * 1.0001 + slack * (2 if bias is not None else 1)
    err = (y.double() - ref).abs()
    assert bool((err <= bound).all()), f"max err {err.max().item():.3g}, worst excess {(err - bound).max().item():.3g}"


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_matches_exact_reference(name, dtype):
    from ptq.kernels.packed_matmul import packed_matmul

    spec = SPECS[name]
    p = PackedLinear.from_weight(_x(40, 72, seed=3) * 0.1, spec)  # 72: padded to whole blocks
    w = p.dequantized_weight(torch.float32)
    g = p.global_scale.view(torch.float32).reshape(1) if p.global_scale is not None else None
    for m in (1, 5):
        x = _x(m, 72, dtype=dtype, seed=m)
        y = packed_matmul(x, p.qweight, p.scales, spec, 40, global_scale=g)
        assert y.dtype == dtype and y.shape == (m, 40)
        _check_close_to_exact(y, x.float(), w)


def _one_hot_check(name, device, dtype, big=False, config=None):
    """x = identity: every output element is one decoded weight times 1 plus exact zeros, so the kernel's in-tile
    decoding must reproduce ``dequantize`` bit for bit (NVFP4's global scale included: (q * s) * g in fp32, then the
    output rounding, exactly as the reference orders it)."""
    from ptq.kernels.packed_matmul import packed_matmul
    from ptq.quantizers import dequantize

    spec = SPECS[name]
    w = torch.randn(40, 72, generator=torch.Generator().manual_seed(9)) * 0.1
    w[0, :32] = torch.linspace(-6, 6, 32)  # every E2M1 magnitude incl. the subnormal 0.5 within one block
    w[1, :] = 0.0  # an all-zero row (E8M0 code 0 region)
    if big:  # block scales above 2 (E8M0 code > 128): the kernel's second E2M1 scaling path
        w[2, :] *= 1e4
    p = PackedLinear.from_weight(w.to(device), spec)
    g = p.global_scale.view(torch.float32).reshape(1) if p.global_scale is not None else None
    x = torch.eye(72, device=device, dtype=dtype)
    ref = dequantize(p.qtensor(), dtype=dtype).t() + 0.0  # + 0.0: -0 codes sum to +0
    # None: MXFP4's general scale path; the cached max code: its one-multiply path when every code is <= 128
    for code in (None, p._max_scale_code):
        y = packed_matmul(x, p.qweight, p.scales, spec, 40, global_scale=g, config=config, max_scale_code=code)
        assert torch.equal(y, ref)
        assert same_bits(y + 0.0, ref)


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("big", [False, True])
def test_triton_kernel_decodes_every_weight_exactly(name, dtype, big):
    _one_hot_check(name, "cpu", dtype, big)


@pytest.mark.parametrize("cfg", [{"BM": 16, "BN": 16, "BK": 32, "SPLIT_K": 1},
                                 {"BM": 16, "BN": 32, "BK": 64, "SPLIT_K": 2},
                                 {"BM": 16, "BN": 16, "BK": 32, "SPLIT_K": 4}])
def test_triton_kernel_k_chunks_and_split_k(cfg):
    """Several K chunks per program, split-K partial sums (deterministic fixup), tiles over ragged N."""
    from ptq.kernels.packed_matmul import packed_matmul

    spec = SPECS["mxfp4"]
    p = PackedLinear.from_weight(_x(24, 200, seed=5) * 0.1, spec)
    x = _x(3, 200, dtype=torch.bfloat16, seed=6)
    y = packed_matmul(x, p.qweight, p.scales, spec, 24, config=cfg)
    _check_close_to_exact(y, x.float(), p.dequantized_weight(torch.float32))
    y2 = packed_matmul(x, p.qweight, p.scales, spec, 24, config=cfg)  # counters were reset: same result again
    assert same_bits(y, y2)


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("bias", [False, True])
def test_triton_backend_agrees_with_torch_backend(name, bias):
    m = _linear_mx(SPECS[name], bias=bias, dtype=torch.bfloat16)
    p = PackedLinear.from_linear_mx(m)
    x = _x(2, 3, 72, dtype=torch.bfloat16)
    with torch.no_grad():
        p.backend = "torch"
        y_torch = p(x)
        p.backend = "triton"
        y_triton = p(x)
    assert y_triton.shape == y_torch.shape and y_triton.dtype == torch.bfloat16
    if not bias:  # both within bf16 output rounding of the exact product
        xq = p.prepare_input(x).float()
        w = p.dequantized_weight(torch.float32)
        _check_close_to_exact(y_torch, xq, w)
        _check_close_to_exact(y_triton, xq, w)
    else:  # the Triton path rounds the product, then adds the bias in bf16: one more rounding
        diff = (y_triton.float() - y_torch.float()).abs()
        assert bool((diff <= 2.0 ** -7 * y_torch.float().abs() + 2.0 ** -8 * p.bias.float().abs().max()).all())


def test_packed_matmul_rejects_bad_shapes_and_formats():
    from ptq.kernels.packed_matmul import packed_matmul

    p = PackedLinear.from_weight(_x(16, 64), SPECS["mxfp4"])
    with pytest.raises(QuantSpecError, match="does not fit"):
        packed_matmul(_x(2, 128), p.qweight, p.scales, SPECS["mxfp4"], 16)
    with pytest.raises(QuantSpecError, match="supports MXFP4"):
        packed_matmul(_x(2, 64), p.qweight, p.scales, QuantSpec.mxfp("e4m3"), 16)


# ---- state dict, dtype, device ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SPECS))
def test_state_dict_round_trip_into_empty_skeleton(name):
    from safetensors.torch import load, save

    m = _linear_mx(SPECS[name])
    p = PackedLinear.from_linear_mx(m, backend="torch")
    sd = p.state_dict()
    if name == "nvfp4":  # native dtypes outside
        assert sd["scales"].dtype == torch.float8_e4m3fn and sd["global_scale"].dtype == torch.float32
    else:
        assert sd["scales"].dtype == torch.uint8
    skeleton = PackedLinear.from_config(p.config())
    assert not same_bits(skeleton.qweight, p.qweight)
    skeleton.load_state_dict(load(save({k: v.contiguous() for k, v in sd.items()})))
    for k in ("qweight", "scales"):
        assert same_bits(getattr(skeleton, k), getattr(p, k))
    x = _x(4, 72)
    with torch.no_grad():
        assert same_bits(skeleton(x), p(x))
        assert same_bits(skeleton(x), m(x))


@pytest.mark.parametrize("name", list(SPECS))
def test_to_dtype_leaves_packed_data_untouched(name):
    m = _linear_mx(SPECS[name])
    p = PackedLinear.from_linear_mx(m, backend="torch")
    before = {k: v.clone() for k, v in p.named_buffers()}
    p.to(torch.bfloat16)
    for k, v in p.named_buffers():
        assert v.dtype == before[k].dtype and same_bits(v, before[k]), k
    assert p.bias.dtype == torch.bfloat16  # the compute dtype did change
    # it computes with the same packed values (quantized from the fp32 weight), now in bf16; a LinearMX cast to
    # bf16 would instead re-quantize the rounded bf16 weight
    x = _x(3, 72, dtype=torch.bfloat16)
    w_fp32 = m.effective_weight()
    with torch.no_grad():
        expect = torch.nn.functional.linear(p.prepare_input(x), w_fp32.to(torch.bfloat16), p.bias)
        assert same_bits(p(x), expect)
    p.to("meta")  # .to(device) moves the packed buffers
    assert p.qweight.device.type == "meta" and p.scales.device.type == "meta"


def test_backend_selection(monkeypatch):
    p = PackedLinear.from_weight(_x(16, 64), SPECS["mxfp4"])
    x = _x(2, 64)
    monkeypatch.delenv("PTQ_PACKED_BACKEND", raising=False)
    assert p.resolve_backend(x) == "torch"  # auto on a CPU tensor
    monkeypatch.setenv("PTQ_PACKED_BACKEND", "triton")
    assert p.resolve_backend(x) == "triton"  # the interpreter runs it here
    monkeypatch.setenv("PTQ_PACKED_BACKEND", "bogus")
    with pytest.raises(PtqError, match="PTQ_PACKED_BACKEND"):
        p.resolve_backend(x)
    p.backend = "torch"  # the module attribute wins over the environment
    assert p.resolve_backend(x) == "torch"
    q = PackedLinear.from_weight(_x(16, 64), QuantSpec.mxfp("e4m3"), backend="triton")
    with pytest.warns(UserWarning, match="does not support"):
        assert q.resolve_backend(x) == "torch"
    with pytest.raises(PtqError, match="backend"):
        PackedLinear(64, 16, SPECS["mxfp4"], backend="cuda")


def test_unpackable_inputs_are_refused():
    with pytest.raises(ModelError, match="cannot be stored packed"):
        PackedLinear(64, 16, QuantSpec.mx6())
    with pytest.raises(ModelError, match="nothing to pack"):
        PackedLinear.from_linear_mx(_linear_mx(None))
    w = _x(16, 64)
    w[3, 5] = float("nan")
    with pytest.raises(QuantSpecError, match="NaN"):
        PackedLinear.from_weight(w, SPECS["mxfp4"])
    p = PackedLinear.from_weight(_x(16, 64), SPECS["mxfp4"])
    with pytest.raises(ModelError, match=r"\[\.\.\., 64\]"):
        p(_x(2, 32))


def test_packed_bytes_per_weight():
    p = PackedLinear.from_weight(_x(64, 256), SPECS["mxfp4"])
    assert p.packed_nbytes * 8 / (64 * 256) == 4.25  # 4-bit codes + one 8-bit scale per 32
    q = PackedLinear.from_weight(_x(64, 256), SPECS["nvfp4"])
    assert q.packed_nbytes == 64 * 128 + 64 * 16 + 4


# ---- GPU (skipped without CUDA) --------------------------------------------------------------------------------------
GPU_CFG = {"BM": 64, "BN": 64, "BK": 64, "SPLIT_K": 1}  # explicit tiles: one compile per case, no autotuning


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(SPECS))
def test_gpu_triton_matches_exact_reference(name):
    """Autotuned for MXFP4 (the path users hit); a fixed tile for the other formats to keep compile time down."""
    from ptq.kernels.packed_matmul import packed_matmul

    spec = SPECS[name]
    dev = torch.device("cuda")
    cfg = None if name == "mxfp4" else GPU_CFG
    for n, k in ((200, 608), (576, 1536)):
        p = PackedLinear.from_weight(torch.randn(n, k, device=dev) * 0.05, spec)
        w = p.dequantized_weight(torch.float32)
        g = p.global_scale.view(torch.float32).reshape(1) if p.global_scale is not None else None
        for m in (1, 16, 300):
            x = torch.randn(m, k, device=dev).to(torch.bfloat16)
            y = packed_matmul(x, p.qweight, p.scales, spec, n, global_scale=g, config=cfg)
            assert y.dtype == torch.bfloat16
            _check_close_to_exact(y, x.float(), w)
            assert same_bits(y, packed_matmul(x, p.qweight, p.scales, spec, n, global_scale=g, config=cfg))


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("big", [False, True])
def test_gpu_triton_decodes_every_weight_exactly(name, dtype, big):
    _one_hot_check(name, "cuda", dtype, big, config=GPU_CFG)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [{"BM": 16, "BN": 32, "BK": 256, "SPLIT_K": 4, "num_warps": 4, "num_stages": 3},
                                 {"BM": 16, "BN": 64, "BK": 128, "SPLIT_K": 8, "num_warps": 4, "num_stages": 4}])
def test_gpu_split_k_fixup_is_exact_and_deterministic(cfg):
    from ptq.kernels.packed_matmul import packed_matmul

    spec = SPECS["mxfp4"]
    dev = torch.device("cuda")
    p = PackedLinear.from_weight(torch.randn(4096, 4096, device=dev) * 0.02, spec)
    x = torch.randn(3, 4096, device=dev, dtype=torch.bfloat16)
    ys = [packed_matmul(x, p.qweight, p.scales, spec, 4096, config=cfg) for _ in range(20)]
    assert all(same_bits(ys[0], y) for y in ys)
    _check_close_to_exact(ys[0], x.float(), p.dequantized_weight(torch.float32))


@pytest.mark.gpu
def test_gpu_module_backends():
    m = _linear_mx(SPECS["mxfp4"], in_f=576, out_f=1536, dtype=torch.bfloat16).cuda()
    p = PackedLinear.from_linear_mx(m)
    x = torch.randn(4, 576, device="cuda", dtype=torch.bfloat16)
    assert p.resolve_backend(x) == "triton"
    assert p.resolve_backend(torch.randn(4096, 576, device="cuda", dtype=torch.bfloat16)) == "torch"
    with torch.no_grad():
        p.backend = "torch"
        assert same_bits(p(x), m(x))
        p.backend = "triton"
        y = p(x)
    diff = (y.float() - m(x).float()).abs()
    assert bool((diff <= 2.0 ** -7 * m(x).float().abs() + 2.0 ** -7 * p.bias.float().abs().max() + 1e-3).all())


@pytest.mark.parametrize("name", list(SPECS))
def test_triton_code_emitter_layout_matches_storage(name):
    """On CUDA packing uses helper 3's ``triton_quantize_packed``: its output must fill the buffers bit for bit as the
    reference does (checked here under the interpreter)."""
    from ptq.kernels import triton_quantize_packed

    spec = SPECS[name]
    w = _x(24, 72, seed=11) * 0.1
    ref = PackedLinear.from_weight(w, spec)  # CPU: the torch reference
    pq = triton_quantize_packed(w, spec)
    p = PackedLinear(72, 24, spec)
    p._store(pq.codes, pq.scales, pq.global_scale)
    for k in ("qweight", "scales") + (("global_scale",) if name == "nvfp4" else ()):
        assert same_bits(getattr(p, k), getattr(ref, k)), k


# ---- per-call overhead: no host syncs on the Triton path -------------------------------------------------------------
class _HostSync(AssertionError):
    pass


def _forbid_host_syncs(monkeypatch):
    """Make every Tensor -> Python value conversion (what forces a device sync on CUDA) raise."""
    def boom(name):
        def f(self, *a, **k):
            raise _HostSync(f"host sync: Tensor.{name} called in the per-call path")
        return f

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, boom(name))
    monkeypatch.setattr(torch.cuda, "synchronize", boom("cuda.synchronize"))


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("data_in", [None, QuantSpec.mxint(8)])
def test_triton_forward_performs_no_host_sync(name, data_in, monkeypatch):
    """The data-dependent launch parameter (MXFP4's largest scale code) is cached when the weight is stored, so a
    forward (input quantization included) only launches work: the same bits, without reading any device value."""
    m = _linear_mx(SPECS[name], in_f=72, out_f=40, bias=True, data_in=data_in, dtype=torch.bfloat16)
    p = PackedLinear.from_linear_mx(m, backend="triton")
    if name == "mxfp4":
        assert p._max_scale_code == int(p.scales.max())
    x = _x(3, 72, dtype=torch.bfloat16)
    with torch.no_grad():
        with monkeypatch.context() as mp:
            _forbid_host_syncs(mp)
            # the CPU reference's finiteness shortcut reads one value (no sync on the CPU); behave as on CUDA
            import ptq.quantizers.common as common

            mp.setattr(common, "surely_finite", lambda x: False)
            with pytest.raises(_HostSync):  # the guard itself works
                bool(x.sum() > 0)
            y = p(x)  # the first forward too: nothing is computed lazily
            y2 = p(x)
        ref = p(x)
    assert same_bits(y, ref) and same_bits(y2, ref)


def test_max_scale_code_is_cached_on_store_and_load_only():
    from ptq.kernels.packed_matmul import max_scale_code

    w = _x(40, 72, seed=3) * 0.1
    w[2] *= 1e4  # a block scale above 2: E8M0 code > 128
    p = PackedLinear.from_weight(w, SPECS["mxfp4"])
    assert p._max_scale_code == max_scale_code(p.scales) > 128
    q = PackedLinear(72, 40, SPECS["mxfp4"])
    assert q._max_scale_code == 0  # zero scales
    q.load_state_dict(p.state_dict())
    assert q._max_scale_code == p._max_scale_code
    q.set_codes(PackedLinear.from_weight(_x(40, 72, seed=3) * 0.1, SPECS["mxfp4"]).qtensor())
    assert q._max_scale_code == max_scale_code(q.scales) <= 128
    assert PackedLinear(72, 40, SPECS["nvfp4"])._max_scale_code is None  # E4M3 scales: not used
    assert PackedLinear(72, 40, SPECS["mxfp4"], device="meta")._max_scale_code is None


@pytest.mark.parametrize("big", [False, True])
def test_packed_matmul_is_sync_free_and_scale_paths_agree(big, monkeypatch):
    """Both MXFP4 scale paths (one multiply for codes <= 128, two otherwise; None = the general one) give the same
    bits, and neither the call with a cached max_scale_code nor the one without reads a device value."""
    from ptq.kernels.packed_matmul import max_scale_code, packed_matmul

    spec = SPECS["mxfp4"]
    w = _x(40, 72, seed=3) * 0.1
    if big:
        w[2] *= 1e4
    p = PackedLinear.from_weight(w, spec)
    code = max_scale_code(p.scales)
    x = _x(3, 72, dtype=torch.bfloat16, seed=4)
    with monkeypatch.context() as mp:
        _forbid_host_syncs(mp)
        y_cached = packed_matmul(x, p.qweight, p.scales, spec, 40, max_scale_code=code)
        y_general = packed_matmul(x, p.qweight, p.scales, spec, 40)
    assert same_bits(y_cached, y_general)
    _check_close_to_exact(y_cached, x.float(), p.dequantized_weight(torch.float32))
    with pytest.raises(QuantSpecError, match="max_scale_code must be a Python int"):
        packed_matmul(x, p.qweight, p.scales, spec, 40, max_scale_code=p.scales.max())


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("data_in", [None, QuantSpec.mxint(8)])
def test_gpu_forward_is_sync_free_and_graph_capturable(name, data_in):
    """After the first (tuning) call a decode-shaped forward neither synchronises (torch's sync debug mode would
    raise) nor breaks CUDA graph capture, and replaying the graph gives the eager bits."""
    m = _linear_mx(SPECS[name], in_f=576, out_f=1536, data_in=data_in, dtype=torch.bfloat16).cuda()
    p = PackedLinear.from_linear_mx(m, backend="triton")
    x = torch.randn(1, 576, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref = p(x)  # compile + autotune
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            y = p(x)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert same_bits(y, ref)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            yg = p(x)
        g.replay()
        torch.cuda.synchronize()
        assert same_bits(yg, ref)
