#!/usr/bin/env bash
# Learned-rotation variants against the Hadamard-search row, one `ptq table` on the GPU (issue 18).
# Usage on the device, from the repo root:  source .assets/b/device_setup.sh && bash bench/learn_variants.sh [VARIANT...]
#   VARIANTS (default: search identity): search = w4a4kv4_gptq_rot.toml (the baseline, same run);
#   identity = the shipped w4a4kv4_gptq_learn.toml (R1/R2 from the identity on top of the search);
#   noweights = identity with the weights unquantized while learning (SpinQuant's setting, GPTQ after);
#   full = R1 only, from a whole-dimension randomised Hadamard (576 = SmolLM2's hidden size), weights unquantized;
#   ce = identity with the cross-entropy loss instead of KL; steps0 = identity without training (the start).
set -uo pipefail
OUT="${OUT:-gpu-out}"; mkdir -p "$OUT"; export PYTHONPATH=".:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
rec="$(mktemp -d)"; learn="$PWD/recipes/w4a4kv4_gptq_learn.toml"; recipes=()
for v in ${*:-search identity}; do
  case $v in
    search) recipes+=(w4a4kv4_gptq_rot) ;;
    identity) recipes+=("$learn") ;;
    noweights) printf 'extends = "%s"\n[rotation_learn]\nquantize_weights = false\n' "$learn" > "$rec/learn_noweights.toml" ;;
    full) printf 'extends = "%s"\n[rotation_learn]\nrotations = ["r1"]\nr1_block_size = 576\nquantize_weights = false\n' "$learn" > "$rec/learn_full.toml" ;;
    steps0) printf 'extends = "%s"\n[rotation_learn]\nsteps = 0\n' "$learn" > "$rec/learn_steps0.toml" ;;
    ce) printf 'extends = "%s"\n[rotation_learn]\nloss = "ce"\n' "$learn" > "$rec/learn_ce.toml" ;;
    *) echo "unknown variant $v"; exit 2 ;;
  esac
  [[ -f $rec/learn_$v.toml ]] && recipes+=("$rec/learn_$v.toml")
done
python -m ptq.cli table --model "$PTQ_SMOLLM2" --dtype bfloat16 --device cuda --no-word-ppl --no-plot --no-progress \
  --out /tmp/learn-table --recipes "${recipes[@]}" 2>&1 | tee "$OUT/learn_variants.log" | grep -v '^\s*$' | tail -n 40
cp /tmp/learn-table/table.md "$OUT/learn_table.md" 2>/dev/null; cat "$OUT/learn_table.md" 2>/dev/null
