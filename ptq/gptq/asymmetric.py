"""Asymmetric calibration (GPTAQ-style): fit the quantized layer to the UNQUANTIZED model's output.

Plain GPTQ minimises ||(W - Q) X_q||, with X_q the input the quantized model really feeds the linear (earlier
layers quantized, this input quantized and rotated). It therefore keeps W X_q, an output that already carries every
upstream error. The output the model should produce is W X, with X the unquantized model's input to the same linear.

With H = X_q X_q^T and the cross term C = X_q X^T (both as GPTQ scales them, 2/N sum over tokens), the least-squares
weight for the quantized input is W* = W C^T H^-1, and for every Q

    ||W X - Q X_q||^2 = ||(W* - Q) X_q||^2 + ||W X - W* X_q||^2,

the second term not depending on Q. So GPTQ on W* with the usual H minimises the asymmetric objective: W* moves the
correction of the upstream and input-quantization error into the weights, GPTQ then puts them on the grid. H is
damped as GPTQ damps it (``percdamp``), which keeps W* near W where X_q carries little signal.
"""

from __future__ import annotations

import torch

from ptq.gptq.core import HessianError, damp


def cross_gram(xq: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """xq^T x of two [tokens, features] inputs in fp32: the per-batch term of C."""
    if xq.is_cuda and xq.dtype in (torch.bfloat16, torch.float16) and x.dtype == xq.dtype:
        return torch.mm(xq.T, x, out_dtype=torch.float32)
    return xq.float().T @ x.float()


def asymmetric_target(w: torch.Tensor, h: torch.Tensor, cross: torch.Tensor, percdamp: float,
                      strength: float = 1.0) -> torch.Tensor:
    """W + strength (W* - W), W* = W C^T (H + damping)^-1, for ``w`` [out, in], ``h`` = X_q X_q^T and ``cross`` =
    X_q X^T [in, in] (fp32). strength 1 is the least-squares target; GPTAQ found a quarter of the step better at W4A4
    (the cross term is estimated from the same few hundred thousand tokens as H, and the full step over-fits it)."""
    if h.shape != cross.shape or w.shape[1] != h.shape[0]:
        raise ValueError(f"asymmetric_target: weight {tuple(w.shape)}, H {tuple(h.shape)} and C "
                         f"{tuple(cross.shape)} do not fit together")
    hd = damp(h.double(), percdamp)
    chol, info = torch.linalg.cholesky_ex(hd)
    if int(info) != 0:
        raise HessianError(f"the damped Hessian ({h.shape[0]}x{h.shape[0]}) is not positive definite "
                           f"(percdamp={percdamp}); raise [gptq].percdamp (e.g. 0.05) or use more calibration samples")
    # W* - W = W (C^T - H) (H + damping)^-1, solved transposed; H undamped in the difference so that W* = W when the
    # two streams agree (X = X_q) up to the damping's shrinkage
    wd = w.double()
    step = torch.cholesky_solve((cross.double() - h.double()) @ wd.T, chol).T
    return (wd + strength * step).to(torch.float32).contiguous()
