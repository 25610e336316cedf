"""Subcommands of the ``ptq`` CLI, one module each.

A module here defines ``register(subparsers)``: it adds its parser (with a description, examples and every option
documented) and calls ``set_defaults(func=run)``, where ``run(args) -> int`` returns the exit code. ``ptq/cli.py``
finds the modules with pkgutil, so adding a command means adding a module. Import heavy dependencies (torch,
transformers) inside ``run`` so ``ptq --help`` stays fast.
"""

import argparse
import textwrap


def add_parser(subparsers, name: str, help: str, description: str, epilog: str = "") -> argparse.ArgumentParser:
    """A subcommand parser with the house style: a description, then examples kept as written."""
    description = "\n\n".join(textwrap.fill(par, 100) for par in description.split("\n\n"))
    return subparsers.add_parser(name, help=help, description=description, epilog=epilog,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)


def add_quantize_arguments(p: argparse.ArgumentParser) -> None:
    """The options of every command that loads a model and runs a recipe's passes (quantize, export)."""
    p.add_argument("--model", required=True, metavar="PATH_OR_ID", help="a local HF model directory, a hub id "
                   "(when online), or 'smollm2-135m' for the built-in default")
    p.add_argument("--recipe", required=True, metavar="RECIPE", help="path to a TOML recipe")
    p.add_argument("--device", default=None, help="where passes do their work, e.g. cuda, cuda:1, cpu "
                   "(default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="model dtype: auto, float32, bfloat16, float16 (default: auto)")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="do not reuse existing GPTQ "
                   "checkpoints or rotation caches: refuse to touch them")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    p.add_argument("--strict", action="store_true", help="a selector matching nothing, partial / zero "
                   "quantization coverage of the decoder or (export) a quantizer the output format cannot express "
                   "is an error instead of a warning")


def add_layer_by_layer_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layer-by-layer", choices=("auto", "on", "off"), default="auto",
                   help="build the model on the meta device and read each decoder layer from the safetensors shards "
                   "only when GPTQ reaches it (peak CPU memory: about two layers plus embeddings and head; the "
                   "results stay in [gptq].checkpoint_dir). auto (default): when the checkpoint (times the number of "
                   "torchrun processes) does not fit in 80%% of the available memory")


def _layer_by_layer(args, recipe) -> bool:
    """Whether to load ``args.model`` as a skeleton (see ``ptq.layerwise``); refuses recipes that need the whole
    model."""
    from pathlib import Path

    from ptq import distributed
    from ptq.errors import PtqError
    from ptq.layerwise import needs_layer_by_layer

    mode = getattr(args, "layer_by_layer", "off")
    local = Path(str(args.model)).expanduser().is_dir()
    if mode == "off" or (mode == "auto" and not (local and needs_layer_by_layer(
            args.model, processes=max(1, distributed.world_size())))):
        return False
    if not local:
        raise PtqError(f"--layer-by-layer on needs a local model directory with safetensors shards, got {args.model}")
    if recipe.gptq is None or recipe.rotation_search is not None or not recipe.gptq.checkpoint_dir:
        raise PtqError(
            f"{'the model does not fit in memory and ' if mode == 'auto' else ''}layer-by-layer mode runs swap + "
            "GPTQ only, keeping the results in [gptq].checkpoint_dir: the recipe needs [gptq] with checkpoint_dir "
            "and no [rotation_search]" + (" (or pass --layer-by-layer off)" if mode == "auto" else ""))
    if mode == "auto":
        import sys

        print("ptq: the model does not fit in memory: loading it layer by layer (--layer-by-layer off to refuse)",
              file=sys.stderr)
    return True


def load_and_quantize(args):
    """Validate the recipe (before the slow model load), load the model, run the passes.

    Returns (model, tokenizer, recipe, info); in layer-by-layer mode the model is a skeleton whose decoder layers
    are on the meta device (their GPTQ weights are in the checkpoint store)."""
    import os

    from ptq.models import load_model
    from ptq.passes.base import PassContext
    from ptq.passes.pipeline import _default_device, quantize_module_transform_pass
    from ptq.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    weights = None
    if _layer_by_layer(args, recipe):
        from ptq.layerwise import load_skeleton

        model, tokenizer, weights = load_skeleton(args.model, dtype=args.dtype)
    else:
        model, tokenizer = load_model(args.model, dtype=args.dtype)
    import torch

    ctx = PassContext(tokenizer=tokenizer, device=torch.device(args.device) if args.device else _default_device(),
                      data_dir=os.environ.get("PTQ_DATA_DIR"), progress=args.progress, resume=args.resume,
                      weights=weights, strict=args.strict)
    model, info = quantize_module_transform_pass(model, recipe, ctx=ctx)
    return model, tokenizer, recipe, info
