#!/usr/bin/env bash
# A/B of the kept LoRA copies (hizli.models.lora_casts) where the step is host-bound: the capped
# recipe run (max_memory_gib=3.094), cast_cache on and off, alternating, two runs each, 20 steps.
# Results tarred into $OUT.
set -u
R=/tmp/hizli-cast-cache; rm -rf $R; mkdir -p $R
export PYTHONUNBUFFERED=1
M=$(python3 benchmarks/recipe_model.py)
ARGS="--model $M --tokenizer .gpu-bundle/tok/tokenizer.json --data .gpu-bundle/data/sharegpt.jsonl --steps 20 --max-memory-gib ${CAP:-3.094}"
for i in 1 2; do for L in on off; do
  python3 -m hizli.cli bench $ARGS --lever cast_cache=$L --json $R/$L-$i.json > $R/$L-$i.log 2>&1
  python3 -c "import json;d=json.load(open('$R/$L-$i.json'));print('cast_cache=$L run $i', d['tokens_per_s'], 'tokens/s, peak', d['peak_reserved_gib'], 'GiB, plan', round(d['predicted_peak_gib'], 3), d['memory_plan']['tokens_per_micro_batch'])"
done; done
tar czf $OUT/cast-cache.tgz -C /tmp hizli-cast-cache
