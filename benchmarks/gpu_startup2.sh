#!/usr/bin/env bash
# Start-up profile II: py-spy (all threads, GIL or not) of hizli bench to its first step, cold and
# warm Triton cache; and whether CUDA init overlaps imports in a thread. Results tarred into $OUT.
set -u
[ -x .gpu-bundle/bin/py-spy ] || { echo "needs .gpu-bundle/bin/py-spy: pip install py-spy here, then" \
  "mkdir -p .gpu-bundle/bin && cp \"\$(command -v py-spy)\" .gpu-bundle/bin/"; exit 2; }
R=/tmp/hizli-startup2; rm -rf $R; mkdir -p $R
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee $R/gpu.txt
M=$(python3 benchmarks/recipe_model.py)
for i in 1 2; do for m in seq thread; do python3 benchmarks/import_cuda_overlap.py $m; done; done 2>&1 | grep -v Warn | tee $R/overlap.txt
ARGS="--model $M --tokenizer .gpu-bundle/tok/tokenizer.json --data .gpu-bundle/data/sharegpt.jsonl --steps 2"
export TRITON_CACHE_DIR=$R/triton-cache
for RUN in cold warm; do
  timeout 150 .gpu-bundle/bin/py-spy record -r 50 -f raw --threads --idle -o $R/$RUN.raw -- python3 -m hizli.cli bench $ARGS --json $R/$RUN.json > $R/$RUN.log 2>&1
  echo "$RUN exit $?"; [ -f $R/$RUN.json ] || { tail -5 $R/$RUN.log; python3 -m hizli.cli bench $ARGS --json $R/$RUN.json > $R/$RUN.log 2>&1; }
  python3 -c "import json;d=json.load(open('$R/$RUN.json'));print(d['first_step_s'],d['startup_s'])"
done
rm -rf $R/triton-cache
tar czf $OUT/startup2.tgz -C /tmp hizli-startup2
