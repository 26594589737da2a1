#!/usr/bin/env bash
# hizli bench on the recipe shape: the default memory plan (profiled), then capped runs.
#   bash benchmarks/gpu_plan.sh STEPS CAP_GIB [CAP_GIB ...]
set -u
OUT=${OUT:-/tmp/hizli-out}; mkdir -p "$OUT"
STEPS=${1:-20}; shift
export PYTHONUNBUFFERED=1
B="python3 -m hizli.cli bench --model llama-3.2-3b --tokenizer .gpu-bundle/tok/tokenizer.json --data .gpu-bundle/data/sharegpt.jsonl --steps $STEPS"
timeout 240 $B --profile "$OUT" --json "$OUT/bench-default.json" > "$OUT/bench-default.log" 2>&1
echo "default exit $?"; grep -v "^{\|Loading\|tokenizing" "$OUT/bench-default.log" | tail -14
for cap in "$@"; do
  timeout 200 $B --max-memory-gib "$cap" --json "$OUT/bench-cap$cap.json" > "$OUT/bench-cap$cap.log" 2>&1
  echo "cap $cap exit $?"; grep -v "^{\|Loading\|tokenizing" "$OUT/bench-cap$cap.log" | tail -12
done
head -40 "$OUT/profile.txt"
