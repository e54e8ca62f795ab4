#!/usr/bin/env bash
# Installs spear-ray and everything it needs for the CPU into ./.venv (idempotent, ~2-3 min fresh).
#   bash scripts/setup.sh          # runtime only
#   bash scripts/setup.sh --dev    # plus the test and lint tools
# The CPU torch wheel is installed first and pinned, so nothing can pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="cpu"
[[ "${1:-}" == "--dev" ]] && extras="cpu,dev"

pip_install() {  # quiet pip; on failure show its output (minus local-index noise) and stop
  local log
  log=$(mktemp)
  if ! .venv/bin/python -m pip install --disable-pip-version-check -q "$@" >"$log" 2>&1; then
    grep -v "is ignored: it is neither" "$log" >&2
    echo "[setup] FAILED: pip install $*" >&2
    exit 1
  fi
  rm -f "$log"
}

PY="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
echo "[setup] installing the CPU torch wheel (torch==2.13.0)"
pip_install torch==2.13.0
echo "[setup] installing spear-ray[$extras] (ray, deepspeed, transformers, ...)"
pip_install -e ".[$extras]"
.venv/bin/python -m pip check >/dev/null || { .venv/bin/python -m pip check >&2; exit 1; }
.venv/bin/python -c "import torch, ray, deepspeed, transformers, pydantic, spear_ray" 2>/dev/null \
  || { echo "[setup] FAILED: the installed packages do not import" >&2; exit 1; }
echo "[setup] ok: $(.venv/bin/python -c 'import torch, ray; print("torch", torch.__version__, "ray", ray.__version__)')"
