#!/usr/bin/env bash
# Round-3 probe on a GPU machine: where the streamed 1b step spends its time (bench/perf.py
# sections + the current engine's 6-step baseline). Usage: bash bench/gpu_probe.sh OUTDIR
set -u
out=$1
res=/tmp/probe-res
mkdir -p "$out" "$res"
log=$out/log-probe.txt
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc
  python3 -c "import torch, ramtorch; print('torch', torch.__version__, 'ramtorch', ramtorch.__version__)"; } >>"$log" 2>&1
run() {  # LIMIT ENV... -- SECTION ARGS
  local limit=$1; shift
  echo "== $*" >>"$log"
  timeout "$limit" env "$@" --out "$res" >>"$log" 2>&1
  echo "rc=$?" >>"$log"
}
run 90 PROFILE=1 python3 bench/perf.py ceiling
run 90 PROFILE=1 python3 bench/perf.py model
run 60 LOSS_CHUNK=8192 python3 bench/perf.py model --tag=_chunk8192
run 60 MB=16 python3 bench/perf.py ceiling --tag=_mb16
run 60 MB=16 python3 bench/perf.py model --tag=_mb16
run 100 python3 bench/perf.py optim
run 40 python3 bench/perf.py pin
run 120 python3 bench/perf.py trace
run 150 SPP=16 STEPS=6 python3 bench/bench_engine.py streamed --tag=_base
run 150 COMPILE=1 python3 bench/perf.py model --tag=_compile
cp "$res"/trace-pass.json.gz "$out"/ 2>/dev/null
rm -f "$res"/trace-pass.json.gz
tar -czf "$out/res-probe.tgz" -C "$res" .
grep -h "^RESULT\|^   " "$log"
