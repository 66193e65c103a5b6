#!/usr/bin/env bash
# Round 3's measurements in one call on a GPU machine (docs/benchmarks.md):
#   bash bench/gpu_final.sh OUTDIR
# CUDA engine tests; `ramgpt train --profile rtx3050-6gb` 8 steps with a background save at step 4;
# the plain resident ceiling harness; the desktop-16gb low-RAM profile; torchrun with one rank on
# NCCL; estimate-memory's projection on this machine.
set -u
out=$1
res=$out/res
mkdir -p "$res"
log=$out/log-final.txt
. "$(dirname "$0")/gpu_lib.sh"
run 45 python3 -m pytest -q -p no:cacheprovider -x tests/test_engine.py
run 110 env SPP=16 STEPS=8 SAVE=4 python3 bench/bench_engine.py streamed --out "$res" --tag=_final
run 35 python3 bench/perf.py ceiling --out "$res"
# the node-shared state needs ~17 GB of /dev/shm for the 1b; else keep the AdamW state on disk
run_torchrun1
run 80 env PROFILE=desktop-16gb SPP=16 STEPS=5 python3 bench/bench_engine.py streamed --out "$res" --tag=_lowram
run_estimate
grep -h "^RESULT\|passed\|failed\|Error\|rc=" "$log" | cut -c1-900
