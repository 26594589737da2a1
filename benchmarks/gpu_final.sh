#!/usr/bin/env bash
# The final GPU session: GPU tests, benchmarks/compare, then the longest-sequence search (8 GiB and
# the whole card). Runs detached (setsid) so it can span several device calls; everything lands in
# /tmp/hizli-final, which benchmarks/gpu_collect.sh tars into $OUT.
#   setsid bash benchmarks/gpu_final.sh STEPS > /dev/null 2>&1 < /dev/null &
set -u
D=/tmp/hizli-final; rm -rf $D; mkdir -p $D
export PYTHONUNBUFFERED=1
{
  date -u; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  timeout 420 python3 -m pytest -m gpu tests/train/test_train_gpu.py tests/reliability tests/models \
    tests/kernels/test_kernels_nf4.py tests/kernels/test_kernels_swiglu.py -q -p no:cacheprovider > $D/gpu-tests.log 2>&1
  echo "gpu tests exit $?"; date -u
  python3 benchmarks/compare --steps ${1:-20} --out $D > $D/compare.log 2>&1
  echo "compare exit $?"; date -u
  cp /tmp/hizli-compare/*.json /tmp/hizli-compare/*.log $D/ 2>/dev/null
  python3 benchmarks/longest_seq.py --systems hizli,unsloth --caps 8 --work $D/seq --out $D > $D/seq8.log 2>&1
  echo "longest 8 GiB exit $?"; date -u
  python3 benchmarks/longest_seq.py --systems hizli,unsloth --caps whole --start 131072 --resolution 4096 \
    --search-budget 200 --work $D/seq --out $D > $D/seqwhole.log 2>&1
  echo "longest whole exit $?"; date -u
} > $D/progress.log 2>&1
touch $D/DONE
