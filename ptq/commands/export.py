"""``ptq export``: quantize a model with a recipe, then write it with packed real-quantized weights
(compressed-tensors by default, or ptq's own format)."""

from __future__ import annotations

import sys

from ptq.commands import add_parser, add_quantize_arguments, load_and_quantize

EPILOG = """\
examples:
  ptq export --model tests/fixtures/stories260k --recipe recipes/w4a4kv4.toml --out out/stories-w4
  ptq export --model smollm2-135m --recipe recipes/mxfp4.toml --out out/smollm2-mxfp4 --device cuda --dtype bf16
  ptq eval --model out/smollm2-mxfp4 ...        (an exported directory loads like any model)

  ptq export ... --format compressed-tensors --strict       (fail if compressed-tensors cannot express the recipe)

DIR is written to a temporary directory, then renamed into place.
--format compressed-tensors (default): a Hugging Face directory that transformers and vLLM load with
  compressed-tensors installed (no ptq needed): config.json with a quantization_config, sharded safetensors in
  compressed-tensors' packed layouts (NVFP4, MXFP4, int4/int8 groups for MXINT / INT), tokenizer, generation
  config, README.md listing what the format cannot express, and ptq_ct.json (ptq's extras: KV-cache and attention
  quantizers, exact scales) so that ptq loads it back exactly.
--format ptq: DIR/model.safetensors (PackedLinear codes + scales), config.json, ptq_quant_config.json: every ptq
  quantizer (mx6 / mx9 / int weights stay fake-quantized), but only ptq loads it.
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
    p.add_argument("--format", choices=("compressed-tensors", "ptq"), default="compressed-tensors",
                   help="compressed-tensors (default; transformers / vLLM load it) or ptq (ptq's own format, "
                   "expresses every quantizer)")
    p.add_argument("--calib-source", default="wikitext2", help="compressed-tensors with NVFP4 activations: text "
                   "for the static input global scales (default: wikitext2)")
    p.add_argument("--calib-samples", type=int, default=16, help="windows of calibration text (default: 16)")
    p.add_argument("--calib-seqlen", type=int, default=512, help="tokens per calibration window (default: 512)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ptq.export import export_quantized

    model, tokenizer, _, _ = load_and_quantize(args)
    calibration = None
    if args.format == "compressed-tensors" and _has_nvfp4_inputs(model):
        from ptq.data import calibration_windows
        from ptq.models import default_bos_id

        calibration = calibration_windows(tokenizer, args.calib_source, args.calib_samples, args.calib_seqlen,
                                          bos_id=default_bos_id(tokenizer)).split(1)
    summary = export_quantized(model, args.out, tokenizer=tokenizer, overwrite=args.overwrite,
                               progress=args.progress, format=args.format, strict=args.strict,
                               calibration=calibration)
    bpw = summary["bits_per_weight"]
    print(f"wrote {summary['out_dir']}: {len(summary['packed'])} packed linears "
          f"({summary['packed_weights']:,} weights, {bpw:.3f} bits/weight)" if bpw else
          f"wrote {summary['out_dir']}: no packable linear layers", file=sys.stderr)
    if summary["kept"]:
        print(f"not packed (format not packable): {len(summary['kept'])} layers", file=sys.stderr)
    print(f"weights: {summary['bytes']:,} bytes", file=sys.stderr)
    if summary.get("issues"):
        print(f"{len(summary['issues'])} things compressed-tensors does not express: see {args.out}/README.md",
              file=sys.stderr)
    return 0


def _has_nvfp4_inputs(model) -> bool:
    from ptq.modules.linear import LinearMX

    return any(isinstance(m, LinearMX) and m.cfg.data_in is not None and m.cfg.data_in.family == "nvfp4"
               for m in model.modules())
