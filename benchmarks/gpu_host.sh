#!/usr/bin/env bash
# Where the host time of a capped step goes: per-call host times (benchmarks/host_overhead.py), a
# native py-spy profile of one layer's fused projections at the capped micro-batch size, and the
# capped recipe run (max_memory_gib=3.094) with kept LoRA copies on and off. Results tarred into $OUT.
set -u
R=/tmp/hizli-host; rm -rf $R; mkdir -p $R
export PYTHONUNBUFFERED=1
timeout 120 python3 benchmarks/host_overhead.py --json $R/host.json > $R/host.log 2>&1; echo "host exit $?"
if [ -x .gpu-bundle/bin/py-spy ]; then
  timeout 90 .gpu-bundle/bin/py-spy record --native -r 500 -f raw -o $R/layer-native.raw -- \
    python3 benchmarks/fused_lora_bench.py --tokens 4389 --reps 60 > $R/layer-native.log 2>&1; echo "py-spy exit $?"
fi
M=$(python3 benchmarks/recipe_model.py)
ARGS="--model $M --tokenizer .gpu-bundle/tok/tokenizer.json --data .gpu-bundle/data/sharegpt.jsonl --steps 20 --max-memory-gib ${CAP:-3.094}"
for L in ${LEVERS:-on off}; do
  python3 -m hizli.cli bench $ARGS --lever cast_cache=$L --json $R/cast-$L.json > $R/cast-$L.log 2>&1
  python3 -c "import json;d=json.load(open('$R/cast-$L.json'));print('cast_cache=$L', d['tokens_per_s'], 'tokens/s, peak', d['peak_reserved_gib'], 'GiB, plan', d['memory_plan']['tokens_per_micro_batch'])"
done
tar czf $OUT/host.tgz -C /tmp hizli-host
