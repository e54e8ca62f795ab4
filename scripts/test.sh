#!/usr/bin/env bash
# Installs spear-ray with its test tools into ./.venv, then runs ruff and the default test tier.
#   bash scripts/test.sh              # default tier (CI)
#   bash scripts/test.sh -m slow      # the slow tier (run before resolving an issue)
# Extra arguments go to pytest. pytest's "no tests collected" (exit 5) is a failure here.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
.venv/bin/ruff check .
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
