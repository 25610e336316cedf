"""``ptq eval``: perplexity (and optionally word perplexity, KL / top-1, lm-eval tasks) of a model, quantized with a
recipe or not."""

from __future__ import annotations

import json

from ptq.commands import add_parser

EXAMPLES = """\
examples:
  ptq eval --word-ppl                                      # built-in SmolLM2-135M, WikiText-2 test, seqlen 2048
  ptq eval --recipe w4a4kv4 --kl --max-windows 16          # quantized, with KL / top-1 to the unquantized model
  ptq eval --model tests/fixtures/stories260k --source tinystories --split validation --seqlen 256 --bos-windows
  ptq eval --recipe w4a4kv4 --lm-eval wikitext --seqlen 2048   # lm-eval itself (needs lm-eval installed)
"""


def register(subparsers) -> None:
    p = add_parser(
        subparsers,
        "eval",
        help="perplexity, word perplexity, KL / top-1 and lm-eval tasks of a (quantized) model",
        description=(
            "Load a model, quantize it with --recipe if given, and report token perplexity over non-overlapping "
            "windows; --word-ppl adds lm-eval's wikitext word perplexity (computed natively, no lm-eval needed); "
            "--kl adds KL divergence and top-1 agreement to the unquantized model; --lm-eval TASK... runs lm-eval "
            "tasks (wikitext from local files when available)."),
        epilog=EXAMPLES,
    )
    p.add_argument("--model", default=None, help="HF id or local directory (default: built-in SmolLM2-135M)")
    p.add_argument("--recipe", default=None, help="recipe file or shipped recipe name (default: unquantized)")
    p.add_argument("--source", default="wikitext2", help="evaluation text: wikitext2, tinystories or a file path")
    p.add_argument("--split", default="test", choices=("test", "validation"))
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--bos-windows", action="store_true", help="start every window with BOS")
    p.add_argument("--word-ppl", action="store_true", help="also lm-eval-style wikitext word perplexity")
    p.add_argument("--max-documents", type=int, default=None, help="word perplexity on the first N articles")
    p.add_argument("--kl", action="store_true", help="also KL / top-1 agreement to the unquantized model")
    p.add_argument("--lm-eval", nargs="+", default=None, metavar="TASK", help="lm-eval task names to run")
    p.add_argument("--limit", type=float, default=None, help="lm-eval: documents per task")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--data-dir", default=None, help="local datasets (default: $PTQ_DATA_DIR)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON (atomically)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="run every perplexity forward eagerly (default on CUDA: full batches replay a CUDA graph, "
                        "same logits, less host time)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ptq.eval import evaluate_perplexity, word_perplexity
    from ptq.models import default_bos_id, load_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    progress = not args.no_progress
    model, tok = load_model(args.model, dtype=args.dtype, device=device)
    ref = None
    if args.kl:
        if args.recipe is None:
            from ptq.errors import PtqError

            raise PtqError("--kl compares a quantized model with the unquantized one: give --recipe too")
        ref, _ = load_model(args.model, dtype=args.dtype, device=device)
    results: dict = {"model": args.model or "SmolLM2-135M (built-in default)", "recipe": args.recipe}
    if args.recipe is not None:
        from ptq.passes.pipeline import quantize_module_transform_pass
        from ptq.table import resolve_recipe_path

        model, info = quantize_module_transform_pass(model, resolve_recipe_path(args.recipe), tokenizer=tok,
                                                     device=device, progress=progress)
        results["quantize_seconds"] = sum(d.get("seconds", 0.0) for d in info.values())
    bos = default_bos_id(tok) if args.bos_windows else None
    results["perplexity"] = evaluate_perplexity(
        model, tok, args.source, args.split, seqlen=args.seqlen, batch_size=args.batch_size, device=device,
        max_windows=args.max_windows, bos_id=bos, progress=progress, data_dir=args.data_dir, ref_model=ref,
        cuda_graph=not args.no_cuda_graph)
    if args.word_ppl:
        results["word_perplexity"] = word_perplexity(
            model, tok, split="test", max_length=args.seqlen, batch_size=args.batch_size, device=device,
            max_documents=args.max_documents, progress=progress, data_dir=args.data_dir)
    if args.lm_eval:
        from ptq.lm_eval_adapter import run_lm_eval

        results["lm_eval"] = run_lm_eval(model, tok, args.lm_eval, limit=args.limit, batch_size=args.batch_size,
                                         max_length=args.seqlen, data_dir=args.data_dir)
    if args.json:
        from ptq.io import atomic_write_json

        atomic_write_json(args.json, results)
    print(_summary(results))
    return 0


def _summary(results: dict) -> str:
    p = results["perplexity"]
    lines = [f"perplexity {p['ppl']:.4f} ({p['n_windows']} windows of {p['seqlen']}, {p['n_tokens']} tokens, "
             f"{p['seconds']:.1f} s)"]
    if "kl" in p:
        lines.append(f"KL to unquantized {p['kl']:.5f}, top-1 agreement {p['top1']:.4f}")
    if "word_perplexity" in results:
        w = results["word_perplexity"]
        lines.append(f"word perplexity {w['word_perplexity']:.4f}, bits per byte {w['bits_per_byte']:.4f} "
                     f"({w['n_documents']} articles, max length {w['max_length']})")
    for task, metrics in results.get("lm_eval", {}).items():
        lines.append(f"lm-eval {task}: " + json.dumps(metrics, sort_keys=True))
    return "\n".join(lines)
