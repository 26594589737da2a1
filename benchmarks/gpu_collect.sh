#!/usr/bin/env bash
# Wait (up to $1 seconds) for benchmarks/gpu_final.sh, show its progress, tar its results into $OUT.
D=/tmp/hizli-final; end=$((SECONDS + ${1:-560}))
while [ ! -f $D/DONE ] && [ $SECONDS -lt $end ]; do sleep 10; done
cat $D/progress.log 2>/dev/null; tail -3 $D/gpu-tests.log 2>/dev/null; tail -14 $D/compare.log 2>/dev/null
tail -12 $D/seq*.log 2>/dev/null
tar czf $OUT/final.tgz -C /tmp hizli-final 2>/dev/null; ls $D
