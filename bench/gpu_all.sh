#!/usr/bin/env bash
# Everything we measure on the GPU machine, in one place (see ../shared/gpu/README.md for staging the model/data).
# Usage on the device, from the repo root:  source .assets/b/device_setup.sh && bash bench/gpu_all.sh PART
#   PARTS: any of tests table forward (+ host_overhead) gptq scale hadamard packed kernels (default all).  Logs and tables go under $OUT (default ./gpu-out).
set -uo pipefail
OUT="${OUT:-gpu-out}"; mkdir -p "$OUT"
export PYTHONPATH=".:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
parts=" ${*:-all} "
want() { [[ $parts == *" $1 "* || $parts == *" all "* ]]; }
run() { local name="$1" limit="$2"; shift 2; echo "=== $name"; timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "=== $name rc=$? ($SECONDS s)"; tail -n 40 "$OUT/$name.log"; }
want tests && run gpu_tests 300 python -m pytest -q -p no:cacheprovider -m gpu tests -rf --tb=short ${PTQ_GPU_TESTS_K:+-k "$PTQ_GPU_TESTS_K"}
want table && run table 540 python -m ptq.cli table --model "$PTQ_SMOLLM2" --dtype bfloat16 --device cuda --out "$OUT/table" --no-progress
want forward && run forward 150 python bench/forward.py --ppl
want forward && run host_overhead 60 python bench/host_overhead.py
want gptq && run gptq 200 python bench/gptq.py
want scale && run scale 1800 python bench/scale.py
want hadamard && run hadamard 240 python bench/hadamard.py --quick --search
want packed && run packed 150 python bench/packed_matmul.py --quick
want kernels && run kernels 300 python bench/kernels.py --json "$OUT/kernels.json"
exit 0
