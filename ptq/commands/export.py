"""``ptq export``: quantize a model with a recipe, then write it with packed real-quantized weights."""

from __future__ import annotations

import sys

from ptq.commands import add_parser

EPILOG = """\
examples:
  ptq export --model ../shared/models/stories260k --recipe recipes/w4a4kv4.toml --out out/stories-w4
  ptq export --model smollm2-135m --recipe recipes/mxfp4.toml --out out/smollm2-mxfp4 --device cuda --dtype bf16
  ptq eval --model out/smollm2-mxfp4 ...        (an exported directory loads like any model)

DIR receives (written to a temporary directory, then renamed into place):
  DIR/model.safetensors       packed codes + scales of every quantized linear, the other parameters as they are
  DIR/config.json             the Hugging Face model config
  DIR/ptq_quant_config.json   per-module specs, rotations, format version
  DIR/tokenizer files
Linear layers whose weight format cannot be packed (mx6 / mx9 / int, or a bypassed weight) stay fake-quantized.
"""


def register(subparsers) -> None:
    p = add_parser(subparsers, "export", help="quantize a model and write it with packed low-bit weights",
                   description="Load MODEL, run the passes RECIPE asks for (swap -> rotation_search -> gptq), pack "
                   "every quantized linear weight into real low-bit codes + scales and write a directory that "
                   "ptq.load_quantized (and every ptq command taking --model) loads back.", epilog=EPILOG)
    p.add_argument("--model", required=True, metavar="PATH_OR_ID", help="a local HF model directory, a hub id "
                   "(when online), or 'smollm2-135m' for the built-in default")
    p.add_argument("--recipe", required=True, metavar="RECIPE", help="path to a TOML recipe")
    p.add_argument("--out", required=True, metavar="DIR", help="the directory to write (must not exist unless "
                   "--overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists (only once the new export "
                   "is complete)")
    p.add_argument("--device", default=None, help="where passes do their work, e.g. cuda, cpu (default: cuda when "
                   "available)")
    p.add_argument("--dtype", default="auto", help="model dtype: auto, float32, bfloat16, float16 (default: auto)")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="do not reuse existing GPTQ "
                   "checkpoints or rotation caches")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    from ptq.export import export_quantized
    from ptq.models import load_model
    from ptq.passes.pipeline import quantize_module_transform_pass
    from ptq.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    model, info = quantize_module_transform_pass(model, recipe, tokenizer=tokenizer, device=args.device,
                                                 progress=args.progress, resume=args.resume)
    summary = export_quantized(model, args.out, tokenizer=tokenizer, overwrite=args.overwrite,
                               progress=args.progress)
    bpw = summary["bits_per_weight"]
    print(f"wrote {summary['out_dir']}: {len(summary['packed'])} packed linears "
          f"({summary['packed_weights']:,} weights, {bpw:.3f} bits/weight)" if bpw else
          f"wrote {summary['out_dir']}: no packable linear layers", file=sys.stderr)
    if summary["kept"]:
        print(f"kept fake-quantized (format not packable): {len(summary['kept'])} layers", file=sys.stderr)
    print(f"model.safetensors: {summary['bytes']:,} bytes", file=sys.stderr)
    return 0
