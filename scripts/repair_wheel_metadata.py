"""Repair an installed distribution's WHEEL metadata so `pip check` can read its tags.

textworld 1.7.0's WHEEL file has an empty line before its `Tag:` line. WHEEL is an RFC 822
style header block, so a parser (pip's included) stops at the empty line and sees no tags at
all, and `pip check` reports "textworld 1.7.0 is not supported on this platform" for a package
that installed and works. We drop empty lines inside the header block and write one `Tag:` line
per expanded tag, as the wheel spec stores them; the set of tags is exactly the same.

    python scripts/repair_wheel_metadata.py DIST_NAME [DIST_NAME ...]
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path


def expand(tag: str) -> list[str]:
    python, abi, platform = tag.split("-")
    return [
        f"{p}-{a}-{plat}"
        for p in python.split(".")
        for a in abi.split(".")
        for plat in platform.split(".")
    ]


def repair(name: str) -> None:
    try:
        dist = distribution(name)
    except PackageNotFoundError:
        return
    wheel = next((Path(p.locate()) for p in dist.files or [] if p.name == "WHEEL"), None)
    if wheel is None or not wheel.is_file():
        return
    lines = wheel.read_text().splitlines()
    out: list[str] = []
    for line in lines:
        if line.startswith("Tag: "):
            out += [f"Tag: {t}" for t in expand(line[len("Tag: ") :].strip())]
        elif line.strip():
            out.append(line)
    if out != lines:
        wheel.write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        repair(arg)
