#!/usr/bin/env bash
# Fresh machine -> the test suite: install with the dev extras, then run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --dev
. .venv/bin/activate
python -m pytest -q -p no:cacheprovider "$@"
