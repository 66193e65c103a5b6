#!/usr/bin/env bash
# Round 6 (compiled blocks) in one call:  bash bench/gpu_round6.sh OUTDIR [dev|ab|final]
# All: the CUDA engine tests and the plain resident ceiling harness, then
# dev: `ramgpt train --profile rtx3050-6gb` 8 steps with runtime.compile_blocks=true (an empty
#   compile cache: the first run's start-up), with it false, with it false and a 0.5 ms GIL switch
#   interval, and with it true again (the cache warm);
# ab: compile_blocks false and true, twice each, alternating; then true with stream_window 4, and a
#   4-pass traced step (compiled);
# final: the shipped settings (compile_blocks auto) three times (the first with an empty compile
#   cache) alternating with compile_blocks=false twice; and estimate-memory's projection;
# last (no ceiling): train()'s compile tests, then shipped, compile_blocks=false, shipped.
set -u
out=$1
mode=${2:-dev}
res=$out/res
mkdir -p "$res"
log=$out/log-round6-$mode.txt
. "$(dirname "$0")/gpu_lib.sh"
run 150 python3 -m pytest -q -p no:cacheprovider tests/test_engine.py
if [ "$mode" = last ]; then  # the session's last device minutes: train()'s compile path on CUDA, then A/B
  run 100 python3 -m pytest -q -p no:cacheprovider tests/test_train.py -k compile
  run 100 env SPP=16 STEPS=8 python3 bench/bench_engine.py streamed --out "$res" --tag=_shipped1
  run 70 env SPP=16 STEPS=8 SETS="runtime.compile_blocks=false" python3 bench/bench_engine.py streamed --out "$res" --tag=_eager1
  run 70 env SPP=16 STEPS=8 python3 bench/bench_engine.py streamed --out "$res" --tag=_shipped2
else
  run 40 python3 bench/perf.py ceiling --out "$res"
fi
if [ "$mode" = dev ]; then
  run 140 env SPP=16 STEPS=8 SETS="runtime.compile_blocks=true" python3 bench/bench_engine.py streamed --out "$res" --tag=_compile
  run 85 env SPP=16 STEPS=8 SETS="runtime.compile_blocks=false" python3 bench/bench_engine.py streamed --out "$res" --tag=_eager
  run 85 env SPP=16 STEPS=8 SWITCH=0.0005 SETS="runtime.compile_blocks=false" python3 bench/bench_engine.py streamed --out "$res" --tag=_switch
  run 85 env SPP=16 STEPS=8 SETS="runtime.compile_blocks=true" python3 bench/bench_engine.py streamed --out "$res" --tag=_compile2
elif [ "$mode" = ab ]; then  # compiled and eager blocks twice each, alternating; then a window of 4
  for i in 1 2; do
    run 85 env SPP=16 STEPS=8 SETS="runtime.compile_blocks=false" python3 bench/bench_engine.py streamed --out "$res" --tag=_eager$i
    run 120 env SPP=16 STEPS=8 SETS="runtime.compile_blocks=true" python3 bench/bench_engine.py streamed --out "$res" --tag=_compile$i
  done
  run 85 env SPP=16 STEPS=8 SETS="runtime.compile_blocks=true runtime.stream_window=4" python3 bench/bench_engine.py streamed --out "$res" --tag=_compile_w4
  run 120 env PASSES=4 python3 bench/perf.py trace --out "$res"  # compile_blocks auto: on here
  rm -f "$res"/trace-step.json.gz
elif [ "$mode" = final ]; then  # the shipped settings (compile_blocks auto: on) against eager, alternating
  run 120 env SPP=16 STEPS=8 python3 bench/bench_engine.py streamed --out "$res" --tag=_shipped1  # cold compile cache
  run 85 env SPP=16 STEPS=8 SETS="runtime.compile_blocks=false" python3 bench/bench_engine.py streamed --out "$res" --tag=_eager1
  run 85 env SPP=16 STEPS=8 python3 bench/bench_engine.py streamed --out "$res" --tag=_shipped2
  run 85 env SPP=16 STEPS=8 SETS="runtime.compile_blocks=false" python3 bench/bench_engine.py streamed --out "$res" --tag=_eager2
  run 85 env SPP=16 STEPS=8 python3 bench/bench_engine.py streamed --out "$res" --tag=_shipped3
  run_estimate
fi
grep -h "^RESULT\|passed\|failed\|Error\|rc=" "$log" | cut -c1-1500
