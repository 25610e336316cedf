"""The pass manager: run the passes a recipe asks for, in dependency order.

Built-in passes live in their own modules and are imported only when a recipe needs them, so ``import ptq`` stays
light and a missing pass is reported as such rather than skipped:

    swap            ptq.passes.swap              always
    rotation_search ptq.passes.rotation_search   when the recipe has [rotation_search]
    rotation_learn  ptq.passes.rotation_learn    when the recipe has [rotation_learn]
    gptq            ptq.passes.gptq              when the recipe has [gptq]

A built-in pass runs exactly when its table asks for it. Other registered passes (``ptq.passes.base.register_pass``)
run when their ``wanted(recipe)`` says so. Passes are
ordered topologically by their ``after`` tuples; an ``after`` entry naming a pass that does not run this time is
ignored. Ties keep the built-in order above, then registration order.
"""

from __future__ import annotations

import importlib
import os
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping

from ptq.errors import PassUnavailableError, PtqError
from ptq.passes.base import Pass, PassContext, registered_passes
from ptq.recipe import Recipe, load_recipe

if TYPE_CHECKING:  # pragma: no cover
    import torch

# name -> (module providing it, does the recipe ask for it, the recipe table that asks)
BUILTIN_PASSES: dict[str, tuple[str, Callable[[Recipe], bool], str]] = {
    "swap": ("ptq.passes.swap", lambda r: True, "every recipe"),
    "rotation_search": ("ptq.passes.rotation_search", lambda r: r.rotation_search is not None, "[rotation_search]"),
    "rotation_learn": ("ptq.passes.rotation_learn", lambda r: r.rotation_learn is not None, "[rotation_learn]"),
    "gptq": ("ptq.passes.gptq", lambda r: r.gptq is not None, "[gptq]"),
}


def _unavailable(name: str, table: str, why: str) -> PassUnavailableError:
    return PassUnavailableError(
        f"{table} asks for the {name} pass, which is not available in this version of ptq ({why}). "
        f"Remove {table} from the recipe, or upgrade ptq")


def _import_builtin(name: str) -> None:
    module, _, table = BUILTIN_PASSES[name]
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as err:
        # Only "the pass module itself is missing" means unavailable; a missing dependency inside it is a real error.
        if err.name != module:
            raise
        raise _unavailable(name, table, f"module {module} is missing") from None


def plan_passes(recipe: Recipe) -> list[Pass]:
    """The pass instances ``recipe`` asks for, in the order they will run."""
    required = [n for n, (_, asks, _) in BUILTIN_PASSES.items() if asks(recipe)]
    for name in required:
        _import_builtin(name)
    registry = registered_passes()
    for name in required:
        if name not in registry:
            raise _unavailable(name, BUILTIN_PASSES[name][2], f"nothing registered the pass {name!r}")
    order = [n for n in BUILTIN_PASSES if n in registry] + [n for n in registry if n not in BUILTIN_PASSES]
    passes: dict[str, Pass] = {}
    for name in order:
        p = registry[name]()
        # A built-in runs exactly when its table asks for it; any other pass decides through wanted().
        if name in required or (name not in BUILTIN_PASSES and p.wanted(recipe)):
            passes[name] = p
    return _toposort(passes)


def _toposort(passes: dict[str, Pass]) -> list[Pass]:
    done: list[str] = []
    remaining = list(passes)
    while remaining:
        for name in remaining:
            deps = [d for d in getattr(passes[name], "after", ()) if d in passes and d != name]
            if all(d in done for d in deps):
                done.append(name)
                remaining.remove(name)
                break
        else:
            raise PtqError(f"passes {', '.join(remaining)} depend on each other in a cycle (see their 'after' "
                           f"tuples); this is a bug in the pass definitions")
    return [passes[n] for n in done]


def _default_device() -> "torch.device":
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def quantize_module_transform_pass(
    model: "torch.nn.Module",
    recipe: Recipe | str | os.PathLike | Mapping[str, Any],
    *,
    tokenizer: Any = None,
    device: "torch.device | str | None" = None,
    progress: bool = True,
    resume: bool = True,
    strict: bool = False,
    ctx: PassContext | None = None,
) -> tuple["torch.nn.Module", dict[str, dict]]:
    """Quantize ``model`` in place as ``recipe`` says; return ``(model, info)``.

    ``recipe`` may be a :class:`~ptq.recipe.Recipe`, a TOML path, TOML text or a Mase-style dict. ``info`` maps each
    pass that ran (in run order) to its own summary dict plus ``seconds``. ``tokenizer`` is needed by passes that
    calibrate on text (GPTQ, rotation search); ``device`` is where they work (default CUDA when available);
    ``resume`` lets them reuse matching checkpoints / caches; ``strict`` turns selectors that match nothing and
    partial or zero quantization coverage (``info["swap"]["coverage"]``) from loud warnings into errors. A ``ctx``
    given explicitly overrides those five.
    """
    import torch

    recipe = load_recipe(recipe)
    passes = plan_passes(recipe)
    if ctx is None:
        ctx = PassContext(
            tokenizer=tokenizer,
            device=torch.device(device) if device is not None else _default_device(),
            data_dir=os.environ.get("PTQ_DATA_DIR"),
            progress=progress,
            resume=resume,
            strict=strict,
        )
    info: dict[str, dict] = {}
    with torch.no_grad():
        for p in passes:
            t0 = time.perf_counter()
            out = p.run(model, recipe, ctx)
            if out is None:
                out = {}
            if not isinstance(out, Mapping):
                raise PtqError(f"pass {p.name!r} returned {type(out).__name__}, not a dict (a bug in that pass)")
            info[p.name] = {**out, "seconds": time.perf_counter() - t0}
    return model, info
