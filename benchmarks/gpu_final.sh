#!/usr/bin/env bash
# The final GPU session: GPU tests, then benchmarks/compare. Runs detached (setsid) so it can span
# several device calls; everything lands in /tmp/hizli-final (copied to $OUT by the last call).
set -u
D=/tmp/hizli-final; mkdir -p $D
export PYTHONUNBUFFERED=1
{
  date -u; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  timeout 300 python3 -m pytest -m gpu tests/train tests/reliability tests/models -q -p no:cacheprovider > $D/gpu-tests.log 2>&1
  echo "gpu tests exit $?"
  python3 benchmarks/compare --steps ${1:-25} --out $D > $D/compare.log 2>&1
  echo "compare exit $?"
  cp /tmp/hizli-compare/*.json /tmp/hizli-compare/*.log $D/ 2>/dev/null
  date -u
} > $D/progress.log 2>&1
touch $D/DONE
