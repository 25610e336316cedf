"""ptq: post-training quantization of LLMs in microscaling (MX) formats.

    import ptq
    recipe = ptq.load_recipe("recipes/w4a4kv4.toml")
    model, tokenizer = ptq.load_model("path/to/hf-model")
    model, info = ptq.quantize_module_transform_pass(model, recipe, tokenizer=tokenizer)

Importing ptq is light (no torch / transformers); the heavy parts load on first use.
"""

from importlib import import_module as _import_module
from typing import Any as _Any

__version__ = "0.1.0"

from ptq.formats import QuantSpec  # noqa: E402

# name -> module that provides it, imported on first access (they pull in torch, pydantic, Triton or lm-eval), so
# that e.g. ``import ptq.kernels`` works on a machine that has torch and Triton only.
_LAZY = {
    "DEFAULT_MODEL": "ptq.models",
    "load_model": "ptq.models",
    "quantize_module_transform_pass": "ptq.passes.pipeline",
    "Recipe": "ptq.recipe",
    "load_recipe": "ptq.recipe",
    "save_recipe": "ptq.recipe",
    "fake_quantize": "ptq.quantizers",
    "evaluate_perplexity": "ptq.eval",
    "export_quantized": "ptq.export",
    "load_quantized": "ptq.export",
}

__all__ = ["__version__", "QuantSpec", *_LAZY]


def __getattr__(name: str) -> _Any:
    if name in _LAZY:
        value = getattr(_import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ptq' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
