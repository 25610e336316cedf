"""Quantized drop-in modules: `LinearMX` (nn.Linear) and `AttentionMX` (the attention module of any decoder family).

`AttentionMX` is imported lazily because it pulls in the transformers model classes it subclasses.
"""

from ptq.modules.linear import LinearMX

_ATTENTION_NAMES = ("AttentionMX", "attention_mx_class", "attention_support", "is_attention_module")
__all__ = ["LinearMX", *_ATTENTION_NAMES]


def __getattr__(name):
    if name in _ATTENTION_NAMES:
        from ptq.modules import attention

        return getattr(attention, name)
    raise AttributeError(f"module 'ptq.modules' has no attribute {name!r}")
