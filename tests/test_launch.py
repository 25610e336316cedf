"""DirectLauncher: the cached compiled-kernel launch gives the same results as Triton's own launch."""

from __future__ import annotations

import pytest
import torch

from ptq.formats import QuantSpec
from ptq.kernels.launch import _arg_key
from ptq.quantizers import fake_quantize
from tests.bitcheck import assert_bits


def test_arg_key_separates_what_triton_specializes_on():
    # integers: i32 / u32 / i64 class, == 1, divisible by 16
    assert _arg_key(1) != _arg_key(2)
    assert _arg_key(16) != _arg_key(17)
    assert _arg_key(17) == _arg_key(33)
    assert _arg_key(2**31 - 1) != _arg_key(2**31)
    assert _arg_key(2**31) != _arg_key(2**32)
    assert _arg_key(True) != _arg_key(1)
    # tensors: dtype and 16-byte alignment of the data pointer
    t = torch.zeros(64, dtype=torch.float32)
    assert _arg_key(t) != _arg_key(t[1:])
    assert _arg_key(t) == _arg_key(t[4:])
    assert _arg_key(t) != _arg_key(t.view(torch.int32))
    assert _arg_key("other") is None


def test_interpreter_path_matches_reference(gen):
    # on the CPU (TRITON_INTERPRET=1) the launcher takes Triton's normal path every time
    x = torch.randn(4, 64, generator=gen, dtype=torch.float32)
    spec = QuantSpec.mxint(4)
    ref = fake_quantize(x, spec, backend="torch")
    for _ in range(2):
        assert_bits(fake_quantize(x, spec, backend="triton"), ref)


@pytest.mark.gpu
def test_cached_launch_matches_reference_across_specializations():
    gen = torch.Generator(device="cuda").manual_seed(0)
    base = torch.randn(3 * 4096 + 8, device="cuda", dtype=torch.bfloat16, generator=gen)
    specs = [QuantSpec.mxint(4), QuantSpec.mxfp("e2m1"), QuantSpec.mxint(8, block_size=16)]
    # the same spec again and again (cached path), with different row counts (== 1, % 16), lengths and
    # misaligned views (data_ptr % 16 != 0), each compared bit for bit with the torch reference
    for rep in range(3):
        for spec in specs:
            for rows, L, off in ((1, 64, 0), (16, 256, 0), (17, 96, 1), (33, 64, 3), (5, 4096, 8)):
                x = base[off:off + rows * L].view(rows, L)
                got = fake_quantize(x, spec, backend="triton")
                assert_bits(got, fake_quantize(x, spec, backend="torch"))
