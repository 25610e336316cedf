"""GPTQ for MX formats: the pure per-matrix algorithm (``core``) and per-block scale search (``clip_search``).

The pass that runs it over a model's decoder layers lives in ``ptq.passes.gptq``.
"""

from ptq.gptq.clip_search import block_objective, scale_multipliers, search_block_scale
from ptq.gptq.core import GPTQResult, HessianError, gptq_quantize, proxy_loss

__all__ = [
    "GPTQResult",
    "HessianError",
    "block_objective",
    "gptq_quantize",
    "proxy_loss",
    "scale_multipliers",
    "search_block_scale",
]
