"""LinearMX: exact bypass, RTN semantics, weight cache, rotation hooks and the GPTQ interface."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ptq.quantizers
from ptq.config import LinearQuantConfig
from ptq.errors import ModelError
from ptq.formats import QuantSpec
from ptq.modules import LinearMX
from ptq.quantizers import fake_quantize
from rotation_stub import OrthoRotation

W4 = QuantSpec.mxint(4)
FP4 = QuantSpec.mxfp("e2m1")
A8 = QuantSpec.mxint(8)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1).view(torch.uint8),
                                                                      b.view(-1).view(torch.uint8))


@pytest.fixture
def lin():
    torch.manual_seed(0)
    return nn.Linear(96, 40, bias=True)


@pytest.fixture
def x():
    torch.manual_seed(1)
    return torch.randn(2, 5, 96) * 3


def count_weight_quantizations(monkeypatch, shape):
    calls = []
    real = ptq.quantizers.fake_quantize

    def spy(t, spec, **kw):
        if tuple(t.shape) == tuple(shape):
            calls.append(spec)
        return real(t, spec, **kw)

    monkeypatch.setattr(ptq.quantizers, "fake_quantize", spy)
    return calls


def test_from_linear_shares_parameters_and_bypass_is_exact(lin, x):
    m = LinearMX.from_linear(lin, LinearQuantConfig())
    assert m.weight is lin.weight and m.bias is lin.bias
    assert (m.in_features, m.out_features) == (96, 40)
    assert bits_equal(m(x), lin(x))
    lin_bf16 = nn.Linear(96, 40).to(torch.bfloat16)
    m16 = LinearMX.from_linear(lin_bf16, LinearQuantConfig())
    xb = x.to(torch.bfloat16)
    assert bits_equal(m16(xb), lin_bf16(xb))
    with pytest.raises(ModelError, match="nn.Linear"):
        LinearMX.from_linear(nn.Conv1d(3, 3, 1), LinearQuantConfig())
    with pytest.raises(ModelError, match="set_config"):
        LinearMX.from_linear(m, LinearQuantConfig())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rtn_forward_matches_formula(lin, x, dtype):
    lin = lin.to(dtype)
    x = x.to(dtype)
    cfg = LinearQuantConfig(weight=FP4, data_in=A8, bias=W4)
    m = LinearMX.from_linear(lin, cfg)
    want = F.linear(fake_quantize(x, A8), fake_quantize(lin.weight.detach().float(), FP4).to(dtype),
                    fake_quantize(lin.bias.detach(), W4))
    got = m(x)
    assert got.dtype == dtype
    assert bits_equal(got, want)
    assert not torch.equal(got, lin(x))


def test_specs_are_applied_along_the_last_dim(lin):
    m = LinearMX.from_linear(lin, LinearQuantConfig(weight=W4.with_(axis=0), data_in=W4.with_(axis=1)))
    assert m.cfg.weight.axis == -1 and m.cfg.data_in.axis == -1
    assert "MXINT4(block=32, axis=-1)" in repr(m)


def test_weight_is_quantized_once_and_requantized_after_a_change(lin, x, monkeypatch):
    calls = count_weight_quantizations(monkeypatch, lin.weight.shape)
    m = LinearMX.from_linear(lin, LinearQuantConfig(weight=W4))
    y1 = m(x)
    y2 = m(x)
    assert len(calls) == 1 and bits_equal(y1, y2)
    with torch.no_grad():
        lin.weight.mul_(2.0)  # in-place: bumps _version
    y3 = m(x)
    assert len(calls) == 2
    assert bits_equal(y3, F.linear(x, fake_quantize(lin.weight.detach(), W4), lin.bias))
    lin.weight.data = lin.weight.data * 0.5  # rebinding: new data_ptr
    m(x)
    assert len(calls) == 3
    m.set_config(LinearQuantConfig(weight=FP4))
    m(x)
    assert len(calls) == 4 and calls[-1] == FP4


def test_matched_rotation_is_exact_in_full_precision(lin, x):
    """All quantizers bypassed: y = rot(x) @ rot(W)^T + b equals x W^T + b up to fp32 rounding (atol 1e-5 here,
    |y| ~ 10)."""
    m = LinearMX.from_linear(lin, LinearQuantConfig())
    rot = OrthoRotation(96)
    m.set_rotation(rot)
    torch.testing.assert_close(m(x), lin(x), rtol=0, atol=1e-5)
    m.set_rotation(rot, mode="activation_only")
    torch.testing.assert_close(m(x), lin(x), rtol=0, atol=1e-5)
    m.set_rotation(None)
    assert m.rotation is None and bits_equal(m(x), lin(x))


def test_rotation_modes_match_their_formulas(lin, x):
    rot = OrthoRotation(96, seed=3)
    m = LinearMX.from_linear(lin, LinearQuantConfig(weight=W4, data_in=A8))
    m.set_rotation(rot, "matched")
    w_rot = rot(lin.weight.detach().float())
    assert bits_equal(m.weight_to_quantize(), w_rot)
    assert bits_equal(m.prepare_input(x), fake_quantize(rot(x), A8))
    assert bits_equal(m(x), F.linear(fake_quantize(rot(x), A8), fake_quantize(w_rot, W4), lin.bias))
    assert "rotation=OrthoRotation(matched)" in repr(m)

    m.set_rotation(rot, "activation_only")
    assert bits_equal(m.weight_to_quantize(), lin.weight.detach().float())
    xin = rot.inverse(fake_quantize(rot(x), A8))
    assert bits_equal(m(x), F.linear(xin, fake_quantize(lin.weight.detach(), W4), lin.bias))
    with pytest.raises(ModelError, match="mode"):
        m.set_rotation(rot, "sideways")


def test_rotation_change_invalidates_the_weight_cache(lin, x):
    m = LinearMX.from_linear(lin, LinearQuantConfig(weight=W4))
    r1, r2 = OrthoRotation(96, seed=1), OrthoRotation(96, seed=2)
    m.set_rotation(r1)
    y1 = m(x)
    m.set_rotation(r2)
    y2 = m(x)
    assert bits_equal(y2, F.linear(x @ r2.H.T, fake_quantize(lin.weight.detach() @ r2.H.T, W4), lin.bias))
    assert not torch.equal(y1, y2)


def test_weight_to_quantize_is_an_fp32_copy(lin):
    m = LinearMX.from_linear(lin.to(torch.bfloat16), LinearQuantConfig(weight=W4))
    w = m.weight_to_quantize()
    assert w.dtype == torch.float32 and w.data_ptr() != lin.weight.data_ptr()
    w.zero_()
    assert lin.weight.abs().sum() > 0


def test_gptq_weight_is_used_as_is(lin, x, monkeypatch):
    m = LinearMX.from_linear(lin, LinearQuantConfig(weight=W4, data_in=A8, gptq=True))
    assert "gptq=pending" in repr(m)
    wq = torch.randn(40, 96)
    m.set_quantized_weight(wq)
    calls = count_weight_quantizations(monkeypatch, lin.weight.shape)
    assert bits_equal(m(x), F.linear(fake_quantize(x, A8), wq, lin.bias))
    assert calls == []  # never re-quantized
    assert "gptq=done" in repr(m) and m.has_gptq_weight
    with torch.no_grad():
        lin.weight.add_(1.0)  # the GPTQ result stays the effective weight
    assert bits_equal(m(x), F.linear(fake_quantize(x, A8), wq, lin.bias))
    with pytest.raises(ModelError, match="shape"):
        m.set_quantized_weight(torch.zeros(96, 40))
    with pytest.warns(UserWarning, match="rotation changed"):
        m.set_rotation(OrthoRotation(96))
    assert not m.has_gptq_weight


def test_gptq_weight_survives_same_config_and_follows_dtype(lin, x):
    cfg = LinearQuantConfig(weight=W4, gptq=True)
    m = LinearMX.from_linear(lin, cfg)
    m.set_quantized_weight(fake_quantize(lin.weight.detach(), W4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m.set_config(cfg)  # swap pass run again with the same recipe
    assert m.has_gptq_weight
    m.to(torch.bfloat16)
    assert m(x.to(torch.bfloat16)).dtype == torch.bfloat16
    with pytest.warns(UserWarning, match="config changed"):
        m.set_config(LinearQuantConfig(weight=FP4, gptq=True))
    assert not m.has_gptq_weight


def test_module_dtype_change_refreshes_the_cache(lin, x):
    m = LinearMX.from_linear(lin, LinearQuantConfig(weight=W4, data_in=A8))
    m(x)
    m.to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    want = F.linear(fake_quantize(xb, A8), fake_quantize(m.weight.detach(), W4), m.bias)
    assert bits_equal(m(xb), want)


def test_cache_built_under_inference_mode_serves_autograd_later(lin, x):
    m = LinearMX.from_linear(lin, LinearQuantConfig(weight=W4, bias=W4))
    with torch.inference_mode():
        y0 = m(x)
    xg = x.clone().requires_grad_(True)
    y = m(xg)
    y.sum().backward()
    assert bits_equal(y.detach(), y0)
    torch.testing.assert_close(xg.grad, fake_quantize(lin.weight.detach(), W4).sum(0).expand_as(x), rtol=0, atol=1e-5)


# ---- shared prepared inputs (q/k/v_proj, gate/up_proj) --------------------------------------------------------------
def siblings(n=3, cfg=LinearQuantConfig(weight=W4, data_in=W4), rotations=None, mode="matched"):
    """``n`` LinearMX on one input size, linked by one memo, and an unlinked twin of each (same parameters)."""
    from ptq.modules.linear import SharedInputMemo

    torch.manual_seed(0)
    linked, plain = [], []
    memo = SharedInputMemo(n)
    for i in range(n):
        base = nn.Linear(96, 24 + 8 * i)
        a, b = LinearMX.from_linear(base, cfg), LinearMX.from_linear(base, cfg)
        rot = rotations[i] if rotations else None
        a.set_rotation(rot, mode)
        b.set_rotation(rot, mode)
        a.set_input_memo(memo)
        linked.append(a)
        plain.append(b)
    return linked, plain, memo


def count_prepares(monkeypatch):
    calls = []
    real = LinearMX._prepare_input

    def spy(self, x):
        calls.append(self)
        return real(self, x)

    monkeypatch.setattr(LinearMX, "_prepare_input", spy)
    return calls


def run_all(mods, x):
    return [m(x) for m in mods]


@pytest.mark.parametrize("grad_mode", ["no_grad", "inference_mode", "autograd"])
def test_shared_input_is_prepared_once_and_bit_identical(x, monkeypatch, grad_mode):
    linked, plain, memo = siblings()
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
           "autograd": torch.enable_grad}[grad_mode]
    xin = x.clone().requires_grad_(grad_mode == "autograd")
    calls = count_prepares(monkeypatch)
    with ctx():
        want = run_all(plain, xin)
        assert len(calls) == 3
        got = run_all(linked, xin)
    assert len(calls) == 4 and calls[3] is linked[0]
    assert all(bits_equal(g.detach(), w.detach()) for g, w in zip(got, want))
    assert not memo.holds_input  # the last sibling dropped it
    if grad_mode == "autograd":
        g1 = torch.autograd.grad(sum(o.sum() for o in got), xin)[0]
        g2 = torch.autograd.grad(sum(o.sum() for o in want), xin)[0]
        torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-6)


def test_shared_input_counts_activation_quantizations(x, monkeypatch):
    linked, plain, _ = siblings()
    seen = []
    real = ptq.quantizers.fake_quantize
    monkeypatch.setattr(ptq.quantizers, "fake_quantize", lambda t, spec, **kw: seen.append(t.shape) or real(t, spec,
                                                                                                          **kw))
    with torch.no_grad():
        run_all(linked, x)  # weights: once each (cached); the activation: once
        n_first = sum(s == x.shape for s in seen)
        run_all(linked, x.clone())
    assert n_first == 1 and sum(s == x.shape for s in seen) == 2


def test_shared_input_sees_in_place_edits_and_other_tensors(x, monkeypatch):
    linked, plain, memo = siblings()
    calls = count_prepares(monkeypatch)
    with torch.no_grad():
        xin = x.clone()
        a = linked[0](xin)
        xin.mul_(0.5)  # bumps _version: the stored input is stale
        b = linked[1](xin)
        c = linked[2](x)  # another tensor with other values
        assert len(calls) == 3
        assert bits_equal(a, plain[0](x)) and bits_equal(b, plain[1](xin)) and bits_equal(c, plain[2](x))
        # same values but a different tensor object: no reuse (ids and data pointers can be recycled)
        linked[0](x)
        n = len(calls)
        linked[1](x.clone())
        assert len(calls) == n + 1
    # a result made without autograd never serves a forward with autograd
    xg = x.clone().requires_grad_(True)
    with torch.no_grad():
        linked[0](xg)
    out = linked[1](xg)
    assert out.requires_grad and out.grad_fn is not None


def test_shared_input_needs_equal_spec_rotation_and_mode(x, monkeypatch):
    A, B = OrthoRotation(96, seed=1), OrthoRotation(96, seed=2)
    cases = [  # (rotations, modes, configs) -> number of preparations for q, k, v
        ([A, A, A], None, None, 1),
        ([A, B, A], None, None, 3),  # k's rotation differs: nothing shared (v cannot reach past k)
        ([A, A, B], None, None, 2),
        ([A, A, A], "activation_only", None, 1),
        ([None, None, None], None, [LinearQuantConfig(weight=W4, data_in=W4), LinearQuantConfig(weight=W4,
                                    data_in=A8), LinearQuantConfig(data_in=A8)], 2),
    ]
    for rots, mode, cfgs, want_calls in cases:
        linked, plain, memo = siblings(rotations=rots, mode=mode or "matched")
        for lm, pm, cfg in zip(linked, plain, cfgs or [None] * 3):
            if cfg is not None:
                lm.set_config(cfg)
                pm.set_config(cfg)
        calls = count_prepares(monkeypatch)
        with torch.no_grad():
            got, want = run_all(linked, x), run_all(plain, x)
        assert len(calls) - 3 == want_calls, (rots, mode)
        assert all(bits_equal(g, w) for g, w in zip(got, want))
        monkeypatch.undo()


def test_shared_input_memory_is_released(x):
    linked, _, memo = siblings()
    with torch.no_grad():
        xin = x.clone()
        linked[0](xin)
        assert memo.holds_input
        del xin  # the input is gone: so is its prepared version
        assert not memo.holds_input
        linked[0](x)
        linked[0].set_input_memo(None)  # unlinking clears too
        assert not memo.holds_input
    # a bypassed input is never stored (it is the input itself)
    linked, _, memo = siblings(cfg=LinearQuantConfig(weight=W4))
    with torch.no_grad():
        linked[0](x)
    assert not memo.holds_input


def test_shared_input_memo_copies_start_empty(x):
    import copy
    import pickle

    from ptq.modules.linear import SharedInputMemo

    linked, plain, memo = siblings()
    with torch.no_grad():
        linked[0](x)
    twins = copy.deepcopy(nn.ModuleList(linked))
    assert twins[0].input_memo is twins[2].input_memo and twins[0].input_memo is not memo
    assert not twins[0].input_memo.holds_input and memo.holds_input
    assert not pickle.loads(pickle.dumps(memo)).holds_input
    with pytest.raises(ModelError, match="at least 2"):
        SharedInputMemo(1)
    with pytest.raises(ModelError, match="SharedInputMemo"):
        linked[0].set_input_memo(object())
