# Sourced by the bench/gpu_*.sh scripts after they set $log (and $out, $res): records the machine
# and software at the top of the log, and gives run LIMIT CMD... (the command's output and exit
# status go to the log; it is stopped after LIMIT seconds), pack and bench.
# The device image writes no bytecode (PYTHONDONTWRITEBYTECODE; torch has no __pycache__), so every
# process compiled torch's sources again: 5-8 s of each start-up before round 9. Cached under /tmp
# from the first process on, as a pip install would have written it (docs/benchmarks.md, round 9).
export PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX:-/tmp/pycache} PYTHONDONTWRITEBYTECODE=
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc; df -h /tmp /dev/shm
  python3 -c "import torch, ramtorch; print('torch', torch.__version__, 'ramtorch', ramtorch.__version__)"; } >>"$log" 2>&1
run() {  # LIMIT CMD...
  local limit=$1; shift
  echo "== $*" >>"$log"
  timeout "$limit" "$@" >>"$log" 2>&1
  echo "rc=$?" >>"$log"
}
run_torchrun1() {  # torchrun with one rank through bench_multi.py (moments on disk where /dev/shm is small)
  local shm extra=()
  shm=$(df --output=avail -B1 /dev/shm | tail -1)
  [ "$shm" -lt 18000000000 ] && extra=(-- --set runtime.optimizer_on_disk=true)
  run 80 python3 bench/bench_multi.py --gpus 1 --skip-single --steps 6 --out "$res/multi" "${extra[@]}"
}
run_estimate() {  # estimate-memory's projection for rtx3050-6gb on this machine, as JSON
  timeout 25 python3 -m ramgpt estimate-memory --profile rtx3050-6gb --json >"$res/estimate-rtx3050.json" 2>>"$log"
  echo "estimate rc=$?" >>"$log"
}
pack() {  # $res into $out/res.tgz (the device tool brings back only a few files)
  tar -C "$(dirname "$res")" -czf "$out/res.tgz" "$(basename "$res")"
}
bench() {  # TAG [SETS [VAR=VALUE ...]]: `ramgpt train --profile rtx3050-6gb` 8 steps through bench_engine.py, then pack
  run 85 env SPP=16 STEPS=8 ${3:-} SETS="${2:-}" python3 bench/bench_engine.py streamed --out "$res" --tag="_$1"
  pack
}
