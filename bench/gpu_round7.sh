#!/usr/bin/env bash
# Round 7 (split masters) in one call:  bash bench/gpu_round7.sh OUTDIR [ab|final]
# Both: the CUDA engine tests (the split-master ones included) and train()'s compile tests; then
# ab: the plain resident ceiling harness, then `ramgpt train --profile rtx3050-6gb` 8 steps with
#   every chunk split (the first version's auto, which ran with no setting; true now) and runtime.split_masters=false (the fp32
#   masters cast on the GPU), alternating twice, then split with optimizer_gpu_share 0.6;
# ab2: auto (the chunks the GPU updates split) at share 0.4 twice and 0.7, at 0.7 with the GPU's
#   update not ordered behind the compute stream (GPU_UPDATE_ORDERED=0), true with 4M-element CPU
#   pieces, against false twice;
# final: the ceiling, the shipped settings twice around a 0.6 share, estimate-memory's projection.
set -u
out=$1
mode=${2:-ab}
res=/tmp/round7-res  # packed into $out/res.tgz after every run (the device tool brings back 8 files)
mkdir -p "$res"
log=$out/log-round7-$mode.txt
. "$(dirname "$0")/gpu_lib.sh"
run 120 python3 -m pytest -q -p no:cacheprovider tests/test_engine.py
[ "$mode" = ab2 ] || run 90 python3 -m pytest -q -p no:cacheprovider tests/test_train.py -k compile
run 45 python3 bench/perf.py ceiling --out "$res"
if [ "$mode" = ab ]; then  # the first call: every chunk split (split_masters: true then) against none
  for i in 1 2; do
    bench split$i "runtime.split_masters=true"
    bench whole$i "runtime.split_masters=false"
  done
  bench split_g6 "runtime.split_masters=true runtime.optimizer_gpu_share=0.6"
elif [ "$mode" = ab2 ]; then  # auto (the chunks the GPU updates split) at shares 0.4 and 0.7 against false;
  # then the GPU's update not ordered behind the compute stream, true with 4M-element CPU pieces
  bench whole1 "runtime.split_masters=false"
  bench gpu4
  bench gpu7 "runtime.optimizer_gpu_share=0.7"
  bench whole2 "runtime.split_masters=false"
  bench gpu4b
  run_estimate
  bench gpu7u "runtime.optimizer_gpu_share=0.7" GPU_UPDATE_ORDERED=0
  bench all4m "runtime.split_masters=true" SPLIT_PIECE=4194304
else
  bench shipped1
  bench shipped_g6 "runtime.optimizer_gpu_share=0.6"
  bench shipped2
  run_estimate
fi
pack
grep -h "^RESULT\|passed\|failed\|Error\|rc=" "$log" | cut -c1-1500
