#!/usr/bin/env bash
# Start-up profile on the GPU: hizli bench to its first step with a cold and then a warm Triton cache,
# each under benchmarks/startup_profile.py, plus `python -X importtime`. Results tarred into $OUT.
#   bash benchmarks/gpu_startup.sh [STEPS]
set -u
R=/tmp/hizli-startup; rm -rf $R; mkdir -p $R
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $R/gpu.txt; date -u | tee -a $R/gpu.txt
python3 -c "from hizli.bench.shapes import random_model_folder; print(random_model_folder('llama-3.2-3b'))"
ARGS="--model llama-3.2-3b --tokenizer .gpu-bundle/tok/tokenizer.json --data .gpu-bundle/data/sharegpt.jsonl --steps ${1:-3}"
export TRITON_CACHE_DIR=$R/triton-cache
for RUN in cold warm; do
  timeout 150 python3 benchmarks/startup_profile.py --json $R/$RUN.json -- $ARGS > $R/$RUN.log 2>&1
  echo "$RUN exit $?"; tail -1 $R/$RUN.log
done
python3 -X importtime -c "import hizli.api, torch, transformers, peft, bitsandbytes" 2> $R/importtime.txt
sort -t'|' -k2 -n -r $R/importtime.txt | head -25
rm -rf $R/triton-cache
tar czf $OUT/startup.tgz -C /tmp hizli-startup
