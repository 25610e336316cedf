"""RTN -> GPTQ -> rotation on a CPU, in a minute: the tutorial's flow on the 260K-parameter stories260k model.

    PYTHONPATH=. python tutorials/cpu_stories260k.py [--out DIR] [--model PATH] [--quick]

It builds three small recipes that ``extends`` the shipped W4A4KV4 recipes and only shrink the calibration (a few
short TinyStories windows instead of 128 x 2048 WikiText tokens), then runs the same table runner as ``ptq table``
and prints the table. Everything else (formats, block sizes, which layers are quantized, clip search) is exactly
what the shipped recipes say. See tutorials/rtn_gptq_rotation.md for the walk-through on SmolLM2-135M.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a source checkout without installing ptq
    sys.path.insert(0, str(ROOT))

from ptq.table import TableSettings, render_markdown, resolve_recipe_path, run_table  # noqa: E402

DEFAULT_MODEL = ROOT / "tests" / "fixtures" / "stories260k"

# Calibration sized for a 260K-parameter model on a laptop CPU. The [gptq] / [rotation_search] keys given here
# replace the shipped values key by key (``extends``); every selector is inherited unchanged.
SMALL_GPTQ = """
[gptq]
dataset = "tinystories"   # the model's own domain; the shipped recipes calibrate on WikiText-2
nsamples = {nsamples}
seqlen = 128
cali_batch_size = 8
"""
SMALL_ROTATION = """
[rotation_search]
dataset = "tinystories"
calib_nsamples = {rot_nsamples}
calib_seqlen = 128
kind = "full"   # stories260k's MLP width 172 is not a multiple of the 32-wide blocks the shipped recipe rotates in
"""
# --quick (what the test suite runs) searches fewer matmul types: each greedy round tries every remaining candidate,
# and the full search over 8 types costs ~30 calibration passes. These four are the ones the full search keeps here.
QUICK_CANDIDATES = """candidates = ["kv_cache", "down", "v", "o"]
"""


def write_small_recipes(recipe_dir: Path, quick: bool = False) -> list[Path]:
    """The three shipped W4A4KV4 recipes with CPU-sized calibration, written under ``recipe_dir``."""
    recipe_dir.mkdir(parents=True, exist_ok=True)
    sizes = {"nsamples": 32, "rot_nsamples": 2 if quick else 8}
    texts = {
        "w4a4kv4": "",
        "w4a4kv4_gptq": SMALL_GPTQ,
        "w4a4kv4_gptq_rot": SMALL_GPTQ + SMALL_ROTATION + (QUICK_CANDIDATES if quick else ""),
    }
    paths = []
    for stem, extra in texts.items():
        shipped = resolve_recipe_path(stem).resolve()
        p = recipe_dir / f"{stem}.toml"
        p.write_text(f"extends = {str(shipped)!r}\n" + extra.format(**sizes))
        paths.append(p)
    return paths


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.environ.get("PTQ_STORIES260K", str(DEFAULT_MODEL)))
    ap.add_argument("--out", default="ptq-tutorial-cpu")
    ap.add_argument("--quick", action="store_true", help="fewer calibration and evaluation windows")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    out = Path(args.out)
    recipes = write_small_recipes(out / "recipes", quick=args.quick)
    settings = TableSettings(
        out=str(out),
        model=args.model,
        recipes=tuple(str(p) for p in recipes),
        source="tinystories",      # what stories260k was trained on (WikiText would be out of domain)
        split="validation",
        seqlen=128 if args.quick else 256,
        bos_windows=True,          # the stories260k tokenizer adds no BOS itself; the model expects one
        max_windows=8 if args.quick else 32,
        word_ppl=False,            # word perplexity is a WikiText metric
        dtype="float32",
        device="cpu",
        progress=not args.no_progress,
    )
    report = run_table(settings)
    print(render_markdown(report), end="")
    return report


if __name__ == "__main__":
    main()
