#!/usr/bin/env bash
# One GPU session's worth of checks: environment, hizli bench on the recipe shape, the kernel
# benchmark and the GPU tests. Results land in $OUT (the device tool brings them back).
#   export PYTHONPATH=$PWD/.gpu-bundle/site:$PWD/src HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
#   bash benchmarks/gpu_smoke.sh [STEPS]
set -u
OUT=${OUT:-/tmp/hizli-out}; mkdir -p "$OUT"
STEPS=${1:-20}
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, peft, triton, inspect; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'triton', triton.__version__)
from torch.nn.attention import varlen; print('varlen_attn', inspect.signature(varlen.varlen_attn))"
  python3 -c "import bitsandbytes, trl, datasets; print('bnb', bitsandbytes.__version__, 'trl', trl.__version__, 'datasets', datasets.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
timeout 300 python3 -m hizli.cli bench --model llama-3.2-3b --tokenizer .gpu-bundle/tok/tokenizer.json \
  --data .gpu-bundle/data/sharegpt.jsonl --steps "$STEPS" --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1
echo "bench exit $?"; tail -25 "$OUT/bench.log"
timeout 120 python3 benchmarks/kernels_bench.py --out "$OUT/kernels-bench.json" > "$OUT/kernels-bench.log" 2>&1
echo "kernels bench exit $?"; tail -30 "$OUT/kernels-bench.log"
timeout 200 python3 -m pytest -m gpu tests/kernels tests/models -q -p no:cacheprovider -x > "$OUT/gpu-tests.log" 2>&1
echo "gpu tests exit $?"; tail -15 "$OUT/gpu-tests.log"
