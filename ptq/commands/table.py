"""``ptq table``: the unquantized model and each recipe, one table (Markdown + JSON + PNG) from one command."""

from __future__ import annotations

from ptq.commands import add_parser

EXAMPLES = """\
examples:
  ptq table                                   # built-in SmolLM2-135M x the three shipped W4A4KV4 recipes
  ptq table --quick                           # minutes on a CPU: smaller calibration, 8 windows of 512 tokens
  ptq table --out runs/smol --device cuda     # rerun: only rows whose inputs changed are recomputed
  ptq table --model tests/fixtures/stories260k --recipes w4a4kv4 my.toml \\
            --source tinystories --split validation --seqlen 256 --bos-windows --max-windows 16
"""


def register(subparsers) -> None:
    p = add_parser(
        subparsers,
        "table",
        help="perplexity / KL table of a model under several recipes (Markdown, JSON, PNG)",
        description=(
            "Evaluate the unquantized model and each recipe on one model: token perplexity, the ratio to the "
            "unquantized model, lm-eval's wikitext word perplexity (computed natively), KL divergence and top-1 "
            "agreement to the unquantized model, wall time and what was reused. Writes OUT/table.md, OUT/table.json "
            "and OUT/table.png. GPTQ checkpoints, rotation caches and finished rows live under OUT, so a rerun "
            "recomputes only what changed. With no model it uses the built-in SmolLM2-135M; with no text at all "
            "it calibrates on text sampled from the model and reports KL / top-1 instead of perplexity."),
        epilog=EXAMPLES,
    )
    p.add_argument("--model", default=None, help="HF id or local directory (default: built-in SmolLM2-135M)")
    p.add_argument("--recipes", nargs="+", default=None, metavar="RECIPE",
                   help="recipe files or shipped recipe names (default: w4a4kv4, w4a4kv4_gptq, w4a4kv4_gptq_rot)")
    p.add_argument("--out", default="ptq-table", help="output directory: table, rows, checkpoints, caches (default: ptq-table)")
    p.add_argument("--source", default="wikitext2", help="evaluation text: wikitext2 (default), tinystories or a text file")
    p.add_argument("--split", default="test", choices=("test", "validation"), help="default: test")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="the quick table (the default without CUDA): GPTQ calibration 32 x 512 tokens, rotation "
                           "search 4 x 512 per trial, perplexity on 8 windows of 512 tokens, no word perplexity")
    size.add_argument("--full", action="store_true",
                      help="the recipes' own calibration and every evaluation window (the default with CUDA)")
    p.add_argument("--seqlen", type=int, default=None,
                   help="evaluation window and word-perplexity max length (default: 2048; --quick 512)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward (default: 8)")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate the first N windows only (--quick: 8)")
    p.add_argument("--bos-windows", action="store_true", help="start every window with BOS (BOS + seqlen-1 tokens)")
    p.add_argument("--no-word-ppl", action="store_true", help="skip lm-eval-style word perplexity")
    p.add_argument("--max-documents", type=int, default=None, help="word perplexity on the first N articles only")
    p.add_argument("--dtype", default="auto", help="model dtype: auto, bfloat16, float16, float32")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--data-dir", default=None, help="local datasets (default: $PTQ_DATA_DIR)")
    p.add_argument("--no-plot", action="store_true", help="do not write table.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or per-row messages")
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="run every evaluation forward eagerly (default on CUDA: full batches replay a CUDA graph, "
                        "same logits, less host time)")
    p.set_defaults(func=run)


def _wants_quick(args) -> tuple[bool, str]:
    """Whether to build the quick table, and why (for the first line of output)."""
    if args.quick:
        return True, "--quick"
    if args.full:
        return False, "--full"
    import torch

    on_cuda = args.device.startswith("cuda") if args.device else torch.cuda.is_available()
    return (False, "CUDA device") if on_cuda else (True, "no CUDA device; --full for the recipes' own budget")


def run(args) -> int:
    import sys

    from ptq.table import TableSettings, describe_budget, quick_settings, run_table

    quick, why = _wants_quick(args)
    given = dict(
        out=args.out, model=args.model, recipes=tuple(args.recipes or ()), source=args.source, split=args.split,
        batch_size=args.batch_size, bos_windows=args.bos_windows, max_documents=args.max_documents, dtype=args.dtype,
        device=args.device, data_dir=args.data_dir, plot=not args.no_plot, progress=not args.no_progress,
        cuda_graph=not args.no_cuda_graph,
    )
    for key, value in (("seqlen", args.seqlen), ("max_windows", args.max_windows)):
        if value is not None:
            given[key] = value
    if args.no_word_ppl:
        given["word_ppl"] = False
    settings = quick_settings(**given) if quick else TableSettings(**given)
    what = "quick table" if quick else "full table"
    print(f"[ptq table] {what} ({why}): {describe_budget(settings)}", file=sys.stderr, flush=True)
    try:
        report = run_table(settings)
    except KeyboardInterrupt:
        print(f"[ptq table] interrupted: finished rows and checkpoints under {settings.out} are kept; the same "
              "command reuses them", file=sys.stderr, flush=True)
        raise
    from ptq.table import render_markdown

    print(render_markdown(report), end="")
    return 0
