"""Quantized drop-in modules: `LinearMX` (nn.Linear) and `AttentionMX` (Llama-family attention).

`AttentionMX` is imported lazily because it pulls in the transformers model classes it subclasses.
"""

from ptq.modules.linear import LinearMX

__all__ = ["LinearMX", "AttentionMX", "attention_mx_class", "SUPPORTED_ATTENTION"]


def __getattr__(name):
    if name in ("AttentionMX", "attention_mx_class", "SUPPORTED_ATTENTION"):
        from ptq.modules import attention

        return getattr(attention, name)
    raise AttributeError(f"module 'ptq.modules' has no attribute {name!r}")
