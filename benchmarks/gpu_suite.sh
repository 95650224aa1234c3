#!/usr/bin/env bash
# Everything a CUDA GPU is needed for, in one call: the GPU tests, then the GPU tables (the zoo's
# transformers, the tracked steps, the Fisher benchmark, the penalty step), most wanted first, each
# under a time limit so that one slow step cannot take the others' time. Run from the repository
# root; nothing is installed (torch, triton and transformers must be there already).
#
#     bash benchmarks/gpu_suite.sh [TOTAL_SECONDS]     # default 480: leaves room to rerun in a 15-minute loan
#
# Logs go to $OUT/gpu_suite/ (or benchmarks/results/gpu_suite_logs/ without $OUT), the JSON to
# benchmarks/results/<gpu>/ and, with $OUT set, a copy to $OUT/results/<gpu>/. A summary of every
# step (its exit status, seconds and last lines) is printed last. Afterwards, on the machine that
# holds the repository: copy the JSON into benchmarks/results/<gpu>/ and run
# `python benchmarks/update_readme.py`.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=0
PY=${PYTHON:-python3}
total=${1:-480}
logs=${OUT:+$OUT/gpu_suite}
logs=${logs:-benchmarks/results/gpu_suite_logs}
mkdir -p "$logs"

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_suite.sh: this torch sees no CUDA GPU; the GPU suite needs one" >&2
    exit 2
fi
slug=$("$PY" -c "from fastewc.bench.timing import machine_slug; print(machine_slug('cuda'))")
start=$SECONDS
summary=()

# step NAME LIMIT COMMAND...: run COMMAND for at most LIMIT seconds (less if the total runs short)
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((total - (SECONDS - start)))
    if [ "$left" -lt 20 ]; then
        summary+=("$name: not run (the total of ${total} s is spent)")
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$logs/$name.log" 2>&1
    local rc=$?
    local why=""
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && why=" (stopped at its limit of ${limit} s)"
    summary+=("$name: exit $rc in $((SECONDS - t0)) s$why; log $logs/$name.log")
    summary+=("$(tail -n 8 "$logs/$name.log" | sed 's/^/    /')")
}

"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())" > "$logs/versions.log" 2>&1
step gpu_tests 120 "$PY" -m pytest -q -m gpu tests/gpu -p no:cacheprovider
step zoo_speed 150 "$PY" benchmarks/fisher_zoo_speed.py --device cuda --repeats 5
step tracker 120 "$PY" benchmarks/bench_tracker.py --device cuda --samples 512 --hf-samples 128 --repeats 7
step fisher 150 "$PY" benchmarks/bench_fisher.py --device cuda --samples 512 --hf-samples 128 --repeats 3
step penalty 150 "$PY" benchmarks/bench_penalty_gpu.py --repeats 20

if [ -n "${OUT:-}" ] && [ -d "benchmarks/results/$slug" ]; then
    mkdir -p "$OUT/results"
    cp -r "benchmarks/results/$slug" "$OUT/results/"
fi
echo "GPU suite on $(cat "$logs/versions.log"), $((SECONDS - start)) s of $total"
for line in "${summary[@]}"; do
    echo "$line"
done
echo "JSON: benchmarks/results/$slug/${OUT:+ (copied to $OUT/results/$slug/)}"
