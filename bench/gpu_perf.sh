#!/usr/bin/env bash
# Performance round 3 (docs/benchmarks.md), one call on a GPU machine: the CUDA engine tests, the
# plain resident harness (the ceiling), ramgpt's resident engine, and `ramgpt train --profile
# rtx3050-6gb` for 8 steps, then a profiler trace of one streamed step.
#   bash bench/gpu_perf.sh OUTDIR
set -u
out=$1
res=$out/res
mkdir -p "$res"
log=$out/log-perf.txt
. "$(dirname "$0")/gpu_lib.sh"
run 120 python3 -m pytest -q -p no:cacheprovider tests/test_engine.py
run 90 python3 bench/perf.py ceiling --out "$res"
run 150 env SPP=16 STEPS=8 python3 bench/bench_engine.py streamed --out "$res" --tag=_round3
run 150 python3 bench/bench_engine.py resident --out "$res" --tag=_round3
run 150 python3 bench/perf.py trace --out "$res"
grep -h "^RESULT\|passed\|failed\|Error" "$log" | cut -c1-1500
