#!/usr/bin/env bash
# The last short call of round 3: the desktop-16gb low-RAM profile (peak RSS, tokens/s), then
# torchrun with one rank after the /dev/shm page fix. bash bench/gpu_extra.sh OUTDIR
set -u
out=$1
res=$out/res
mkdir -p "$res"
log=$out/log-extra.txt
{ date -u; df -h /tmp /dev/shm; } >>"$log" 2>&1
timeout 85 env PROFILE=desktop-16gb SPP=16 STEPS=5 python3 bench/bench_engine.py streamed --out "$res" --tag=_lowram >>"$log" 2>&1
echo "rc=$?" >>"$log"
timeout 75 python3 bench/bench_multi.py --gpus 1 --skip-single --steps 5 --out "$res/multi" >>"$log" 2>&1
echo "rc=$?" >>"$log"
grep -h "^RESULT\|rc=\|Error" "$log" | cut -c1-900
