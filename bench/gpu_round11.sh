#!/usr/bin/env bash
# Round 11 (the cold compile's RSS) in one call:
#   bash bench/gpu_round11.sh OUTDIR MODE
# MODE a: bench/compile_rss.py (the 1b's block warm-up alone, each in a process of its own) with
#   empty compile caches and again with that run's caches, as inductor ships and with pointwise
#   autotuning off (triton.autotune_pointwise=0); with inductor's cache empty but triton's warm
#   (lowering and autotuning again, no triton compile); the cold default run once more.
# MODE b (pointwise autotuning off in ramgpt's compile, engine/compiled.py): the CUDA engine tests,
#   compile_rss with empty caches (as shipped, and with inductor compiling in this process), the
#   plain resident ceiling, then `ramgpt train --profile rtx3050-6gb` 8 steps with empty compile
#   caches, and twice with that run's caches.
set -u
out=$1
mode=${2:-a}
res=/tmp/round11-res
rm -rf "$res"
mkdir -p "$res"
log=$out/log-round11-$mode.txt
. "$(dirname "$0")/gpu_lib.sh"
cache() { echo "TORCHINDUCTOR_CACHE_DIR=/tmp/ind-$1 TRITON_CACHE_DIR=/tmp/tri-$1"; }
crss() {  # TAG CACHE [--set ...]
  local tag=$1 c=$2; shift 2
  run 120 env $(cache "$c") python3 bench/compile_rss.py --out "$res" --tag "$tag" "$@"
  pack
}
if [ "$mode" = a ]; then
  crss cold_default A
  crss warm_default A
  crss cold_noauto B --set triton.autotune_pointwise=0
  crss warm_noauto B --set triton.autotune_pointwise=0
  run 120 env TORCHINDUCTOR_CACHE_DIR=/tmp/ind-C TRITON_CACHE_DIR=/tmp/tri-A python3 bench/compile_rss.py --out "$res" --tag cold_ind_warmtri
  crss cold_default2 D
  crss warm_default_again A
elif [ "$mode" = b ]; then
  run 200 python3 -m pytest -q -p no:cacheprovider tests/test_engine.py
  crss cold_shipped E
  run 120 env $(cache F) TORCHINDUCTOR_COMPILE_THREADS=1 python3 bench/compile_rss.py --out "$res" --tag cold_threads1
  pack
  run 45 python3 bench/perf.py ceiling --out "$res"
  bench cold_shipped "" "$(cache G)"
  bench warm_shipped1 "" "$(cache G)"
  bench warm_shipped2 "" "$(cache G)"
fi
pack
grep -h "^RESULT\|^CENSUS\|passed\|failed\|Error\|rc=" "$log" | cut -c1-1500
