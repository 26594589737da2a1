#!/usr/bin/env bash
# Before a final call: one capped recipe run (max_memory_gib=3.094) to check the memory plan's
# prediction against the measured peak and the speed, then the GPU tests of what changed.
# Results tarred into $OUT.
set -u
R=/tmp/hizli-precheck; rm -rf $R; mkdir -p $R
export PYTHONUNBUFFERED=1
M=$(python3 benchmarks/recipe_model.py)
python3 -m hizli.cli bench --model $M --tokenizer .gpu-bundle/tok/tokenizer.json --data .gpu-bundle/data/sharegpt.jsonl \
  --steps 20 --max-memory-gib ${CAP:-3.094} --json $R/capped.json > $R/capped.log 2>&1
python3 -c "import json;d=json.load(open('$R/capped.json'));p=d['memory_plan'];print('capped', d['tokens_per_s'], 'tokens/s; peak reserved', d['peak_reserved_gib'], 'allocated', d['peak_allocated_gib'], 'predicted', round(p['predicted_peak_gib'],3), 'static', round(p['static_gib'],3), 'tokens/mb', p['tokens_per_micro_batch'], 'mb', p['micro_batches'])"
timeout ${TEST_S:-150} python3 -m pytest -m gpu -q -p no:cacheprovider ${GPU_TESTS:-tests/kernels/test_kernels_rope.py tests/kernels/test_kernels_attention.py tests/models/test_models_lora.py tests/models/test_models_fused_lora.py tests/train/test_train_gpu.py} > $R/gpu-tests.log 2>&1
echo "gpu tests exit $?"; tail -15 $R/gpu-tests.log
tar czf $OUT/precheck.tgz -C /tmp hizli-precheck
