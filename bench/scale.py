"""GPTQ at Llama-3-8B / 70B scale: seconds per decoder layer and peak GPU / CPU memory, on 1 GPU and on N (torchrun).

    PYTHONPATH=. python bench/scale.py [--shapes 8b,70b] [--layers 2] [--nproc N] [--nsamples 128] [--seqlen 2048]
    PYTHONPATH=. python bench/scale.py --cpu-smoke        # tiny shapes on the CPU (1 process and 2 gloo ranks)

Models are built from a config (random weights, bf16, small vocabulary: no download) with ``--layers`` decoder
layers of the real shapes (8b: hidden 4096, MLP 14336, 32 heads / 8 KV heads; 70b: 8192, 28672, 64 / 8). GPTQ runs
with recipes/w4a4kv4_gptq.toml's settings (MXINT4 W/A/KV, act-order, clip search, 128 x 2048 calibration tokens;
random token windows stand in for WikiText-2, which changes nothing about the cost) and a fresh checkpoint directory.
The model stays on the CPU and each layer visits the GPU in turn, as in a real run.

Each configuration runs in its own process (under torchrun for N > 1) and reports: seconds per layer (the pass's
time minus calibration set-up, fingerprint and capture, divided by the layers), peak GPU memory (max over ranks of
torch.cuda.max_memory_allocated) and peak CPU RSS (max over ranks). The table's ratios are against the 1-process row
of the same shape measured in this run. N defaults to the number of visible GPUs; with one GPU only the 1-GPU rows
are measured.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "w4a4kv4_gptq.toml"
SHAPES = {  # hidden, intermediate, heads, kv heads
    "8b": (4096, 14336, 32, 8),
    "70b": (8192, 28672, 64, 8),
    "smoke": (64, 128, 2, 1),
}
SETUP_PHASES = ("calibration_data", "fingerprint", "capture")


def build_model(shape: str, layers: int, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, heads, kv = SHAPES[shape]
    cfg = LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=8192,
                      rope_theta=500000.0, bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(dtype)
    return model.eval()


def worker(args) -> int:
    """One configuration: build, swap + GPTQ, write the measurements (rank 0)."""
    from types import SimpleNamespace

    import ptq
    from ptq import distributed
    from ptq.data import calibration_key
    from ptq.passes.base import PassContext

    device = "cpu" if args.cpu_smoke else "cuda"
    with distributed.process_group_from_env(device):
        model = build_model(args.shape, args.layers, torch.float32 if args.cpu_smoke else torch.bfloat16)
        recipe = ptq.load_recipe(_recipe_text(args))
        tok = SimpleNamespace(bos_token_id=1)  # the calibration windows below are given, not tokenised
        g = torch.Generator().manual_seed(0)
        windows = torch.randint(3, 1024, (args.nsamples, args.seqlen), generator=g)
        windows[:, 0] = 1
        ctx = PassContext(tokenizer=tok, device=torch.device(device), progress=False)
        ctx.calibration[calibration_key(recipe.gptq.dataset, args.nsamples, args.seqlen, recipe.gptq.seed, 1)] = windows
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        _, info = ptq.quantize_module_transform_pass(model, recipe, ctx=ctx)
        wall = time.perf_counter() - t0
        g = info["gptq"]
        per_layer = (sum(v for k, v in g["time_breakdown"].items() if k not in SETUP_PHASES)
                     / max(1, len(g["computed"])))
        gpu = torch.cuda.max_memory_allocated() if device == "cuda" else 0
        cpu = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peaks = distributed.all_gather_object((gpu, cpu, per_layer), "gathering measurements")
        if distributed.is_main():
            Path(args.out).write_text(json.dumps({
                "shape": args.shape, "world_size": g["world_size"], "layers": len(g["computed"]),
                "s_per_layer": max(p[2] for p in peaks), "gptq_s": g["gptq_seconds"], "wall_s": wall,
                "peak_gpu": max(p[0] for p in peaks), "peak_cpu": max(p[1] for p in peaks),
                "breakdown": g["time_breakdown"]}))
    return 0


def _recipe_text(args) -> str:
    ck = str(Path(args.out).with_suffix(".checkpoints"))  # the same fresh directory on every rank, in the parent's tmp
    return (f"extends = {json.dumps(str(RECIPE))}\n[gptq]\nnsamples = {args.nsamples}\nseqlen = {args.seqlen}\n"
            f"cali_batch_size = {args.cali_batch_size}\ncheckpoint_dir = {json.dumps(ck)}\n")


def launch(args, shape: str, nproc: int, out: Path) -> dict | None:
    cmd = [sys.executable]
    if nproc > 1:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd += ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={port}"]
    cmd += [str(Path(__file__).resolve()), "--worker", "--shape", shape, "--layers", str(args.layers),
            "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--cali-batch-size",
            str(args.cali_batch_size), "--out", str(out)] + (["--cpu-smoke"] if args.cpu_smoke else [])
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if args.cpu_smoke:
        env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"--- {shape} x {nproc} failed (exit {r.returncode}):\n{r.stderr[-4000:]}", file=sys.stderr)
        return None
    return json.loads(out.read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="8b,70b")
    p.add_argument("--layers", type=int, default=2, help="decoder layers to build and quantize (default 2)")
    p.add_argument("--nproc", type=int, default=None, help="ranks of the torchrun rows (default: visible GPUs)")
    p.add_argument("--nsamples", type=int, default=None, help="default: the recipe's 128 (smoke: 4)")
    p.add_argument("--seqlen", type=int, default=None, help="default: the recipe's 2048 (smoke: 32)")
    p.add_argument("--cali-batch-size", type=int, default=None, help="default: the recipe's 8 (smoke: 1)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU, 1 process and 2 gloo ranks")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    smoke = args.cpu_smoke
    for key, (full, tiny) in {"nsamples": (128, 4), "seqlen": (2048, 32), "cali_batch_size": (8, 1)}.items():
        if getattr(args, key) is None:
            setattr(args, key, tiny if smoke else full)
    if args.worker:
        return worker(args)
    if not smoke and not torch.cuda.is_available():
        print("bench/scale.py: no CUDA device here (nothing measured); --cpu-smoke runs the tiny CPU version")
        return 0
    shapes = ["smoke"] if smoke else args.shapes.split(",")
    nproc = args.nproc or (2 if smoke else torch.cuda.device_count())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in shapes:
            base = launch(args, shape, 1, Path(tmp) / f"{shape}_1.json")
            rows.append((base, base))
            if nproc > 1:
                rows.append((launch(args, shape, nproc, Path(tmp) / f"{shape}_{nproc}.json"), base))
    print(f"\nGPTQ ({RECIPE.name} settings, {args.nsamples} x {args.seqlen} tokens, {args.layers} layers)\n")
    print("| shape | ranks | s / layer | x 1 rank | peak GPU GiB | x 1 rank | peak CPU GiB | GPTQ s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    gib = 2 ** 30
    ok = True
    for row, base in rows:
        if row is None or base is None:
            ok = False
            continue
        gpu_ratio = f"{row['peak_gpu'] / base['peak_gpu']:.2f}" if base["peak_gpu"] else "-"
        print(f"| {row['shape']} | {row['world_size']} | {row['s_per_layer']:.3f} | "
              f"{row['s_per_layer'] / base['s_per_layer']:.2f} | {row['peak_gpu'] / gib:.2f} | {gpu_ratio} | "
              f"{row['peak_cpu'] / gib:.2f} | {row['gptq_s']:.2f} |")
    print("\nTime per phase, seconds over all layers (the pass's time_breakdown):\n")
    for row, _ in rows:
        if row is not None:
            parts = ", ".join(f"{k} {v:.2f}" for k, v in sorted(row["breakdown"].items(), key=lambda kv: -kv[1]))
            print(f"- {row['shape']} x {row['world_size']}: {parts}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
