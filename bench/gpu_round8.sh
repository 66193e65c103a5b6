#!/usr/bin/env bash
# Round 8 (the optimizer's update window, start-up) in one call:  bash bench/gpu_round8.sh OUTDIR MODE
# MODE ab|ab2|ab3|ab4|final. Each: the CUDA engine tests (first; final runs them last, ab4 not at
# all), the plain resident ceiling harness, then `ramgpt train --profile
# rtx3050-6gb` for 8 steps (compiled blocks; every result holds the last two updates' per-chunk
# timelines and the set-up's phases) and estimate-memory's projection;
# ab: the shipped settings, the GPU's update queued a chunk ahead (GPU_UPDATE_LOOKAHEAD=1) at the
#   shipped 0.7 share and at 0.6 and 0.8, the shipped settings again;
# ab2 (LOOKAHEAD the default, rtx3050-6gb at 0.6): the shipped settings, shares 0.5 and 0.55, the
#   shipped settings again;
# ab3 (the compile's imports back before its thread, larger start-up split pieces): the shipped
#   settings, two chunks queued ahead (GPU_UPDATE_LOOKAHEAD=2) at 0.6 and 0.55, at 0.6 with a 1 ms
#   GIL switch interval (SWITCH), the shipped settings again;
# ab4 (no tests; the tree of ab3): the shipped settings, the GPU's update not ordered behind the
#   compute stream (GPU_UPDATE_ORDERED=0), in 8M-element pieces (GPU_UPDATE_PIECE), share 0.65;
# final (no tests first): the shipped settings twice, estimate-memory, then the CUDA engine tests.
set -u
out=$1
mode=${2:-ab}
res=/tmp/round8-res  # packed into $out/res.tgz after every run (the device tool brings back 8 files)
mkdir -p "$res"
log=$out/log-round8-$mode.txt
. "$(dirname "$0")/gpu_lib.sh"
case $mode in ab4|final) ;; *) run 150 python3 -m pytest -q -p no:cacheprovider tests/test_engine.py ;; esac
run 45 python3 bench/perf.py ceiling --out "$res"
if [ "$mode" = ab ]; then
  bench shipped1
  bench look7 "" GPU_UPDATE_LOOKAHEAD=1
  run_estimate
  bench look6 "runtime.optimizer_gpu_share=0.6" GPU_UPDATE_LOOKAHEAD=1
  bench look8 "runtime.optimizer_gpu_share=0.8" GPU_UPDATE_LOOKAHEAD=1
  bench shipped2
elif [ "$mode" = ab2 ]; then
  bench shipped1
  run_estimate
  bench g5 "runtime.optimizer_gpu_share=0.5"
  bench g55 "runtime.optimizer_gpu_share=0.55"
  bench shipped2
elif [ "$mode" = ab3 ]; then
  bench shipped1
  run_estimate
  bench ahead2 "" GPU_UPDATE_LOOKAHEAD=2
  bench ahead2_g55 "runtime.optimizer_gpu_share=0.55" GPU_UPDATE_LOOKAHEAD=2
  bench ahead2_sw1 "" "GPU_UPDATE_LOOKAHEAD=2 SWITCH=0.001"
  bench shipped2
elif [ "$mode" = ab4 ]; then
  bench shipped1
  bench unordered "" GPU_UPDATE_ORDERED=0
  bench piece8m "" GPU_UPDATE_PIECE=8388608
  bench g65 "runtime.optimizer_gpu_share=0.65"
else  # final: the shipped settings twice (the first with an empty compile cache), then the CUDA tests
  bench shipped1
  bench shipped2
  run_estimate
  run 100 python3 -m pytest -q -p no:cacheprovider tests/test_engine.py
fi
pack
grep -h "^RESULT\|passed\|failed\|Error\|rc=" "$log" | cut -c1-1500
