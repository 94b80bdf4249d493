#!/usr/bin/env bash
# Runs ON the lent GPU machine, from the repo root, once the Qwen bundle of benchmarks/gpu_carry.sh is unpacked
# (/root/carry-qwen): accuracy grid rows of Qwen2.5-Coder-0.5B at the full budget of docs/accuracy.md (32,768 Wikipedia
# tokens at context 2048, 128 × 512 C4 calibration tokens, g128, GPTQ with act order (ACT_ORDER=0: without), sequential
# calibration), one `eval_accuracy.py grid` call per spec, while the time budget lasts.
#
#   usage: SPECS="BITS GRID-ARGS;BITS GRID-ARGS;..." [BUDGET=480] [ROW_S=80] [ACT_ORDER=1] \
#            bash benchmarks/gpu_grid.sh [SEED_RESULTS]
#   e.g.   SPECS="4 --rotations none --salient 0 --calib-offset 128;4 --rotations absorbed --complement random \
#            --salient 0 --seed 1" bash benchmarks/gpu_grid.sh benchmarks/results/accuracy-qwen-full-2026-12-05-night.json
#
# SEED_RESULTS (a results file of earlier rows, e.g. with the fp16 row) is copied first, so its rows are not re-run.
# A spec starts only while at least ROW_S seconds of BUDGET are left (a row takes ~60–70 s on an H100 / H200).
# Rows go to $OUT/acc-qwen-full.json ($OUT: the device tool's output folder), logs to $OUT/grid.log.
set -euo pipefail
out=${OUT:?run on the device machine (OUT is its output folder)}
results=$out/acc-qwen-full.json
[ -z "${1:-}" ] || cp "$1" "$results"
# shellcheck source=benchmarks/device_env.sh
source benchmarks/device_env.sh
export ROSAQ_CACHE=/root/carry-qwen/cache PYTHONPATH="/root/carry-qwen/site:$PYTHONPATH"
common=(--model qwen --texts wiki --max-tokens 32768 --context 2048 --num-samples 128 --seq-len 512
        --device cuda --batch-size 8 --gptq on --sequential)
[ "${ACT_ORDER:-1}" = 0 ] || common+=(--act-order)
IFS=';' read -ra specs <<< "${SPECS:?SPECS: BITS GRID-ARGS separated by ;}"
start=$SECONDS
for spec in "${specs[@]}"; do
  read -ra args <<< "$spec"
  if (( ${BUDGET:-480} - (SECONDS - start) < ${ROW_S:-80} )); then echo "budget spent, not run: $spec"; continue; fi
  echo "== $spec ($((SECONDS - start)) s)"
  python3 benchmarks/eval_accuracy.py grid "${common[@]}" --bits "${args[0]}" "${args[@]:1}" --results "$results" \
    2>&1 | grep -v "it/s]" | tee -a "$out/grid.log" | tail -n 3
done
python3 benchmarks/eval_accuracy.py report --results "$results" | tail -n 40
