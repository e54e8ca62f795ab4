#!/usr/bin/env bash
# The prepared GPU check: on a machine with one or more NVIDIA GPUs, install the `gpu` extra into
# its own venv and run each CUDA path once, printing one PASS/FAIL line per check with its
# figures, then a summary. Sized to finish within 8 minutes on one H100 (GPU_CHECK_LIMIT_S).
#
#   bash scripts/gpu_check.sh             # the checks (exit 0 only if all pass)
#   bash scripts/gpu_check.sh --dry-run   # print the checks and validate every training
#                                         # command's config on this machine (no GPU needed)
#
# Environment:
#   GPU_CHECK_VENV      the venv to use or create (default .venv-gpu); one that already imports
#                       vllm is used as it is, without installing
#   GPU_CHECK_PIP_ARGS  extra pip arguments for the install (e.g. --no-index --find-links DIR on
#                       a machine without the package index)
#   GPU_CHECK_LIMIT_S   the time for all checks together (default 480)
#   GPU_CHECK_OUT       where logs go (default gpu-check-logs/)
#
# The checks (README, "GPU check"):
#   gpus          torch sees CUDA devices
#   vllm-greedy   vLLM's CUDA engine loads builtin:smollm2-135m; its greedy tokens equal transformers'
#   zero2, zero3  2-step demo runs with DeepSpeed ZeRO-2 / ZeRO-3 learner ranks on the GPU
#   weight-sync   SmolLM2-135M learner -> 2 rollout workers, object store and collective (NCCL)
#   train-5       5 steps of the textworld-1.5b preset's algorithm at a size that fits one GPU
#   benchmarks    engine_ratio.py and step.py --vs-single-process (the speed issue's figures)
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
case "${1:-}" in
  --dry-run) DRY_RUN=1 ;;
  "") ;;
  *) echo "gpu_check: unknown argument '$1'; use --dry-run or nothing" >&2; exit 2 ;;
esac
LIMIT_S=${GPU_CHECK_LIMIT_S:-480}
OUT_DIR=${GPU_CHECK_OUT:-gpu-check-logs}
VENV=${GPU_CHECK_VENV:-.venv-gpu}
RUNS=$OUT_DIR/runs

# One GPU shared by a learner rank and a rollout worker (half each), SmolLM2-135M in bf16.
ONE_GPU=(
  model.path=builtin:smollm2-135m model.dtype=bfloat16
  learner.num_ranks=1 rollout.num_workers=1
  resources.gpus_per_learner=0.5 resources.gpus_per_rollout_worker=0.5
  resources.cpus_per_learner=2 resources.cpus_per_rollout_worker=2
  rollout.gpu_memory_utilization=0.3
  "run.runs_dir=$RUNS" run.eval_every_steps=0 checkpoint.every_steps=1000
)
ZERO=(--config demo "${ONE_GPU[@]}" run.total_steps=2 rollout.prompts_per_step=4)
TRAIN5=(
  --config textworld-1.5b "${ONE_GPU[@]}" run.total_steps=5 run.name=gpu-train-5
  rollout.prompts_per_step=4 rollout.samples_per_prompt=4 rollout.max_response_tokens=4096
  env.options.max_turns=8 learner.tokens_per_micro_batch=8192 buffer.size=16
)

# name | seconds | command (run with the venv's python as $PY)
CHECKS=(
  "gpus|60|\$PY scripts/gpu_checks.py gpus"
  "vllm-greedy|150|\$PY scripts/gpu_checks.py vllm-greedy --model builtin:smollm2-135m"
  "zero2|150|\$PY -m spear_ray.cli train --quiet ${ZERO[*]} learner.zero_stage=2 run.name=gpu-zero2"
  "zero3|150|\$PY -m spear_ray.cli train --quiet ${ZERO[*]} learner.zero_stage=3 run.name=gpu-zero3"
  "weight-sync|120|\$PY benchmarks/weight_sync.py --model builtin:smollm2-135m --gpu"
  "train-5|240|\$PY -m spear_ray.cli train --quiet ${TRAIN5[*]}"
  "benchmarks|240|\$PY benchmarks/engine_ratio.py --model builtin:smollm2-135m --repeats 2 && \$PY benchmarks/step.py --vs-single-process --rounds 2"
)

if (( DRY_RUN )); then
  # Every training command's config must load and pass `config check` here, so that a lent GPU's
  # minutes are not spent on a typo.
  PY=${PYTHON:-.venv/bin/python}
  status=0
  for entry in "${CHECKS[@]}"; do
    IFS='|' read -r name seconds command <<<"$entry"
    echo "check $name (limit ${seconds} s): $command"
  done
  for name in zero2 zero3 train-5; do
    case $name in
      zero2) args=("${ZERO[@]}" learner.zero_stage=2) ;;
      zero3) args=("${ZERO[@]}" learner.zero_stage=3) ;;
      train-5) args=("${TRAIN5[@]}") ;;
    esac
    # `config check SOURCE overrides...`: the preset without train's --config flag
    if "$PY" -m spear_ray.cli config check "${args[@]:1}" >/dev/null; then
      echo "config ok: $name"
    else
      echo "config FAIL: $name" >&2
      status=1
    fi
  done
  exit $status
fi

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
  echo "gpu_check: FAIL: no NVIDIA GPU found (nvidia-smi is missing or lists none); run it on a machine with one or more NVIDIA GPUs, or use --dry-run" >&2
  exit 2
fi
mkdir -p "$OUT_DIR"
START=$SECONDS
echo "gpu_check: $(nvidia-smi -L | head -4 | tr '\n' ';') limit ${LIMIT_S} s, logs in $OUT_DIR"

PY=$VENV/bin/python
if ! [ -x "$PY" ] || ! "$PY" -c "import vllm" 2>/dev/null; then
  echo "gpu_check: installing the gpu extra into $VENV"
  python3 -m venv "$VENV" || { echo "gpu_check: FAIL: cannot create $VENV" >&2; exit 1; }
  # shellcheck disable=SC2086
  if ! "$PY" -m pip install -q ${GPU_CHECK_PIP_ARGS:-} -e '.[gpu,dev]' >"$OUT_DIR/install.log" 2>&1; then
    echo "gpu_check: FAIL install: pip install '.[gpu,dev]' failed; see $OUT_DIR/install.log" >&2
    exit 1
  fi
fi
echo "gpu_check: $("$PY" -c 'import torch, vllm; print("torch", torch.__version__, "vllm", vllm.__version__)')"

passed=0; failed=0
for entry in "${CHECKS[@]}"; do
  IFS='|' read -r name seconds command <<<"$entry"
  left=$(( LIMIT_S - (SECONDS - START) ))
  if (( left < 20 )); then
    echo "SKIP $name: the ${LIMIT_S} s limit is used up"
    failed=$((failed + 1))
    continue
  fi
  (( seconds > left )) && seconds=$left
  t0=$SECONDS
  PY=$PY timeout "$seconds" bash -c "PY=$PY; $command" >"$OUT_DIR/$name.log" 2>&1
  rc=$?
  took=$((SECONDS - t0))
  # the check's own PASS/FAIL line, else the last JSON line (benchmarks), else the last line
  figures=$(grep -E '^(PASS|FAIL) ' "$OUT_DIR/$name.log" | tail -1)
  [ -z "$figures" ] && figures=$(grep -E '^\{' "$OUT_DIR/$name.log" | tail -2 | tr '\n' ' ')
  [ -z "$figures" ] && figures=$(tail -1 "$OUT_DIR/$name.log")
  if (( rc == 0 )); then
    echo "PASS $name (${took} s): $figures"
    passed=$((passed + 1))
  else
    why=$([ $rc -eq 124 ] && echo "timed out after ${seconds} s" || echo "exit $rc")
    echo "FAIL $name (${took} s, $why): $figures"
    failed=$((failed + 1))
  fi
done
echo "gpu_check: $passed passed, $failed failed in $((SECONDS - START)) s"
(( failed == 0 ))
