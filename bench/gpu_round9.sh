#!/usr/bin/env bash
# Round 9 (the update's share and threads, where start-up goes) in one call:  bash bench/gpu_round9.sh OUTDIR MODE
# MODE a|b|c|d. a: the start-up probe twice (bench/startup_probe.py; the second with -X importtime,
#   its 30 slowest imports kept), the CUDA engine tests on this tree, the plain resident ceiling,
#   then `ramgpt train --profile rtx3050-6gb` 8 steps: the shipped settings, share 0.5 with 8 and
#   with 12 CPU threads (runtime.threads), share 0.45, the shipped settings again, the GPU's update
#   not ordered behind the compute stream (GPU_UPDATE_ORDERED=0); estimate-memory's projection.
# d (at 2cf4c72, whose runtime.optimizer_cpu_takes was reverted after it): the CUDA engine tests,
#   the ceiling, the shipped settings, the CPU taking the last 3, 2 and 4
#   of the GPU's chunks (runtime.optimizer_cpu_takes), the shipped settings again.
# c (bytecode cached as in b; this call ran on b's machine, its caches warm): the ceiling, the shipped settings, 8 CPU threads at shares 0.6,
#   0.55 and 0.5, the shipped settings again.
# b: whether the image caches bytecode, then with it cached under /tmp (PYTHONPYCACHEPREFIX, as a
#   pip install writes it): the start-up probe twice, the ceiling, the shipped settings twice,
#   share 0.5 with 8 threads, the shipped settings again, estimate-memory.
set -u
out=$1
mode=${2:-a}
res=/tmp/round9-res  # packed into $out/res.tgz after every run (the device tool brings back 8 files)
mkdir -p "$res"
log=$out/log-round9-$mode.txt
. "$(dirname "$0")/gpu_lib.sh"
if [ "$mode" = a ]; then
  # as this call ran (before gpu_lib.sh cached the bytecode): the image's own setting, none written
  unset PYTHONPYCACHEPREFIX
  export PYTHONDONTWRITEBYTECODE=1
  run 30 python3 bench/startup_probe.py "$res/startup1.json"
  echo "== importtime" >>"$log"
  timeout 30 python3 -X importtime bench/startup_probe.py "$res/startup2.json" 2>"$res/importtime.txt" >>"$log"
  sort -t'|' -k2 -n -r "$res/importtime.txt" | head -30 >>"$log"
  run 150 python3 -m pytest -q -p no:cacheprovider tests/test_engine.py
  run 45 python3 bench/perf.py ceiling --out "$res"
  bench shipped1
  bench g5_t8 "runtime.optimizer_gpu_share=0.5 runtime.threads=8"
  bench g45 "runtime.optimizer_gpu_share=0.45"
  bench g5_t12 "runtime.optimizer_gpu_share=0.5 runtime.threads=12"
  bench shipped2
  run_estimate
  bench unordered "" GPU_UPDATE_ORDERED=0
elif [ "$mode" = d ]; then
  run 120 python3 -m pytest -q -p no:cacheprovider tests/test_engine.py
  run 45 python3 bench/perf.py ceiling --out "$res"
  bench shipped1
  bench takes3 "runtime.optimizer_cpu_takes=3"
  bench takes2 "runtime.optimizer_cpu_takes=2"
  bench takes4 "runtime.optimizer_cpu_takes=4"
  bench shipped2
elif [ "$mode" = c ]; then
  run 60 python3 bench/startup_probe.py "$res/startup.json"
  run 45 python3 bench/perf.py ceiling --out "$res"
  bench shipped1
  bench g6_t8 "runtime.threads=8"
  bench g55_t8 "runtime.optimizer_gpu_share=0.55 runtime.threads=8"
  bench g5_t8 "runtime.optimizer_gpu_share=0.5 runtime.threads=8"
  bench shipped2
else
  # the image's bytecode: is it cached? (the slow imports in mode a: sympy 3.4 s, torch 4.3 s)
  python3 -c "import sys, os, sympy, torch; d = os.path.dirname(sympy.__file__); print('dont_write_bytecode', sys.dont_write_bytecode, 'prefix', sys.pycache_prefix, 'sympy pycache', os.path.isdir(os.path.join(d, '__pycache__')), 'writable', os.access(d, os.W_OK), 'torch pycache', os.path.isdir(os.path.join(os.path.dirname(torch.__file__), '__pycache__')))" >>"$log" 2>&1
  # as after a pip install, which writes the bytecode: cached under /tmp from the first run on (gpu_lib.sh)
  run 60 python3 bench/startup_probe.py "$res/startup_cold.json"
  run 30 python3 bench/startup_probe.py "$res/startup_cached.json"
  run 45 python3 bench/perf.py ceiling --out "$res"
  bench shipped1
  bench shipped2
  bench g5_t8 "runtime.optimizer_gpu_share=0.5 runtime.threads=8"
  bench shipped3
  run_estimate
fi
pack
grep -h "^RESULT\|^dont_write\|passed\|failed\|Error\|rc=\|^\[\[" "$log" | cut -c1-1500
