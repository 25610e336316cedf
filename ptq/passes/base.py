"""The pass interface and registry.

A pass is an object with a ``name``, the names of passes that must run before it (``after``), a predicate saying
whether a recipe asks for it, and ``run(model, recipe, ctx) -> info``. The pipeline (ptq/passes/pipeline.py) orders
the passes a recipe asks for by ``after`` and runs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from ptq.recipe import Recipe


@dataclass
class PassContext:
    """What passes share during one ``quantize_module_transform_pass`` call (not configuration: that is the recipe).

    tokenizer: needed by passes that draw calibration text by name (GPTQ, rotation search).
    device: where a pass puts the layer it works on (default: CUDA when available, else CPU).
    data_dir: where local datasets live (default: the PTQ_DATA_DIR environment variable).
    progress: show tqdm bars.
    resume: reuse checkpoints / caches whose fingerprint matches (False: refuse to touch existing ones).
    strict: a selector matching nothing, or partial / zero quantization coverage (`ptq.coverage`), is an error
        instead of a loud warning.
    calibration: memo of tokenised calibration windows keyed by their request, so passes asking for the same
        windows share one copy.
    weights: layer-by-layer mode: the model is a skeleton on the meta device and its decoder layers' weights are
        read from these checkpoint shards (``ptq.layerwise.ShardedWeights``) when a pass reaches them.
    """

    tokenizer: Any = None
    device: "torch.device | str | None" = None
    data_dir: str | None = None
    progress: bool = True
    resume: bool = True
    strict: bool = False
    calibration: dict = field(default_factory=dict)
    weights: Any = None


def calibration_windows(ctx: PassContext, pass_name: str, cfg) -> tuple["torch.Tensor", dict]:
    """The calibration windows a pass asks for with ``cfg.dataset`` / ``calib_nsamples`` / ``calib_seqlen`` /
    ``seed`` (shared through ``ctx.calibration``), and their description for the pass's fingerprint."""
    from ptq import data
    from ptq.errors import PtqError

    tok = ctx.tokenizer
    if tok is None:
        raise PtqError(f"{pass_name} needs a tokenizer for its calibration text: pass tokenizer=... to "
                       "quantize_module_transform_pass")
    windows, bos = data.shared_calibration_windows(ctx.calibration, tok, cfg.dataset, cfg.calib_nsamples,
                                                   cfg.calib_seqlen, seed=cfg.seed, data_dir=ctx.data_dir)
    src = cfg.dataset if isinstance(cfg.dataset, str) else list(cfg.dataset)
    return windows, {"dataset": src, "nsamples": cfg.calib_nsamples, "seqlen": cfg.calib_seqlen, "seed": cfg.seed,
                     "bos_id": bos}


class Pass(Protocol):
    name: str
    after: tuple[str, ...]

    def wanted(self, recipe: "Recipe") -> bool: ...

    def run(self, model: "torch.nn.Module", recipe: "Recipe", ctx: PassContext) -> dict: ...


_REGISTRY: dict[str, Callable[[], Pass]] = {}


def register_pass(factory: Callable[[], Pass]) -> Callable[[], Pass]:
    """Class decorator: make a pass available to the pipeline under its ``name``."""
    name = factory.name  # type: ignore[attr-defined]
    if name in _REGISTRY and _REGISTRY[name] is not factory:
        raise ValueError(f"pass {name!r} registered twice")
    _REGISTRY[name] = factory
    return factory


def registered_passes() -> dict[str, Callable[[], Pass]]:
    return dict(_REGISTRY)
