"""Turn every quantizer of a module tree off: the one place that knows which swapped modules quantize."""

from __future__ import annotations

import torch.nn as nn


def bypass_quantizers(model: nn.Module) -> list[tuple[nn.Module, object]]:
    """Give every LinearMX / ExpertsMX / AttentionMX under ``model`` a bypass config (their tensors pass through
    exactly; online rotations stay, GPTQ weights are dropped by ``set_config``); return (module, old config) pairs so
    that a caller can restore them with ``m.set_config(old)``."""
    from ptq.config import AttentionQuantConfig, LinearQuantConfig
    from ptq.modules.attention import AttentionMX
    from ptq.modules.experts import ExpertsMX
    from ptq.modules.linear import LinearMX

    saved = []
    for m in model.modules():
        if isinstance(m, (LinearMX, ExpertsMX)):
            saved.append((m, m.cfg))
            m.set_config(LinearQuantConfig())
        elif isinstance(m, AttentionMX):
            saved.append((m, m.cfg))
            m.set_config(AttentionQuantConfig())
    return saved
