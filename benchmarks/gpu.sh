#!/usr/bin/env bash
# The one GPU driver: runs the chosen benchmark suites on the device machine and tars everything they
# wrote (records, logs, full JSON) into $OUT/gpu-results.tgz.
#
# Here, once:   bash ../shared/gpu/make_bundle.sh --peers      (.gpu-bundle/: peers' packages, tokenizer, data)
# On the GPU machine, from the checkout root (the device tool's command):
#   HIZLI_BENCH_COMMIT=<short commit> SUITES="tests recipe compare" bash benchmarks/gpu.sh run
# A session longer than one device call (10 minutes): start it detached, then collect in later calls:
#   SUITES="compare longest" bash benchmarks/gpu.sh start
#   bash benchmarks/gpu.sh collect 560          (waits up to 560 s; again in the next call until DONE)
#
# Suites (SUITES, in this order; default "env tests recipe compare kernels"):
#   env       GPU, driver and package versions
#   tests     pytest -m gpu $GPU_TESTS (default: tests/kernels tests/models tests/train/test_train_gpu.py)
#   recipe    hizli bench recipe --model $SHAPE for each of $SHAPES
#   compare   hizli bench compare --shape $SHAPE for each of $SHAPES ($SYSTEMS: a subset, in order)
#   longest   hizli bench longest --caps $CAPS ($LONGEST_ARGS: more options, e.g. --search-budget 200)
#   kernels   hizli bench kernels
#   ranks     hizli bench recipe under torchrun --nproc-per-node $NPROC (default 1), for each SHAPE:MODE of
#             $RANK_RUNS (MODE: plain = no torchrun, ddp, fsdp; a shape under fsdp is built in place;
#             an optional :STEPS after the mode overrides STEPS for that run)
# STEPS (default 20) is every training suite's optimizer steps. Records land in
# /tmp/hizli-gpu/results/<suite>.jsonl; append the ones worth keeping to benchmarks/results/.
set -u
R=/tmp/hizli-gpu
MODE=${1:-run}
if [ "$MODE" = collect ]; then
  end=$((SECONDS + ${2:-560}))
  while [ ! -f $R/DONE ] && [ $SECONDS -lt $end ]; do sleep 10; done
  cat $R/progress.log 2>/dev/null
  [ -f $R/DONE ] && echo "DONE" || echo "still running"
  tar czf "${OUT:-/tmp}/gpu-results.tgz" -C /tmp hizli-gpu 2>/dev/null
  exit 0
fi
if [ "$MODE" = start ]; then
  setsid bash "$0" run > /dev/null 2>&1 < /dev/null &
  echo "started; collect with: bash benchmarks/gpu.sh collect"
  exit 0
fi
[ "$MODE" = run ] || { echo "usage: bash benchmarks/gpu.sh [run|start|collect [SECONDS]]"; exit 2; }

rm -rf $R; mkdir -p $R/results
export PYTHONPATH=$PWD/.gpu-bundle/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
SUITES=${SUITES:-env tests recipe compare kernels}
SHAPES=${SHAPES:-llama-3.2-3b}
STEPS=${STEPS:-20}
TOK=.gpu-bundle/tok/tokenizer.json
DATA=.gpu-bundle/data/sharegpt.jsonl
B="python3 -m hizli.cli bench"
{
  for S in $SUITES; do
    echo "== $S $(date -u +%H:%M:%S)"
    case $S in
      env)
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
        python3 -c "import sys, torch, transformers; print(sys.version.split()[0], 'torch', torch.__version__,
          'transformers', transformers.__version__)"
        python3 -c "import unsloth, trl; print('unsloth', unsloth.__version__, 'trl', trl.__version__)" 2>&1 | tail -1 ;;
      tests)
        timeout 420 python3 -m pytest -m gpu ${GPU_TESTS:-tests/kernels tests/models tests/train/test_train_gpu.py} \
          -q -p no:cacheprovider > $R/gpu-tests.log 2>&1
        echo "gpu tests exit $?"; tail -3 $R/gpu-tests.log ;;
      recipe)
        for SHAPE in $SHAPES; do
          timeout 400 $B recipe --model $SHAPE --tokenizer $TOK --data $DATA --steps $STEPS --results $R/results \
            --json $R/recipe-$SHAPE.json > $R/recipe-$SHAPE.log 2>&1
          echo "recipe $SHAPE exit $?"; tail -12 $R/recipe-$SHAPE.log
        done ;;
      compare)
        for SHAPE in $SHAPES; do
          $B compare --shape $SHAPE --steps $STEPS ${SYSTEMS:+--systems $SYSTEMS} --tokenizer $TOK --data $DATA \
            --work $R/compare-$SHAPE --results $R/results > $R/compare-$SHAPE.log 2>&1
          echo "compare $SHAPE exit $?"; grep -A30 "^at the same memory" $R/compare-$SHAPE.log
        done ;;
      longest)
        $B longest --caps ${CAPS:-8,whole} --tokenizer $TOK --data $DATA --work $R/longest --model $R/longest/llama-3.2-3b \
          ${LONGEST_ARGS:-} --results $R/results > $R/longest.log 2>&1
        echo "longest exit $?"; grep -A12 "^cap " $R/longest.log ;;
      ranks)
        for RUN in ${RANK_RUNS:-llama-3.2-3b:plain llama-3.2-3b:ddp llama-3.2-3b:fsdp}; do
          IFS=: read -r SHAPE MODE RUN_STEPS <<< "$RUN"; N=${NPROC:-1}
          L="python3 -m torch.distributed.run --standalone --nproc-per-node $N -m hizli.cli bench"; P="--parallel $MODE"
          [ "$MODE" = plain ] && { L="$B"; P=""; N=1; }
          timeout ${RANK_TIMEOUT:-540} $L recipe --model $SHAPE $P --tokenizer $TOK --data $DATA --steps ${RUN_STEPS:-$STEPS} \
            --results $R/results --json $R/ranks-$SHAPE-$MODE-$N.json > $R/ranks-$SHAPE-$MODE-$N.log 2>&1
          echo "ranks $SHAPE $MODE x$N exit $?"
          grep -E "^(tokens_per_s|peak_reserved|first_step_s|mfu|ranks)" $R/ranks-$SHAPE-$MODE-$N.log
        done ;;
      kernels)
        timeout 300 $B kernels --results $R/results > $R/kernels.log 2>&1
        echo "kernels exit $?"; tail -25 $R/kernels.log ;;
      *) echo "unknown suite $S (env tests recipe compare longest kernels ranks)" ;;
    esac
  done
  echo "== end $(date -u +%H:%M:%S)"
} 2>&1 | tee $R/progress.log
touch $R/DONE
tar czf "${OUT:-/tmp}/gpu-results.tgz" -C /tmp hizli-gpu
