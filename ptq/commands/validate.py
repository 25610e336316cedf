"""``ptq validate RECIPE``: check a recipe and print what it resolves to."""

from __future__ import annotations

import sys
import warnings

from ptq.commands import add_parser
from ptq.errors import ModelError, RecipeError

EPILOG = """\
examples:
  ptq validate recipes/w4a4kv4_gptq.toml
  ptq validate recipes/w4a4kv4.toml --model tests/fixtures/stories260k --strict
  ptq validate my.toml --toml > merged.toml      # the merged recipe (extends resolved)

exit codes: 0 valid, 1 invalid recipe (the message names the file, key path and fix), 2 other errors.
"""


def register(subparsers) -> None:
    p = add_parser(subparsers, "validate", help="check a recipe and print its selectors, specs and passes",
                   description="Load and validate RECIPE (following extends), then print the [gptq] / "
                   "[rotation_search] settings and each selector with the QuantSpecs it builds. With --model, also "
                   "print which module gets which config (first matching selector wins), run the swap on it (so an unsupported module "
                   "fails here, not in quantize) and print the coverage: which weights and attention points are "
                   "quantized, and what fraction of the decoder's matmul weights.", epilog=EPILOG)
    p.add_argument("recipe", metavar="RECIPE", help="path to a TOML recipe")
    p.add_argument("--model", metavar="PATH_OR_ID", help="also resolve the selectors against this model (a local "
                   "HF directory, a hub id when online, or 'smollm2-135m' for the built-in default)")
    p.add_argument("--strict", action="store_true", help="with --model: a selector matching no module, an "
                   "unsupported module, or partial / zero quantization coverage of the decoder is an error (exit 1) "
                   "instead of a warning")
    p.add_argument("--toml", action="store_true", help="print only the merged recipe as TOML")
    p.set_defaults(func=run)


def _print_recipe(recipe, out) -> None:
    from ptq.recipe import config_summary, key_path

    print(f"recipe: {recipe.source}", file=out)
    print(f"by = {recipe.by!r}   (first matching selector wins)", file=out)
    for name in ("gptq", "rotation_search", "rotation_learn"):
        table = getattr(recipe, name)
        if table is None:
            print(f"[{name}]: off", file=out)
        else:
            fields = ", ".join(f"{k}={v!r}" for k, v in table.model_dump(exclude_none=True).items())
            print(f"[{name}]: {fields}", file=out)
    print(f"selectors ({len(recipe.selectors)}):", file=out)
    for i, sel in enumerate(recipe.selectors, 1):
        print(f"  {i}. [{key_path(sel.key)}] -> {config_summary(sel.config)}", file=out)


def _print_passes(recipe, out) -> None:
    """The passes that would run; a pass missing from this install is a warning here (quantize would refuse)."""
    from ptq.errors import PassUnavailableError
    from ptq.passes.pipeline import plan_passes

    try:
        print("passes: " + " -> ".join(p.name for p in plan_passes(recipe)), file=out)
    except PassUnavailableError as err:
        print(f"warning: {err}", file=sys.stderr)


def _print_swap_plan(model, mapping, strict: bool, out) -> None:
    """Run the swap for real (the model is loaded anyway), so validate fails exactly where quantize would."""
    from ptq.coverage import check_coverage, coverage_report, format_coverage
    from ptq.passes.swap import swap_modules

    swap_modules(model, mapping)
    report = coverage_report(model)
    print(format_coverage(report), file=out)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_coverage(report, strict=strict)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)


def run(args) -> int:
    from ptq.recipe import config_summary, load_recipe, save_recipe

    out = sys.stdout
    try:
        recipe = load_recipe(args.recipe)
        if args.toml:
            out.write(save_recipe(recipe))
            return 0
        _print_recipe(recipe, out)
        if args.model:
            from ptq.models import load_model

            model, _ = load_model(args.model)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                mapping = recipe.resolve(model, strict=args.strict)
            for w in caught:
                print(f"warning: {w.message}", file=sys.stderr)
            print(f"modules of {type(model).__name__} ({len(mapping)} configured):", file=out)
            for name, cfg in mapping.items():
                print(f"  {name} ({type(model.get_submodule(name)).__name__}): {config_summary(cfg)}", file=out)
            _print_swap_plan(model, mapping, args.strict, out)
        _print_passes(recipe, out)
    except RecipeError as err:
        print(f"ptq validate: invalid recipe: {err}", file=sys.stderr)
        return 1
    except ModelError as err:
        print(f"ptq validate: the recipe does not fit this model: {err}", file=sys.stderr)
        return 1
    return 0
