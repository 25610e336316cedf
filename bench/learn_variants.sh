#!/usr/bin/env bash
# Learned-rotation variants against the Hadamard-search row, one `ptq table` on the GPU (issue 18).
# Usage on the device, from the repo root:  source .assets/b/device_setup.sh && bash bench/learn_variants.sh [VARIANT...]
# VARIANTS (default: search learn). Each is the shipped recipe with a few [rotation_learn] keys changed:
#   search      w4a4kv4_gptq_rot.toml: the Hadamard search + GPTQ, no learning (the baseline, same run)
#   learn       the shipped w4a4kv4_gptq_learn.toml: R2 from the identity, 200 steps, lr 0.005, KL, RTN weights
#   r2-lr001 / r2-lr02 / r2-400 / r2-nw   learn at lr 0.001 / lr 0.02 / 400 steps / weights unquantized
#   r1r2        R1 + R2 from the identity (RMSNorm weights folded, embeddings untied), lr 0.001
#   r1r2-steps0 / r1r2-nw / r1r2-ce        r1r2 untrained (the start) / weights unquantized / cross-entropy loss
#   sm / sm-lr02 / sm-lr001 / sm-down / sm-400   learn plus smoothing scales (qkv, gate_up, down; or down only) at
#               smooth_lr = lr / 0.02 / 0.001, or for 400 steps
#   full0 / full0-r1   R1 (+ R2) from whole-dimension randomised Hadamards (576 = SmolLM2's hidden size), untrained
#   no-act / no-kv / no-weight   the search row without input / KV-cache / weight quantization (where the error is)
#   search-aNN / learn-aNN   the search / learn row with asymmetric GPTQ ([gptq].asymmetric = 0.NN; a100 = 1.0)
set -uo pipefail
OUT="${OUT:-gpu-out}"; mkdir -p "$OUT"; export PYTHONPATH=".:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
rec="$(mktemp -d)"; learn="$PWD/recipes/w4a4kv4_gptq_learn.toml"; recipes=()
r1r2='rotations = ["r1", "r2"]\nr1_block_size = 1\nuntie_embeddings = true\nlr = 0.001\n'
variant() {  # the [rotation_learn] keys a variant changes
  case $1 in
    r2-lr001) echo 'lr = 0.001\n' ;;
    r2-lr02) echo 'lr = 0.02\n' ;;
    r2-400) echo 'steps = 400\n' ;;
    r2-nw) echo 'quantize_weights = false\n' ;;
    r1r2) echo "$r1r2" ;;
    r1r2-steps0) echo "${r1r2}steps = 0\n" ;;
    r1r2-nw) echo "${r1r2}quantize_weights = false\n" ;;
    r1r2-ce) echo "${r1r2}loss = \"ce\"\n" ;;
    full0) echo 'rotations = ["r1", "r2"]\nr1_block_size = 576\nr2_block_size = 64\nuntie_embeddings = true\nsteps = 0\n' ;;
    sm) echo 'smooth = ["qkv", "gate_up", "down"]\n' ;;
    sm-lr02) echo 'smooth = ["qkv", "gate_up", "down"]\nsmooth_lr = 0.02\n' ;;
    sm-lr001) echo 'smooth = ["qkv", "gate_up", "down"]\nsmooth_lr = 0.001\n' ;;
    sm-down) echo 'smooth = ["down"]\n' ;;
    sm-400) echo 'smooth = ["qkv", "gate_up", "down"]\nsteps = 400\n' ;;
    full0-r1) echo 'rotations = ["r1"]\nr1_block_size = 576\nuntie_embeddings = true\nsteps = 0\n' ;;
    *) return 1 ;;
  esac
}
for v in ${*:-search learn}; do
  case $v in
    search) recipes+=(w4a4kv4_gptq_rot) ;;
    learn) recipes+=("$learn") ;;
    search-a*|learn-a*) base="$PWD/recipes/w4a4kv4_gptq_rot.toml"; [[ $v == learn-* ]] && base="$learn"
       printf 'extends = "%s"\n[gptq]\nasymmetric = %s\n' "$base" "$(awk -v n="${v##*-a}" 'BEGIN{print n/100}')" \
         > "$rec/$v.toml"; recipes+=("$rec/$v.toml") ;;
    no-act|no-kv|no-weight) python - "$v" "$rec/learn_$v.toml" <<'PY' && recipes+=("$rec/learn_$v.toml") ;;
import sys, tomli_w
from ptq.recipe import load_recipe, recipe_to_dict
v, path = sys.argv[1:]
d = recipe_to_dict(load_recipe("recipes/w4a4kv4_gptq_rot.toml"))
drop = {"no-act": "data_in_", "no-weight": "weight_"}.get(v)
for key, t in d.items():
    if not key.startswith("layers"):
        continue
    if v == "no-kv" and "kv_cache" in t:
        t["kv_cache"] = {"bypass": True}
    for k in [k for k in t if drop and k.startswith(drop)]:
        del t[k]
    if v == "no-weight":
        t.pop("gptq", None)
if v == "no-weight":
    del d["gptq"]
open(path, "wb").write(tomli_w.dumps(d).encode())
PY
    *) keys="$(variant "$v")" || { echo "unknown variant $v"; exit 2; }
       printf "extends = \"%s\"\n[rotation_learn]\n$keys" "$learn" > "$rec/learn_$v.toml"; recipes+=("$rec/learn_$v.toml") ;;
  esac
done
python -m ptq.cli table --model "$PTQ_SMOLLM2" --dtype bfloat16 --device cuda --no-word-ppl --no-plot --no-progress \
  --out /tmp/learn-table --recipes "${recipes[@]}" 2>&1 | tee "$OUT/learn_variants.log" | grep -v '^\s*$' | tail -n 40
cp /tmp/learn-table/table.md "$OUT/learn_table.md" 2>/dev/null; cat "$OUT/learn_table.md" 2>/dev/null
