#!/usr/bin/env bash
# Host-side profile of a capped run (max_memory_gib=3.094, the plan's 4 micro-batches with every layer
# offloaded), whose GPU is busy only about a third of each step: py-spy samples the main thread,
# idle time included, over a 14-step hizli bench. Results tarred into $OUT.
set -u
[ -x .gpu-bundle/bin/py-spy ] || { echo "needs .gpu-bundle/bin/py-spy: pip install py-spy here, then" \
  "mkdir -p .gpu-bundle/bin && cp \"\$(command -v py-spy)\" .gpu-bundle/bin/"; exit 2; }
R=/tmp/hizli-capped-prof; rm -rf $R; mkdir -p $R
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee $R/gpu.txt
M=$(python3 benchmarks/recipe_model.py)
ARGS="--model $M --tokenizer .gpu-bundle/tok/tokenizer.json --data .gpu-bundle/data/sharegpt.jsonl --steps 14 --max-memory-gib 3.094"
timeout 200 .gpu-bundle/bin/py-spy record -r 200 -f raw --idle -o $R/capped.raw -- python3 -m hizli.cli bench $ARGS --json $R/capped.json > $R/capped.log 2>&1
echo "py-spy exit $?"
python3 -c "import json;d=json.load(open('$R/capped.json'));print(d['tokens_per_s'],d['startup_s'])"
tar czf $OUT/capped-prof.tgz -C /tmp hizli-capped-prof
