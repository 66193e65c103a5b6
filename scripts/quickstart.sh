#!/usr/bin/env bash
# Fresh machine -> a trained micro-test model: install, then train on the embedded corpus
# with the embedded tokenizer (no network, no GPU), then sample from it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. .venv/bin/activate
# the quickstart always starts a fresh demo run (training into a run that already has
# checkpoints is refused unless you --resume it)
rm -rf runs/micro-test
ramgpt train --profile micro-test "$@"
ramgpt generate --checkpoint runs/micro-test -p "今日は" --max-new-tokens 48 --seed 1
