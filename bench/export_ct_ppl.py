"""Perplexity of ptq's fake-quant model vs its compressed-tensors export reloaded by plain transformers (no ptq).

For each weight format, the weight-only recipe (every decoder matmul by role, W4A16) is applied to the model, its
WikiText-2 test perplexity measured, the model exported with ``format="compressed-tensors"``, and the export loaded
in a fresh Python process that never imports ptq (``AutoModelForCausalLM.from_pretrained`` with compressed-tensors
installed) and evaluated on the very same token windows with the very same loss code. Prints one table.

    python bench/export_ct_ppl.py --model $PTQ_SMOLLM2 --device cuda            # GPU (the issue's check)
    python bench/export_ct_ppl.py --model ../shared/models/stories260k --cpu-smoke
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# shared by both processes (the child gets it as text, so it cannot import ptq by accident)
PPL_CODE = '''
import math, torch
@torch.no_grad()
def ppl(model, windows, device, batch=8):
    nll, n = 0.0, 0
    for s in range(0, windows.shape[0], batch):
        ids = windows[s:s + batch].to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        nll += torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 ids[:, 1:].reshape(-1), reduction="sum").item()
        n += ids[:, 1:].numel()
    return math.exp(nll / n)
'''

CHILD = PPL_CODE + '''
import sys, json, torch
from transformers import AutoModelForCausalLM
path, windows, device = sys.argv[1], torch.load(sys.argv[2]), sys.argv[3]
model = AutoModelForCausalLM.from_pretrained(path, dtype="auto").to(device).eval()  # the dtype the export wrote
assert not any(m == "ptq" or m.startswith("ptq.") for m in sys.modules), "ptq was imported"
print(json.dumps({"ppl": ppl(model, windows, device)}))
'''

WEIGHT_ONLY = {
    "mxfp4": 'name = "mxfp"\nweight_format = "e2m1"\nweight_block_size = 32\n',
    "nvfp4": 'name = "nvfp4"\nweight_width = 4\n',
    "mxint4": 'name = "mxint"\nweight_width = 4\nweight_block_size = 32\n',
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--formats", default="mxfp4,nvfp4,mxint4")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=0, help="evaluate the first N windows (0: all)")
    ap.add_argument("--dataset", default="wikitext2")
    ap.add_argument("--cpu-smoke", action="store_true", help="stories260k-sized run on the CPU in fp32")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        args.device, args.dtype, args.seqlen, args.windows, args.dataset = "cpu", "float32", 128, 4, "tinystories"

    import torch

    import ptq
    from ptq import data
    from ptq.models import default_bos_id

    scope: dict = {}
    exec(PPL_CODE, scope)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for fmt in args.formats.split(","):
            model, tok = ptq.load_model(args.model, dtype=args.dtype)
            model = model.to(args.device)
            windows = data.eval_windows(data.tokenize(tok, data.load_text(args.dataset, "test")), args.seqlen,
                                        default_bos_id(tok))
            if args.windows:
                windows = windows[:args.windows]
            torch.save(windows, tmp / "windows.pt")
            base = scope["ppl"](model, windows, args.device) if not rows else rows[0]["base"]
            recipe = 'by = "role"\n[\'layers\\.\\d+\\.(q|k|v|qkv|o|gate|up|gate_up|down)\']\n' + WEIGHT_ONLY[fmt]
            model, _ = ptq.quantize_module_transform_pass(model, recipe, tokenizer=tok, progress=False)
            fake = scope["ppl"](model, windows, args.device)
            t0 = time.perf_counter()
            summary = ptq.export_quantized(model, tmp / fmt, tokenizer=tok, progress=False)
            export_s = time.perf_counter() - t0
            out = subprocess.run([sys.executable, "-c", CHILD, str(tmp / fmt), str(tmp / "windows.pt"), args.device],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                rows.append({"format": fmt, "base": base, "fake": fake, "ct": float("nan"), "bpw": None,
                             "export_s": export_s, "issues": len(summary.get("issues", []))})
                continue
            ct = json.loads(out.stdout.strip().splitlines()[-1])["ppl"]
            rows.append({"format": fmt, "base": base, "fake": fake, "ct": ct, "bpw": summary.get("bits_per_weight"),
                         "export_s": export_s, "issues": len(summary.get("issues", []))})
            del model
    print(f"\nmodel {args.model}, {args.dataset} test, {windows.shape[0]} windows x {args.seqlen}, {args.dtype}, "
          f"{args.device}; W4A16 by role")
    print("| format | unquantized | ptq fake-quant | transformers + compressed-tensors | ct / ptq | bits/weight | "
          "export s | export issues |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        bpw = f"{r['bpw']:.2f}" if r["bpw"] else "-"
        print(f"| {r['format']} | {r['base']:.4f} | {r['fake']:.4f} | {r['ct']:.4f} | {r['ct'] / r['fake']:.6f} | "
              f"{bpw} | {r['export_s']:.1f} | {r['issues']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
