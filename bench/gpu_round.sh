#!/usr/bin/env bash
# One round of GPU measurements on a warm machine, as run for docs/benchmarks.md:
#
#   bash bench/gpu_round.sh engine  OUTDIR   # link, resident 1b, streamed 1b (host and device
#                                            # gradient accumulation), their agreement, panel capture
#   bash bench/gpu_round.sh streamed OUTDIR  # only the streamed 1b sections
#   bash bench/gpu_round.sh loss    OUTDIR   # a few hundred steps of the 1b model under the budget
#   bash bench/gpu_round.sh textloss OUTDIR  # the same on real Japanese text (CORPUS=file.txt)
#   bash bench/gpu_round.sh final   OUTDIR   # the 1b streamed run with the shipped defaults
#   bash bench/gpu_round.sh p1b     OUTDIR   # 0p1b streamed vs its resident baseline
#   bash bench/gpu_round.sh p1bacc  OUTDIR   # 0p1b: host vs device gradient accumulation
#   bash bench/gpu_round.sh gen     OUTDIR   # generate with the weights streamed vs resident
#
# Every section runs in its own process under a time limit, so one failure (an OOM) leaves the
# others standing. Results: OUTDIR/log-<round>.txt, OUTDIR/res-<round>.tgz (JSON per section) and
# the panel capture. Needs ramgpt's dependencies importable (see noxfile.py's gpu session).
set -u
round=$1
out=$2
res=/tmp/ramgpt-res-$round
rm -rf "$res"  # no results of an earlier run of this round in the summary or the tarball
mkdir -p "$out" "$res"
log=$out/log-$round.txt
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.current,pcie.link.width.current --format=csv
  python3 -c "import torch, ramtorch; print('torch', torch.__version__, 'ramtorch', ramtorch.__version__)"
  nproc
} >>"$log" 2>&1

section() {  # section LIMIT_S SECTION [--tag T] ; env passes through
  local limit=$1
  shift
  echo "== $* (SPP=${SPP:-} ACC=${ACC:-})" >>"$log"
  timeout "$limit" python3 bench/bench_engine.py "$@" --out "$res" >>"$log" 2>&1
  local rc=$?
  echo "rc=$rc" >>"$log"
  return $rc
}

train_cmd() {  # the product's own command line, as a user types it
  python3 -m ramgpt train --set data.source=embedded --set data.tokenizer=embedded "$@"
}

streamed_1b() {  # rtx3050-6gb: host vs device gradient accumulation
  SPP=16 ACC=host section 150 streamed --tag=_host16
  if ! SPP=16 ACC=device section 150 streamed --tag=_device16; then
    SPP=14 ACC=device section 150 streamed --tag=_device14
  fi
}

case $round in
streamed)
  streamed_1b
  ;;
engine)
  section 60 link
  section 150 resident
  streamed_1b
  section 120 accagree
  # the live panel in a terminal during a streamed 0p1b run under the 5.1 GiB budget; ^C at 55 s
  python3 bench/capture_panel.py --out "$out/panel" --cols 140 --rows 45 --ctrl-c-after 55 --timeout 150 -- \
    python3 -m ramgpt train --profile 0p1b --set data.source=embedded --set data.tokenizer=embedded \
    --set runtime.engine=streamed --set runtime.vram_budget_gib=5.1 --set runtime.seqs_per_pass=64 \
    --set logging.eval_interval=20 --set checkpoint.save_interval_steps=25 --max-steps 2000 \
    --out-dir /tmp/panelrun >>"$log" 2>&1
  echo "capture rc=$?" >>"$log"
  ;;
loss)
  ACC=${ACC:-host}
  timeout "${LOSS_LIMIT_S:-560}" bash -c "$(declare -f train_cmd); train_cmd --profile rtx3050-6gb \
    --set optim.grad_accum_steps=16 --set runtime.seqs_per_pass=16 --set runtime.grad_accum=$ACC \
    --set scheduler.warmup_steps=10 --max-steps ${STEPS:-300} --set logging.log_interval=5 \
    --set logging.eval_interval=50 --set checkpoint.save_final=false \
    --set checkpoint.save_interval_steps=100000 --no-tui --out-dir /tmp/lossrun" >>"$log" 2>&1
  echo "loss rc=$?" >>"$log"
  cp /tmp/lossrun/metrics.jsonl "$out/loss-metrics.jsonl" 2>/dev/null
  ;;
textloss)  # the loss run on a few MB of real Japanese text (bench/make_manpages_corpus.py), not
  # the 130 KB embedded corpus: every token is new, so the held-out loss can fall with the train loss
  timeout "${LOSS_LIMIT_S:-330}" python3 -m ramgpt train --profile rtx3050-6gb --set data.source=text \
    --set data.path="${CORPUS:-corpus-ja/manpages_ja.txt}" --set data.tokenizer=embedded \
    --set optim.grad_accum_steps=16 --set runtime.seqs_per_pass=16 --set scheduler.warmup_steps=10 \
    --max-steps "${STEPS:-200}" --set logging.log_interval=5 --set logging.eval_interval=25 \
    --set checkpoint.save_final=false --set checkpoint.save_interval_steps=100000 --no-tui \
    --out-dir "$out/textloss" >>"$log" 2>&1
  echo "textloss rc=$?" >>"$log"
  ;;
final)  # the shipped defaults (grad_accum auto)
  SPP=16 section 150 streamed --tag=_auto16
  ;;
p1b)  # 0p1b streamed vs resident (no cap, micro-batch 32: the small model needs big batches)
  MB=32 STEPS=8 section 90 p1b_resident --tag=_mb32
  STEPS=8 section 90 p1b --tag=_8steps
  ;;
p1bacc)  # 0p1b: host vs device gradient accumulation, same machine, alternating
  n=0
  for acc in host device host device; do
    ACC=$acc STEPS=8 section 90 p1b --tag=_$acc$((++n))
  done
  ;;
gen)  # generate with the weights streamed (0.45 GiB budget: the 0.58 GiB the model needs resident
  # does not fit) vs resident, greedy, so both must print the same text
  train_cmd --profile 0p1b --set runtime.engine=streamed --set runtime.vram_budget_gib=5.1 \
    --set runtime.seqs_per_pass=64 --max-steps 40 --no-tui --out-dir /tmp/genrun >>"$log" 2>&1
  for mode in streamed resident; do
    budget=(); [ $mode = streamed ] && budget=(--vram-budget-gib "${GEN_BUDGET_GIB:-0.45}")
    t0=$SECONDS
    python3 -m ramgpt generate -c /tmp/genrun -p "日本の" -n 64 -t 0 "${budget[@]}" >"$out/gen-$mode.txt" 2>&1
    echo "generate $mode rc=$? in $((SECONDS - t0)) s" >>"$log"
  done
  ;;
esac
python3 bench/bench_engine.py summary --out "$res" >>"$log" 2>&1
tar -czf "$out/res-$round.tgz" -C "$res" .
