#!/usr/bin/env bash
# The final GPU session: GPU tests of what changed, benchmarks/compare (cold compile caches for every
# system), then the longest-sequence search. Runs detached (setsid) so it can span several device
# calls; everything lands in /tmp/hizli-final, which benchmarks/gpu_collect.sh tars into $OUT.
#   SYSTEMS=... SEQ_CAPS=whole GPU_TESTS="..." setsid bash benchmarks/gpu_final.sh STEPS > /dev/null 2>&1 < /dev/null &
set -u
D=/tmp/hizli-final; rm -rf $D; mkdir -p $D
export PYTHONUNBUFFERED=1
SYSTEMS=${SYSTEMS:-unsloth_best,unsloth,hizli,hizli_capped,hizli_capped_unsloth,hf,liger}
{
  date -u; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  # the interpreter and its bytecode setting: the device image sets PYTHONDONTWRITEBYTECODE=1, so every
  # process compiles its imports again (2026-11-28); start-up figures depend on it
  python3 -c "import sys, os, torch; print(sys.version.split()[0], 'dont_write_bytecode', sys.flags.dont_write_bytecode,
    'PYTHONDONTWRITEBYTECODE', os.environ.get('PYTHONDONTWRITEBYTECODE'), 'torch at', torch.__file__,
    'writable', os.access(os.path.dirname(torch.__file__), os.W_OK))"
  timeout 420 python3 -m pytest -m gpu ${GPU_TESTS:-tests/train/test_train_gpu.py tests/reliability tests/models \
    tests/kernels} -q -p no:cacheprovider > $D/gpu-tests.log 2>&1
  echo "gpu tests exit $?"; date -u
  python3 benchmarks/compare --steps ${1:-20} --systems $SYSTEMS --out $D > $D/compare.log 2>&1
  echo "compare exit $?"; date -u
  cp /tmp/hizli-compare/*.json /tmp/hizli-compare/*.log $D/ 2>/dev/null
  for CAP in ${SEQ_CAPS:-8 whole}; do
    if [ $CAP = whole ]; then EXTRA="--start 131072 --resolution 4096 --search-budget ${SEQ_BUDGET:-200}"; else EXTRA=""; fi
    python3 benchmarks/longest_seq.py --systems hizli,unsloth --caps $CAP $EXTRA --work $D/seq --out $D/seq-$CAP > $D/seq$CAP.log 2>&1
    echo "longest $CAP exit $?"; date -u
  done
} > $D/progress.log 2>&1
touch $D/DONE
