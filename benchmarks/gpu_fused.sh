#!/usr/bin/env bash
# GPU session 2: fused LoRA / NF4 tests, the layer benchmark, and hizli bench capped and default.
#   bash benchmarks/gpu_fused.sh STEPS "CAP_GIB ..." [profile]   (results tarred into $OUT/results.tgz)
set -u
R=/tmp/hizli-r; rm -rf $R; mkdir -p $R
STEPS=${1:-20}; CAPS=${2:-3.094}; PROFILE=${3:-}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $R/gpu.txt; date -u | tee -a $R/gpu.txt
timeout 300 python3 -m pytest -m gpu ${GPU_TESTS:-tests/models/test_models_fused_lora.py tests/kernels/test_kernels_nf4.py \
  tests/kernels/test_kernels_swiglu.py} -q -p no:cacheprovider > $R/gpu-tests.log 2>&1
echo "gpu tests exit $?"; tail -15 $R/gpu-tests.log
[ -z "${NO_LAYER:-}" ] && timeout 150 python3 benchmarks/fused_lora_bench.py --tokens 512,2048,8192 --json $R/fused-layer.json > $R/fused-layer.log 2>&1
echo "layer bench exit $?"; grep '^{' $R/fused-layer.log
B="python3 -m hizli.cli bench --model llama-3.2-3b --tokenizer .gpu-bundle/tok/tokenizer.json --data .gpu-bundle/data/sharegpt.jsonl"
summ() { python3 - "$1" <<'PY'
import json,sys; d=json.load(open(sys.argv[1])); p=d.get("memory_plan") or {}
print({k:d.get(k) for k in ("tokens_per_s","peak_reserved_gib","peak_allocated_gib","predicted_peak_gib","first_step_s","mfu")},
      {k:p.get(k) for k in ("micro_batches","tokens_per_micro_batch","ce_chunk_rows","static_gib")}, "losses", d["losses"][:3], d["losses"][-3:])
PY
}
for CAP in $CAPS; do
  timeout 240 $B --steps $STEPS --max-memory-gib $CAP --json $R/cap$CAP.json > $R/cap$CAP.log 2>&1; echo "cap $CAP exit $?"
  summ $R/cap$CAP.json || tail -20 $R/cap$CAP.log
done
timeout 150 $B --steps $STEPS --json $R/default.json > $R/default.log 2>&1; echo "default exit $?"; summ $R/default.json || tail -20 $R/default.log
if [ -n "$PROFILE" ]; then
  timeout 200 $B --steps 14 --max-memory-gib ${CAPS%% *} --profile $R --json $R/cap-prof.json > $R/cap-prof.log 2>&1; echo "profile exit $?"
  head -45 $R/profile.txt 2>/dev/null | cut -c1-60,100-220
fi
tar czf $OUT/results.tgz -C /tmp hizli-r
