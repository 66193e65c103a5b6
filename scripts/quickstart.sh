#!/usr/bin/env bash
# Fresh machine -> a trained micro-test model: install, then train on the embedded corpus
# with the embedded tokenizer (no network, no GPU), then sample from it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. .venv/bin/activate
ramgpt train --profile micro-test "$@"
ramgpt generate --checkpoint runs/micro-test -p "今日は" --max-new-tokens 48 --seed 1
