#!/usr/bin/env bash
# Round 5 (chunk loads into fixed device slots, casts on a stream of their own) in one call:
#   bash bench/gpu_round5.sh OUTDIR [dev|final] [BASE]
# Both: the CUDA engine tests and the plain resident ceiling harness, then
# dev: `ramgpt train --profile rtx3050-6gb` 8 steps from the tree BASE (the engine before this
#   round, e.g. a `git archive` of it), from this tree, this tree with a fresh allocation per load
#   (LOAD_SLOTS=0), this tree with runtime.host_bf16_copies; and a profiler trace of one step;
# dev2: BASE and this tree as in dev, this tree with the GPU updating 60% of the parameters, a
#   4-pass traced step, the resident engine and the desktop-16gb low-RAM profile;
# last: this tree 8 steps, torchrun with one rank, the ceiling, host bf16 copies (in that order);
# ab: BASE and this tree, 8 steps each, twice, alternating;
# final5: BASE 8 steps, this tree 10 steps with a background save at step 6, with host bf16
#   copies, a 4-pass traced step and estimate-memory's projection;
# final: the shipped settings 10 steps with a background save at step 6, the same with
#   runtime.host_bf16_copies, the resident engine, the desktop-16gb low-RAM profile, torchrun
#   with one rank; and estimate-memory's projection on this machine.
set -u
out=$1
mode=${2:-final}
base=${3:-}
res=$out/res
mkdir -p "$res"
log=$out/log-round5-$mode.txt
. "$(dirname "$0")/gpu_lib.sh"
run 120 python3 -m pytest -q -p no:cacheprovider tests/test_engine.py
[ "$mode" = last ] || run 40 python3 bench/perf.py ceiling --out "$res"
if [ "$mode" = dev2 ]; then
  [ -n "$base" ] && run 110 env SPP=16 STEPS=8 python3 "$base/bench/bench_engine.py" streamed --out "$res" --tag=_base
  run 110 env SPP=16 STEPS=8 python3 bench/bench_engine.py streamed --out "$res" --tag=_r5
  run 110 env SPP=16 STEPS=8 SETS="runtime.optimizer_gpu_share=0.6" python3 bench/bench_engine.py streamed --out "$res" --tag=_gpu60
  run 150 env PASSES=4 python3 bench/perf.py trace --out "$res"
  rm -f "$res"/trace-step.json.gz
  run 80 python3 bench/bench_engine.py resident --out "$res"
  run 80 env PROFILE=desktop-16gb SPP=16 STEPS=5 python3 bench/bench_engine.py streamed --out "$res" --tag=_lowram
elif [ "$mode" = dev ]; then
  [ -n "$base" ] && run 110 env SPP=16 STEPS=8 python3 "$base/bench/bench_engine.py" streamed --out "$res" --tag=_base
  run 110 env SPP=16 STEPS=8 python3 bench/bench_engine.py streamed --out "$res" --tag=_r5
  run 110 env LOAD_SLOTS=0 SPP=16 STEPS=8 python3 bench/bench_engine.py streamed --out "$res" --tag=_noslots
  run 110 env SPP=16 STEPS=8 SETS="runtime.host_bf16_copies=true" python3 bench/bench_engine.py streamed --out "$res" --tag=_copies
  run 150 python3 bench/perf.py trace --out "$res"
  rm -f "$res"/trace-step.json.gz
elif [ "$mode" = last ]; then  # what fits in the session's last device minutes
  run 100 env SPP=16 STEPS=8 python3 bench/bench_engine.py streamed --out "$res" --tag=_r5
  run_torchrun1
  run 40 python3 bench/perf.py ceiling --out "$res"
  run 100 env SPP=16 STEPS=8 SETS="runtime.host_bf16_copies=true" python3 bench/bench_engine.py streamed --out "$res" --tag=_copies
elif [ "$mode" = ab ]; then  # BASE and this tree twice each, alternating, 8 steps
  for i in 1 2; do
    run 110 env SPP=16 STEPS=8 python3 "$base/bench/bench_engine.py" streamed --out "$res" --tag=_base$i
    run 110 env SPP=16 STEPS=8 python3 bench/bench_engine.py streamed --out "$res" --tag=_r5_$i
  done
elif [ "$mode" = final5 ]; then
  [ -n "$base" ] && run 110 env SPP=16 STEPS=8 python3 "$base/bench/bench_engine.py" streamed --out "$res" --tag=_base
  run 130 env SPP=16 STEPS=10 SAVE=6 python3 bench/bench_engine.py streamed --out "$res" --tag=_r5
  run 100 env SPP=16 STEPS=8 SETS="runtime.host_bf16_copies=true" python3 bench/bench_engine.py streamed --out "$res" --tag=_copies
  run 150 env PASSES=4 python3 bench/perf.py trace --out "$res"
  rm -f "$res"/trace-step.json.gz
  run_estimate
else
  run 130 env SPP=16 STEPS=10 SAVE=6 python3 bench/bench_engine.py streamed --out "$res" --tag=_r5
  run 100 env SPP=16 STEPS=8 SETS="runtime.host_bf16_copies=true" python3 bench/bench_engine.py streamed --out "$res" --tag=_copies
  run 80 python3 bench/bench_engine.py resident --out "$res"
  run 80 env PROFILE=desktop-16gb SPP=16 STEPS=5 python3 bench/bench_engine.py streamed --out "$res" --tag=_lowram
  run_torchrun1
  run_estimate
fi
grep -h "^RESULT\|passed\|failed\|Error\|rc=" "$log" | cut -c1-1500
