"""The decode-shape packed GEMM (``packed_matmul`` path "decode": int32 code words, M <= 16) under the interpreter.

What is asserted:
- every decoded weight is bit-exact (one-hot inputs reproduce ``dequantize``), for each format, both reductions
  (tensor-core dot / FMA), both MXFP4 scale paths, fp32 / bf16 / fp16 inputs;
- products are within the output rounding of the exact result for M = 1, 5, 16, K not a multiple of the chunk,
  N not a multiple of BN, split-K on and off, and repeated calls give the same bits (split-K counters reset);
- "auto" picks the decode path for M <= 16 and the tile kernel above; clear errors for bad paths / configs;
- the autotuning space, pruned for the Llama-3-8B shapes, only offers configs that can run them.
"""

import pytest
import torch

from ptq.errors import QuantSpecError
from ptq.formats import QuantSpec
from ptq.modules.packed import PackedLinear, same_bits
from tests.test_packed import _check_close_to_exact

SPECS = {
    "mxfp4": QuantSpec.mxfp("e2m1"),
    "nvfp4": QuantSpec.nvfp4(),
    "mxint4": QuantSpec.mxint(4),
    "mxint8": QuantSpec.mxint(8),
}


def _packed(name, n, k, seed=3, big=False):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.1
    w[0, :32] = torch.linspace(-6, 6, 32)  # every E2M1 magnitude incl. the subnormal 0.5
    w[1, :] = 0.0  # all-zero blocks
    if big:
        w[2, :] *= 1e4  # E8M0 codes > 128: MXFP4's general scale path
    p = PackedLinear.from_weight(w, SPECS[name])
    g = p.global_scale.view(torch.float32).reshape(1) if p.global_scale is not None else None
    return p, g


def _run(p, g, x, config=None, path="decode", code="cached"):
    from ptq.kernels.packed_matmul import packed_matmul

    msc = p._max_scale_code if code == "cached" else None
    return packed_matmul(x, p.qweight, p.scales, p.weight_spec, p.out_features, global_scale=g, config=config,
                         max_scale_code=msc, path=path)


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("big", [False, True])
def test_decode_path_decodes_every_weight_exactly(name, dtype, big):
    """x = 16 rows of the identity: each output is one decoded weight (times 1, plus exact zeros)."""
    from ptq.quantizers import dequantize

    p, g = _packed(name, 40, 72, big=big)
    ref = dequantize(p.qtensor(), dtype=dtype).t() + 0.0  # [72, 40]; + 0.0: -0 codes sum to +0
    eye = torch.eye(72, dtype=dtype)
    for start in (0, 16, 32, 48, 56):  # 16 rows at a time cover all 72 columns
        for code in ("cached", None):
            y = _run(p, g, eye[start:start + 16], code=code)
            assert same_bits(y + 0.0, ref[start:start + 16])
    # the FMA reduction (M == 1), one column at a time for a few columns
    for col in (0, 5, 31, 33, 71):
        for cfg in ({"MODE": 1, "BN": 16, "BKW": 16, "SPLIT_K": 1}, {"MODE": 1, "BN": 32, "BKW": 32, "SPLIT_K": 1}):
            if name == "mxint8" and cfg["BKW"] == 16:
                cfg = dict(cfg, BKW=32)  # MXINT8: 4 codes per word, blocks of 32 are 8 words
            y = _run(p, g, eye[col:col + 1], config=cfg)
            assert same_bits(y + 0.0, ref[col:col + 1])


DECODE_CFGS = [
    {"MODE": 0, "BN": 16, "BKW": 16, "SPLIT_K": 1},
    {"MODE": 0, "BN": 32, "BKW": 16, "SPLIT_K": 2},  # ragged N (40), two K-slices
    {"MODE": 0, "BN": 16, "BKW": 32, "SPLIT_K": 1},  # K (200) not a multiple of the chunk
    {"MODE": 0, "BN": 16, "BKW": 16, "SPLIT_K": 3},  # uneven slices: the last one runs past K
    {"MODE": 0, "BN": 16, "BKW": 16, "SPLIT_K": 8},  # more slices than chunks: empty slices add zeros
]


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("cfg", DECODE_CFGS, ids=lambda c: f"bn{c['BN']}-bkw{c['BKW']}-sk{c['SPLIT_K']}")
def test_decode_path_products_and_split_k(name, cfg):
    p, g = _packed(name, 40, 200, seed=5)
    w = p.dequantized_weight(torch.float32)
    if name == "mxint8" and cfg["BKW"] < 32:
        cfg = dict(cfg, BKW=32)
    for m in (1, 5, 16):
        x = torch.randn(m, 200, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
        y = _run(p, g, x, config=cfg)
        assert y.shape == (m, 40) and y.dtype == torch.bfloat16
        _check_close_to_exact(y, x.float(), w)
        assert same_bits(y, _run(p, g, x, config=cfg))  # counters were reset: same result again


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4", "mxint4"])
@pytest.mark.parametrize("split", [1, 2, 4])
def test_decode_path_fma_reduction(name, split):
    p, g = _packed(name, 24, 520, seed=7)  # 520: padded to whole blocks, several chunks
    w = p.dequantized_weight(torch.float32)
    x = torch.randn(1, 520, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    cfg = {"MODE": 1, "BN": 16, "BKW": 16, "SPLIT_K": split}
    y = _run(p, g, x, config=cfg)
    _check_close_to_exact(y, x.float(), w)
    assert same_bits(y, _run(p, g, x, config=cfg))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_path_other_input_dtypes(dtype):
    p, g = _packed("mxfp4", 40, 72)
    x = torch.randn(3, 72, generator=torch.Generator().manual_seed(2)).to(dtype)
    y = _run(p, g, x, path="auto")
    assert y.dtype == dtype
    _check_close_to_exact(y, x.float(), p.dequantized_weight(torch.float32))


def test_auto_path_choice_and_leading_dims(monkeypatch):
    import ptq.kernels.packed_matmul as pm

    p, g = _packed("mxfp4", 40, 72)
    calls = []
    orig = pm._decode_launch
    monkeypatch.setattr(pm, "_decode_launch", lambda *a, **k: calls.append(a[5]) or orig(*a, **k))
    x = torch.randn(2, 1, 72, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)  # M = 2 x 1 = 2
    y = _run(p, g, x[:1], path="auto")  # M = 1: the decode kernel
    assert y.shape == (1, 1, 40) and calls == [1]
    _check_close_to_exact(y.reshape(1, 40), x[:1].reshape(1, 72).float(), p.dequantized_weight(torch.float32))
    _run(p, g, x, path="auto")  # M = 2 (the decode kernel's dot path measured slower there): the tile kernel
    _run(p, g, torch.randn(16, 72).to(torch.bfloat16), path="auto")
    assert calls == [1]
    # a tile config selects the tile kernel even at M = 1
    _run(p, g, x[0], config={"BM": 16, "BN": 16, "BK": 32, "SPLIT_K": 1}, path="auto")
    assert calls == [1]


def test_decode_path_errors():
    p, g = _packed("mxfp4", 40, 72)
    x = torch.randn(2, 72).to(torch.bfloat16)
    with pytest.raises(QuantSpecError, match="path must be"):
        _run(p, g, x, path="fast")
    with pytest.raises(QuantSpecError, match="M <= 16"):
        _run(p, g, torch.randn(17, 72).to(torch.bfloat16), path="decode")
    with pytest.raises(QuantSpecError, match="does not fit"):  # FMA needs M == 1
        _run(p, g, x, config={"MODE": 1, "BN": 16, "BKW": 16, "SPLIT_K": 1})
    with pytest.raises(QuantSpecError, match="does not fit"):  # BKW not a whole number of blocks (4 words)
        _run(p, g, x, config={"MODE": 0, "BN": 16, "BKW": 18, "SPLIT_K": 1})
    with pytest.raises(QuantSpecError, match="does not fit"):
        _run(p, g, x, config={"MODE": 0, "BN": 16, "BKW": 16, "SPLIT_K": 9})
    with pytest.raises(QuantSpecError, match="does not fit"):  # 3 blocks per chunk: not a power of two
        _run(p, g, x, config={"MODE": 0, "BN": 16, "BKW": 12, "SPLIT_K": 1})
    # codes that cannot be read as int32 words: "auto" takes the tile kernel, "decode" refuses
    codes = torch.zeros(40, p.qweight.shape[1] + 1, dtype=torch.uint8)[:, 1:]
    codes.copy_(p.qweight)
    from ptq.kernels.packed_matmul import packed_matmul

    y = packed_matmul(x, codes, p.scales, p.weight_spec, 40)
    assert same_bits(y, packed_matmul(x, p.qweight, p.scales, p.weight_spec, 40, path="tile"))
    with pytest.raises(QuantSpecError, match="int32-aligned"):
        packed_matmul(x, codes, p.scales, p.weight_spec, 40, path="decode")


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("m", [1, 16])
def test_pruned_autotune_space_fits_llama_shapes(name, m):
    from ptq.kernels import packed_matmul as pm

    spec = SPECS[name]
    fmt = pm.weight_format(spec)
    for k, n in ((4096, 4096), (4096, 14336), (14336, 4096), (4096, 1024), (576, 192)):
        kb = k // spec.block_size
        cfgs = pm._decode_prune(None, {"N": n, "KB": kb, "M": m, "M_BUCKET": 1 if m == 1 else 16},
                                FMT=fmt, BLOCK=spec.block_size)
        assert cfgs
        for c in cfgs:
            assert pm._decode_ok(c.kwargs, fmt, spec.block_size, kb, m), c
        if n >= 1024:
            assert all(pm.DECODE_MIN_CTAS <= -(-n // c.kwargs["BN"]) * c.kwargs["SPLIT_K"] <= pm.DECODE_MAX_CTAS
                       for c in cfgs)
        if m == 1 and n >= 1024:
            assert {c.kwargs["MODE"] for c in cfgs} == {1}  # the FMA reduction (it won every shape at M = 1)


# ---- GPU (skipped without CUDA) --------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("name", list(SPECS))
def test_gpu_decode_path_configs_exact_and_deterministic(name):
    dev = torch.device("cuda")
    spec = SPECS[name]
    p = PackedLinear.from_weight(torch.randn(1024, 4096, device=dev) * 0.02, spec)
    g = p.global_scale.view(torch.float32).reshape(1) if p.global_scale is not None else None
    w = p.dequantized_weight(torch.float32)
    cfgs = [{"MODE": 0, "BN": 64, "BKW": 32, "SPLIT_K": 4, "num_warps": 4, "num_stages": 3},
            {"MODE": 0, "BN": 32, "BKW": 32, "SPLIT_K": 1, "num_warps": 4, "num_stages": 4},
            {"MODE": 1, "BN": 32, "BKW": 32, "SPLIT_K": 8, "num_warps": 4, "num_stages": 2}]
    for m in (1, 3, 16):
        x = torch.randn(m, 4096, device=dev).to(torch.bfloat16)
        for cfg in cfgs:
            if cfg["MODE"] == 1 and m != 1:
                continue
            ys = [_run(p, g, x, config=cfg) for _ in range(5)]
            assert all(same_bits(ys[0], y) for y in ys)
            _check_close_to_exact(ys[0], x.float(), w)
        y = _run(p, g, x, path="auto")  # autotuned, then the cached direct launch
        _check_close_to_exact(y, x.float(), w)
        assert same_bits(y, _run(p, g, x, path="auto"))
