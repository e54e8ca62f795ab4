"""Unit-tier fixtures and markers.

`pytest.mark.sandbox`: the test runs code in the real sandbox, which needs bubblewrap and root
(for the per-call uid); without them it is skipped.
"""

from __future__ import annotations

import os
import shutil

import pytest

SANDBOX_MISSING = shutil.which("bwrap") is None or os.geteuid() != 0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "sandbox: needs the real sandbox (bubblewrap and root)")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if SANDBOX_MISSING and item.get_closest_marker("sandbox") is not None:
        pytest.skip(
            "needs bubblewrap (apt-get install -y bubblewrap) and root for the per-call uid"
        )
