"""GPTQ on one matrix (ptq.gptq.core) and the per-block clip search (ptq.gptq.clip_search).

The oracle below is the textbook column-by-column GPTQ (no lazy batches, explicit inverse), MX-aware in the same
sense as the spec: a block's scale is taken from the current weights when its first column is reached.
"""

from dataclasses import replace

import pytest
import torch

from ptq.errors import QuantSpecError
from ptq.formats import QuantSpec
from ptq.gptq import HessianError, block_objective, gptq_quantize, proxy_loss, search_block_scale
from ptq.gptq.clip_search import rule_scale
from ptq.quantizers import block_scales, fake_quantize, quantize_with_scale

SPECS = {
    "mxint4": QuantSpec.mxint(4),
    "mxint8": QuantSpec.mxint(8),
    "mxfp4": QuantSpec.mxfp("e2m1"),
    "mxfp6": QuantSpec.mxfp("e3m2"),
    "mxfp8": QuantSpec.mxfp("e4m3"),
    "mx6": QuantSpec.mx6(),
    "mx9": QuantSpec.mx9(),
    "nvfp4": QuantSpec.nvfp4(),
    "int4": QuantSpec.int_(4, block_size=32),
    "int4_asym": QuantSpec.int_(4, block_size=32, symmetric=False),
}


def outlier_layer(out_f=48, in_f=96, n=512, seed=0):
    """A weight and its Hessian where a few input channels carry 20x larger activations (as in LLMs)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_f, generator=g)
    x[:, [3 % in_f, 40 % in_f, 77 % in_f]] *= 20.0
    x = x + 0.3 * torch.randn(n, 1, generator=g)  # correlated channels: error feedback has something to use
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    w[:, 5] *= 8.0  # outlier weights too
    return w, 2.0 / n * x.T @ x


def oracle_gptq(w, h, spec, percdamp=0.01):
    """Plain GPTQ: one column at a time, every later column updated immediately."""
    w = w.clone().float()
    n = w.shape[1]
    h = h.clone()
    h += percdamp * torch.diag(h).mean() * torch.eye(n)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    q = torch.zeros_like(w)
    gs = None
    if spec.family == "nvfp4":
        from ptq.quantizers import nvfp4_global_scale

        gs = nvfp4_global_scale(w)
    pair = 2 if spec.family in ("mx6", "mx9") else 1
    for j in range(0, n, pair):
        if j % spec.block_size == 0:
            blk = w[:, j : j + spec.block_size]
            blk = torch.nn.functional.pad(blk, (0, spec.block_size - blk.shape[1]))
            scale, zp = block_scales(blk, spec, global_scale=gs)  # nvfp4: s * g, applied as one scale
        qj = quantize_with_scale(w[:, j : j + pair], scale, spec, zero_point=zp)
        for t in range(pair):
            c = j + t
            q[:, c] = qj[:, t]
            e = (w[:, c] - q[:, c]) / u[c, c]
            w[:, c:] -= e[:, None] * u[c, c:][None, :]
    return q


def blocks_on_own_grid(res, spec):
    """Each block of the result re-quantizes to itself with the scale GPTQ recorded for it."""
    q = res.weight
    out_f, in_f = q.shape
    bs = spec.block_size
    for b in range(res.scales.shape[1]):
        blk = q[:, b * bs : (b + 1) * bs]
        zp = res.zero_points[:, b : b + 1] if res.zero_points is not None else None
        again = quantize_with_scale(blk, res.scales[:, b : b + 1], spec, zero_point=zp, global_scale=res.global_scale)
        if not torch.equal(again.float(), blk):
            return False
    return True


@pytest.mark.parametrize("name", ["mxint4", "mxfp4", "nvfp4", "int4"])
def test_gptq_beats_rtn_and_matches_oracle(name):
    spec = SPECS[name]
    w, h = outlier_layer()
    res = gptq_quantize(w, h, spec)
    rtn = proxy_loss(w, fake_quantize(w, spec), h)
    oracle = proxy_loss(w, oracle_gptq(w, h, spec), h)
    assert res.proxy_loss < rtn, (name, res.proxy_loss, rtn)
    assert abs(res.proxy_loss - oracle) <= 0.02 * oracle, (name, res.proxy_loss, oracle)
    assert res.proxy_loss == pytest.approx(proxy_loss(w, res.weight, h), rel=1e-5)


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("act_order", [False, True])
def test_every_family_lies_on_its_grid(name, act_order):
    spec = SPECS[name]
    w, h = outlier_layer(out_f=16, in_f=80)  # 80: a partial tail block for blocks of 32
    res = gptq_quantize(w, h, spec, act_order=act_order)
    assert res.weight.shape == w.shape and res.weight.dtype == torch.float32
    assert torch.isfinite(res.weight).all()
    assert blocks_on_own_grid(res, spec), name
    if spec.family in ("mxint", "mxfp"):
        # a valid MX tensor: the format's own quantizer leaves it unchanged
        assert torch.equal(fake_quantize(res.weight, spec), res.weight)
    assert res.proxy_loss < proxy_loss(w, fake_quantize(w, spec), h)


def test_act_order_permutes_whole_blocks():
    spec = SPECS["mxint4"]
    w, h = outlier_layer(in_f=96)
    res = gptq_quantize(w, h, spec, act_order=True)
    perm = res.perm.tolist()
    for i in range(0, 96, 32):
        assert len({c // 32 for c in perm[i : i + 32]}) == 1  # each processed block is one original block
    assert sorted(perm) == list(range(96))
    d = torch.diag(h)
    sums = [float(d[b * 32 : (b + 1) * 32].sum()) for b in range(3)]
    assert [perm[i] // 32 for i in (0, 32, 64)] == sorted(range(3), key=lambda b: -sums[b])
    first = perm[:32]
    assert [float(d[c]) for c in first] == sorted((float(d[c]) for c in first), reverse=True)


def test_lazy_batches_equal_column_by_column():
    spec = SPECS["mxint4"]
    w, h = outlier_layer(in_f=128)
    a = gptq_quantize(w, h, spec, blocksize=32)
    b = gptq_quantize(w, h, spec, blocksize=128)
    assert a.proxy_loss == pytest.approx(b.proxy_loss, rel=1e-3)
    # same grid choice almost everywhere (fp32 summation order can flip a rare tie)
    assert (a.weight != b.weight).float().mean() < 0.01


@pytest.mark.parametrize("name", ["mxint4", "mxfp4", "mx6", "nvfp4", "int4", "int4_asym"])
@pytest.mark.parametrize("objective", ["weight", "output"])
def test_clip_search_lowers_its_objective(name, objective):
    spec = SPECS[name]
    w, h = outlier_layer(in_f=spec.block_size * 3)
    bs = spec.block_size
    gs = None
    if spec.family == "nvfp4":
        from ptq.quantizers import nvfp4_global_scale

        gs = nvfp4_global_scale(w)
    total_plain = total_search = 0.0
    for b in range(3):
        blk = w[:, b * bs : (b + 1) * bs]
        hb = h[b * bs : (b + 1) * bs, b * bs : (b + 1) * bs]
        s0, z0 = rule_scale(blk, spec, gs)
        s1, z1 = search_block_scale(blk, spec, objective, hb, gs)
        plain = block_objective(blk, quantize_with_scale(blk, s0, spec, zero_point=z0, global_scale=gs), objective, hb)
        found = block_objective(blk, quantize_with_scale(blk, s1, spec, zero_point=z1, global_scale=gs), objective, hb)
        assert (found <= plain).all()  # never worse, row by row
        total_plain += float(plain.sum())
        total_search += float(found.sum())
    assert total_search < total_plain  # and strictly better overall on outlier data


@pytest.mark.parametrize("clip", ["weight", "output"])
def test_gptq_with_clip_search_stays_on_grid_and_beats_rtn(clip):
    spec = SPECS["mxint4"]
    w, h = outlier_layer()
    res = gptq_quantize(w, h, spec, clip=clip)
    assert blocks_on_own_grid(res, spec)
    assert torch.equal(fake_quantize(res.weight, spec), res.weight)
    assert res.proxy_loss < proxy_loss(w, fake_quantize(w, spec), h)


def test_mx_candidates_are_powers_of_two_of_the_rule():
    spec = SPECS["mxint4"]
    w, _ = outlier_layer(in_f=32)
    s0, _ = rule_scale(w, spec)
    s1, _ = search_block_scale(w, spec, "weight")
    ratio = torch.log2(s1 / s0)
    assert torch.equal(ratio, ratio.round()) and set(ratio.flatten().tolist()) <= {1.0, 0.0, -1.0, -2.0}


def test_dead_columns_become_zero():
    spec = SPECS["mxint4"]
    w, h = outlier_layer(in_f=64)
    h[7, :] = 0
    h[:, 7] = 0
    res = gptq_quantize(w, h, spec)
    assert torch.isfinite(res.weight).all()
    assert (res.weight[:, 7] == 0).all()


def test_bad_inputs_are_refused():
    w, h = outlier_layer(in_f=64)
    with pytest.raises(QuantSpecError, match="deterministic"):
        gptq_quantize(w, h, QuantSpec.mxint(4, rounding="stochastic", seed=0))
    with pytest.raises(QuantSpecError, match="Hessian shape"):
        gptq_quantize(w, h[:32, :32], SPECS["mxint4"])
    with pytest.raises(QuantSpecError, match="clip"):
        gptq_quantize(w, h, SPECS["mxint4"], clip="bogus")
    with pytest.raises(HessianError, match="percdamp"):
        gptq_quantize(w, -torch.eye(64), SPECS["mxint4"], percdamp=0.0)  # not positive definite


@pytest.mark.parametrize("name", list(SPECS))
def test_diagonal_hessian_reduces_to_rtn_bit_exactly(name):
    # with uncorrelated inputs there is no error to feed forward, so GPTQ must be the reference quantizer itself
    spec = SPECS[name]
    w, _ = outlier_layer(out_f=8, in_f=80)
    h = torch.diag(torch.rand(80, generator=torch.Generator().manual_seed(1)) + 0.5)
    res = gptq_quantize(w, h, spec)
    want = fake_quantize(w, spec, backend="torch")
    assert torch.equal(res.weight.view(torch.int32), want.view(torch.int32)), name


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(SPECS))
def test_cuda_diagonal_hessian_matches_the_triton_fake_quantize(name):
    spec = SPECS[name]
    w, _ = outlier_layer(out_f=64, in_f=256)
    w = w.cuda()
    h = torch.diag(torch.rand(256, generator=torch.Generator().manual_seed(1)) + 0.5).cuda()
    res = gptq_quantize(w, h, spec)
    want = fake_quantize(w, spec)  # Triton on CUDA where supported
    assert torch.equal(res.weight.view(torch.int32), want.view(torch.int32)), name


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["mxint4", "mxfp4", "nvfp4", "mx6"])
def test_cuda_gptq_agrees_with_cpu(name):
    spec = SPECS[name]
    w, h = outlier_layer()
    cpu = gptq_quantize(w, h, spec, clip="output")
    gpu = gptq_quantize(w.cuda(), h.cuda(), spec, clip="output")
    gs = gpu.global_scale.cpu() if gpu.global_scale is not None else None
    assert blocks_on_own_grid(replace(gpu, weight=gpu.weight.cpu(), scales=gpu.scales.cpu(), global_scale=gs), spec)
    assert gpu.proxy_loss == pytest.approx(cpu.proxy_loss, rel=0.02)


KERNEL_SPECS = ["mxint4", "mxint8", "mxfp4", "mxfp6", "mxfp8", "nvfp4"]


def kernel_case(name, length=None, out_f=45, device="cpu"):
    """A block cut out of a larger batch (strided views, as GPTQ passes them), its u and damped-H blocks."""
    from ptq.gptq.core import damp, inverse_factor

    spec = SPECS[name]
    L = length or spec.block_size
    w, h = outlier_layer(out_f=out_f, in_f=3 * L)  # 45 rows: a partial tile of rows
    w, h = w.to(device), h.to(device)
    hd = damp(h, 0.01)
    u = inverse_factor(hd, 0.01)
    gs = None
    if spec.family == "nvfp4":
        from ptq.quantizers import nvfp4_global_scale

        gs = nvfp4_global_scale(w)
    return spec, w[:, L : 2 * L], u[L : 2 * L, L : 2 * L], hd[L : 2 * L, L : 2 * L], gs


@pytest.mark.parametrize("name", KERNEL_SPECS)
@pytest.mark.parametrize("length", [None, 11])
def test_triton_column_loop_equals_the_torch_loop(name, length):
    # The column loop the kernel runs on CUDA, here under the Triton interpreter, against the torch loop: the same q
    # and errors bit for bit, for the rule's scale and for a searched one (mx: 2x finer grid), on a full and on a
    # short tail block.
    from ptq.gptq.core import block_columns
    from ptq.kernels.gptq_block import triton_gptq_block

    spec, blk, ub, _, gs = kernel_case(name, length)
    scale, _ = rule_scale(blk, spec, gs)
    for s in (scale, scale * 0.5 if spec.family != "nvfp4" else scale):
        q_ref, e_ref = block_columns(blk, ub, s, spec, None, gs)
        q, e, s_out = triton_gptq_block(blk, ub, spec, scale=s, global_scale=gs)
        assert torch.equal(q.view(torch.int32), q_ref.view(torch.int32)), name
        assert torch.equal(e.view(torch.int32), e_ref.view(torch.int32)), name
        assert torch.equal(s_out, s.reshape(-1, 1))
        assert not torch.equal(q_ref, quantize_with_scale(blk, s, spec, global_scale=gs))  # feedback did act


@pytest.mark.parametrize("name", ["mxint4", "mxint8", "mxfp4", "mxfp6", "mxfp8"])
@pytest.mark.parametrize("clip", [None, "weight", "output"])
@pytest.mark.parametrize("length", [None, 11])
def test_triton_block_with_its_scale_choice_equals_the_torch_path(name, clip, length):
    # scale (rule or clip search) + column loop in one kernel against torch's rule_scale / search_block_scale +
    # loop. Candidates that round a row identically tie exactly and go to the earlier one on both sides (this case
    # has such rows for mxfp6 / mxfp8); distinct roundings whose losses agree to the last bit could still part.
    from ptq.gptq.core import gptq_block
    from ptq.kernels.gptq_block import triton_gptq_block

    spec, blk, ub, hb, _ = kernel_case(name, length)
    q_ref, e_ref, s_ref, _ = gptq_block(blk, ub, spec, clip, hb if clip == "output" else None)
    q, e, s = triton_gptq_block(blk, ub, spec, clip=clip, h_block=hb if clip == "output" else None)
    assert torch.equal(s, s_ref), (name, clip)
    assert torch.equal(q.view(torch.int32), q_ref.view(torch.int32)), (name, clip)
    assert torch.equal(e.view(torch.int32), e_ref.view(torch.int32)), (name, clip)
    if clip is not None and spec.width == 4:  # the search did move some scales away from the rule (8-bit grids
        # rarely gain from it)
        rule, _ = rule_scale(blk, spec)
        assert not torch.equal(s, rule.reshape(-1, 1)), (name, clip)


@pytest.mark.parametrize("name", ["mxint4", "mxfp4", "nvfp4"])
def test_gptq_through_the_kernel_equals_gptq_in_torch(name):
    # the whole of gptq_quantize with the kernel path forced on (interpreter) against the torch path
    from unittest import mock

    spec = SPECS[name]
    w, h = outlier_layer(out_f=33, in_f=96)
    ref = gptq_quantize(w, h, spec, act_order=True, clip="output")
    mode = "columns" if spec.family == "nvfp4" else "block"
    with mock.patch("ptq.kernels.gptq_block.kernel_mode", return_value=mode):
        got = gptq_quantize(w, h, spec, act_order=True, clip="output")
    assert torch.equal(got.weight.view(torch.int32), ref.weight.view(torch.int32)), name
    assert torch.equal(got.scales, ref.scales), name


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["mxint4", "mxfp4", "nvfp4"])
@pytest.mark.parametrize("clip", [None, "output"])
def test_cuda_block_kernel_equals_the_torch_path_on_the_cpu(name, clip):
    from ptq.gptq.core import gptq_block
    from ptq.kernels.gptq_block import kernel_mode

    spec, blk, ub, hb, gs = kernel_case(name, out_f=300, device="cuda")
    assert kernel_mode(spec, blk) is not None
    hb = hb if clip == "output" else None
    q, e, s, _ = gptq_block(blk, ub, spec, clip, hb, gs)  # the kernel
    cpu = lambda t: t.cpu() if t is not None else None  # noqa: E731
    q_ref, e_ref, s_ref, _ = gptq_block(cpu(blk), cpu(ub), spec, clip, cpu(hb), cpu(gs))
    assert torch.equal(s.cpu(), s_ref), name
    assert torch.equal(q.cpu().view(torch.int32), q_ref.view(torch.int32)), name
    assert torch.equal(e.cpu().view(torch.int32), e_ref.view(torch.int32)), name


@pytest.mark.gpu
def test_cuda_bf16_gram_equals_the_fp32_gram():
    # bf16 products are exact in fp32: the tensor-core Gram matrix is the fp32 one up to summation order. Measured
    # on an H200: 9.9e-6 relative to the fp64 sum (4096 terms of fp32 accumulation); a bf16 accumulation or output
    # would be off by ~1e-3.
    from ptq.gptq.core import gram

    x = torch.randn(4096, 512, generator=torch.Generator().manual_seed(0)).bfloat16().cuda()
    fast = gram(x)
    want = x.double().T @ x.double()
    assert fast.dtype == torch.float32
    assert float((fast.double() - want).norm() / want.norm()) <= 3e-5
