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
    p.add_argument("--strict", action="store_true", help="a selector matching nothing, or partial / zero "
                   "quantization coverage of the decoder, is an error instead of a warning")


def load_and_quantize(args):
    """Validate the recipe (before the slow model load), load the model, run the passes.

    Returns (model, tokenizer, recipe, info)."""
    from ptq.models import load_model
    from ptq.passes.pipeline import quantize_module_transform_pass
    from ptq.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    model, info = quantize_module_transform_pass(model, recipe, tokenizer=tokenizer, device=args.device,
                                                 progress=args.progress, resume=args.resume,
                                                 strict=args.strict)
    return model, tokenizer, recipe, info
