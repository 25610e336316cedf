"""``ptq export``: quantize a model with a recipe, then write it with packed real-quantized weights."""

from __future__ import annotations

import sys

from ptq.commands import add_parser, add_quantize_arguments, load_and_quantize

EPILOG = """\
examples:
  ptq export --model tests/fixtures/stories260k --recipe recipes/w4a4kv4.toml --out out/stories-w4
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
    add_quantize_arguments(p)
    p.add_argument("--out", required=True, metavar="DIR", help="the directory to write (must not exist unless "
                   "--overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists (only once the new export "
                   "is complete)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ptq.export import export_quantized

    model, tokenizer, _, _ = load_and_quantize(args)
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
