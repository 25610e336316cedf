"""``ptq quantize``: run a recipe's passes on a model and optionally save the result."""

from __future__ import annotations

import sys
from pathlib import Path

from ptq.commands import add_layer_by_layer_argument, add_parser, add_quantize_arguments, load_and_quantize

EPILOG = """\
examples:
  ptq quantize --model tests/fixtures/stories260k --recipe recipes/w4a4kv4.toml
  ptq quantize --model smollm2-135m --recipe recipes/w4a4kv4_gptq.toml --out out/gptq --device cuda --dtype bf16
  torchrun --nproc-per-node 8 -m ptq.cli quantize --model DIR --recipe recipes/w4a4kv4_gptq.toml --out out/gptq
      (data-parallel GPTQ: calibration batches split over the ranks, statistics all-reduced, rank 0 writes)

--out DIR writes (each file atomically):
  DIR/model.safetensors   the model's state dict after the passes (fake-quantized modules keep their parameters)
  DIR/recipe.toml         the merged recipe that was applied (extends resolved)
  DIR/info.json           what each pass did, with timings
In layer-by-layer mode the GPTQ weights are in [gptq].checkpoint_dir (one safetensors file per decoder layer) and
model.safetensors is not written (the whole model is never in memory).
"""


def register(subparsers) -> None:
    p = add_parser(subparsers, "quantize", help="quantize a model with a recipe (swap, rotation search, GPTQ)",
                   description="Load a model, run the passes RECIPE asks for (swap -> rotation_search -> gptq) and "
                   "print what each did. GPTQ checkpoints and rotation caches named in the recipe are reused when "
                   "their fingerprint matches (see --no-resume).", epilog=EPILOG)
    add_quantize_arguments(p)
    add_layer_by_layer_argument(p)
    p.add_argument("--out", metavar="DIR", help="write model.safetensors, recipe.toml and info.json here")
    p.set_defaults(func=run)


def jsonable(obj):
    """``info`` made JSON-safe: tensors become lists, paths and other objects their str()."""
    import torch

    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.tolist() if obj.numel() <= 64 else f"Tensor{tuple(obj.shape)}"
    return str(obj)


def untied_state_dict(model) -> dict:
    """The state dict with tensors that share storage (tied embeddings) cloned, as safetensors requires."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        out[name] = t.clone().contiguous() if key in seen else t.contiguous()
        seen.add(key)
    return out


def run(args) -> int:
    from ptq import distributed

    with distributed.process_group_from_env(args.device):
        return _run(args)


def _run(args) -> int:
    from ptq import __version__, distributed
    from ptq.io import atomic_save_safetensors, atomic_write_json, atomic_write_text
    from ptq.recipe import save_recipe

    model, _, recipe, info = load_and_quantize(args)
    if not distributed.is_main():  # rank 0 reports and writes
        return 0
    for name, pinfo in info.items():
        summary = ", ".join(f"{k}={v}" for k, v in pinfo.items() if isinstance(v, (int, float, str, bool)))
        print(f"{name}: {summary}")
    if "coverage" in info.get("swap", {}):
        from ptq.coverage import format_coverage

        print(format_coverage(info["swap"]["coverage"]))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"ptq_version": __version__, "model": str(args.model), "recipe": str(Path(args.recipe).name)}
        skeleton = any(p.is_meta for p in model.parameters())
        if not skeleton:
            atomic_save_safetensors(untied_state_dict(model), out / "model.safetensors", metadata=meta)
        atomic_write_text(out / "recipe.toml", save_recipe(recipe))
        atomic_write_json(out / "info.json", jsonable({"model": str(args.model), "ptq_version": __version__,
                                                       "passes": info}))
        wrote = "recipe.toml, info.json" if skeleton else f"{out / 'model.safetensors'}, recipe.toml, info.json"
        print(f"wrote {wrote}" + (" (layer by layer: the GPTQ weights are in the checkpoint directory)"
                                  if skeleton else ""), file=sys.stderr)
    return 0
