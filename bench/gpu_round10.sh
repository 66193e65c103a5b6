#!/usr/bin/env bash
# Round 10 (the CPU's update of split masters in one pass, engine/native.py) in one call:
#   bash bench/gpu_round10.sh OUTDIR MODE
# MODE a: the C compiler there, the CUDA engine and kernel tests on this tree, the CPU update
#   alone (bench/adamw_kernel.py: whole masters, the C kernel, torch's pieces; 16 and 8 threads),
#   the plain resident ceiling, then `ramgpt train --profile rtx3050-6gb` 8 steps: the shipped
#   settings, every master split (runtime.split_masters=true) at GPU shares 0.6, 0.5, 0.4 and 0.3,
#   the shipped settings again.
# MODE b (at c362477, shipped = auto splitting every chunk, share 0.4): the CUDA tests, the ceiling,
#   the shipped settings (the first with an empty compile cache), no CPU kernel with round 9's share
#   0.6 (RAMGPT_NATIVE=0: a machine without a C compiler), shares 0.35 and 0.45, the shipped settings
#   twice more, estimate-memory's projection.
# MODE c (where the cold run's extra RSS goes): the shipped settings with empty compile caches
#   (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR fresh per run): as shipped, with the blocks not
#   compiled (runtime.compile_blocks=false), with inductor compiling in this process
#   (TORCHINDUCTOR_COMPILE_THREADS=1); then the shipped settings with the caches warm.
set -u
out=$1
mode=${2:-a}
res=/tmp/round10-res  # packed into $out/res.tgz after every run (the device tool brings back 8 files)
rm -rf "$res"
mkdir -p "$res"
log=$out/log-round10-$mode.txt
. "$(dirname "$0")/gpu_lib.sh"
{ command -v cc gcc; cc --version | head -1; } >>"$log" 2>&1
if [ "$mode" = a ]; then
  run 150 python3 -m pytest -q -p no:cacheprovider tests/test_engine.py tests/test_native.py
  run 90 python3 bench/adamw_kernel.py --threads 16 8 --out "$res"
  run 45 python3 bench/perf.py ceiling --out "$res"
  bench shipped1
  bench all_g6 "runtime.split_masters=true"
  bench all_g5 "runtime.split_masters=true runtime.optimizer_gpu_share=0.5"
  bench all_g4 "runtime.split_masters=true runtime.optimizer_gpu_share=0.4"
  bench all_g3 "runtime.split_masters=true runtime.optimizer_gpu_share=0.3"
  bench shipped2
elif [ "$mode" = b ]; then
  run 150 python3 -m pytest -q -p no:cacheprovider tests/test_engine.py tests/test_native.py tests/test_doctor_child.py
  run 45 python3 bench/perf.py ceiling --out "$res"
  bench shipped1
  bench nokernel_g6 "runtime.optimizer_gpu_share=0.6" RAMGPT_NATIVE=0
  bench g35 "runtime.optimizer_gpu_share=0.35"
  bench shipped2
  bench g45 "runtime.optimizer_gpu_share=0.45"
  bench shipped3
  run_estimate
elif [ "$mode" = c ]; then
  cold() { echo "TORCHINDUCTOR_CACHE_DIR=/tmp/ind-$1 TRITON_CACHE_DIR=/tmp/tri-$1"; }
  bench cold_shipped "" "$(cold a)"
  bench cold_nocompile "runtime.compile_blocks=false" "$(cold b)"
  bench cold_threads1 "" "$(cold c) TORCHINDUCTOR_COMPILE_THREADS=1"
  bench shipped_warm "" "$(cold a)"
fi
pack
grep -h "^RESULT\|passed\|failed\|Error\|rc=\|^/usr\|^cc\|^gcc" "$log" | cut -c1-1500
