#!/usr/bin/env bash
# Round 4 (the GPU loads the fp32 masters and casts them; no host bf16 copies) in one call:
#   bash bench/gpu_round4.sh OUTDIR [dev|final]
# Both: the CUDA engine tests and the plain resident ceiling harness, then
# dev: `ramgpt train --profile rtx3050-6gb` 8 steps with the GPU's share of the update at 0.4
#   (shipped), 0 and 0.55, and with 12 CPU threads;
# final: the shipped settings 10 steps with a background save at step 6, the same with
#   runtime.host_bf16_copies, with a 4-chunk window, the resident engine, the desktop-16gb low-RAM profile, torchrun
#   with one rank; and estimate-memory's projection on this machine.
set -u
out=$1
mode=${2:-final}
res=$out/res
mkdir -p "$res"
log=$out/log-round4-$mode.txt
. "$(dirname "$0")/gpu_lib.sh"
run 120 python3 -m pytest -q -p no:cacheprovider tests/test_engine.py
run 40 python3 bench/perf.py ceiling --out "$res"
if [ "$mode" = dev ]; then
  run 120 env SPP=16 STEPS=8 python3 bench/bench_engine.py streamed --out "$res" --tag=_r4
  run 100 env SPP=16 STEPS=8 SETS="runtime.optimizer_gpu_share=0" python3 bench/bench_engine.py streamed --out "$res" --tag=_cpuopt
  run 100 env SPP=16 STEPS=8 SETS="runtime.optimizer_gpu_share=0.55" python3 bench/bench_engine.py streamed --out "$res" --tag=_gpu55
  run 100 env SPP=16 STEPS=8 SETS="runtime.threads=12" python3 bench/bench_engine.py streamed --out "$res" --tag=_t12
else
  # the shipped settings, with a background checkpoint at step 6; then the same with host bf16 copies
  run 130 env SPP=16 STEPS=10 SAVE=6 python3 bench/bench_engine.py streamed --out "$res" --tag=_r4
  run 100 env SPP=16 STEPS=8 SETS="runtime.host_bf16_copies=true" python3 bench/bench_engine.py streamed --out "$res" --tag=_copies
  run 100 env SPP=16 STEPS=8 SETS="runtime.stream_window=4" python3 bench/bench_engine.py streamed --out "$res" --tag=_w4
  run 80 python3 bench/bench_engine.py resident --out "$res"
  run 80 env PROFILE=desktop-16gb SPP=16 STEPS=5 python3 bench/bench_engine.py streamed --out "$res" --tag=_lowram
  run_torchrun1
fi
run_estimate
grep -h "^RESULT\|passed\|failed\|Error\|rc=" "$log" | cut -c1-1500
