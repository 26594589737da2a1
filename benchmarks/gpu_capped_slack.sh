#!/usr/bin/env bash
# Capped runs (max_memory_gib=3.094) at the plan's usual allocator allowance (64 MiB) and at 200 MiB,
# with the allocator's flush-and-retry counts. Results tarred into $OUT.
set -u
R=/tmp/hizli-capped-slack; rm -rf $R; mkdir -p $R
export PYTHONUNBUFFERED=1
M=$(python3 benchmarks/recipe_model.py)
ARGS="--model $M --tokenizer .gpu-bundle/tok/tokenizer.json --data .gpu-bundle/data/sharegpt.jsonl --steps 14 --max-memory-gib 3.094"
for S in 64 200; do
  python3 benchmarks/capped_slack.py $S $R/slack$S.json $ARGS > $R/slack$S.log 2>&1
  grep "SLACK\|memory plan" $R/slack$S.log
  python3 -c "import json;d=json.load(open('$R/slack$S.json'));print(d['tokens_per_s'],d['peak_reserved_gib'])"
done
tar czf $OUT/capped-slack.tgz -C /tmp hizli-capped-slack
