"""The answer check's worst case over a corpus of crafted answers, bounded against unbounded.

    .venv/bin/python benchmarks/verifier.py [--timeout-s 0.5] [--unbounded-cap-s 10]

For every case of the corpus in tests/unit/test_answer_check.py (exponent towers, huge
factorials, deep nesting, megabyte-long answers, unicode look-alikes, NaN and inf forms, ordinary
answers): the wall time of `bounded_answers_match` with the env's default budget (the reward
path), and of the plain in-process `answers_match` run in a child process that is killed at
`--unbounded-cap-s` (what a reward call cost before the budget; "capped" means it ran longer).
That child runs the check on its main thread, where math-verify's own 5 s alarm works; on a
rollout worker's env thread, where rewards are computed, there was no limit at all.
Each bounded check runs right after its unbounded twin. The last line is JSON with the worst
cases of both and their ratio.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "unit")]


def _unbounded(pred: str, gold: str) -> None:
    from spear_ray.envs.math_verifier import answers_match

    answers_match(pred, gold)


def unbounded_seconds(pred: str, gold: str, cap_s: float) -> float:
    """answers_match's wall time in a forked child (imports already warm), at most cap_s."""
    child = multiprocessing.get_context("fork").Process(target=_unbounded, args=(pred, gold))
    t0 = time.perf_counter()
    child.start()
    child.join(cap_s)
    seconds = time.perf_counter() - t0
    if child.is_alive():
        child.kill()
        child.join()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout-s", type=float, default=0.5, help="the bounded check's budget")
    parser.add_argument("--unbounded-cap-s", type=float, default=10.0)
    args = parser.parse_args()

    from test_answer_check import CORPUS

    from spear_ray.envs.answer_check import bounded_answers_match
    from spear_ray.envs.math_verifier import answers_match

    answers_match("\\sqrt{2}", "\\frac{2}{\\sqrt{2}}")  # warm the in-process backends
    bounded_answers_match("\\sqrt{2}", "\\frac{2}{\\sqrt{2}}")  # start a checker
    rows = []
    for pred, gold, _ in CORPUS:
        unbounded = unbounded_seconds(pred, gold, args.unbounded_cap_s)
        t0 = time.perf_counter()
        verdict = bounded_answers_match(pred, gold, timeout_s=args.timeout_s)
        bounded = time.perf_counter() - t0
        rows.append((pred, verdict, bounded, unbounded))
        capped = " (capped)" if unbounded >= args.unbounded_cap_s else ""
        print(
            f"{pred[:40]!r:44} {verdict!s:5} bounded {bounded:7.3f} s   "
            f"unbounded {unbounded:7.3f} s{capped}",
            flush=True,
        )
    worst_bounded = max(r[2] for r in rows)
    worst_unbounded = max(r[3] for r in rows)
    print(
        f"worst case over {len(rows)} answers: bounded {worst_bounded:.3f} s (budget "
        f"{args.timeout_s} s), unbounded {worst_unbounded:.3f} s; ratio "
        f"{worst_bounded / worst_unbounded:.3f}"
    )
    print(
        json.dumps(
            {
                "cases": len(rows),
                "budget_s": args.timeout_s,
                "worst_bounded_s": round(worst_bounded, 4),
                "worst_unbounded_s": round(worst_unbounded, 4),
                "unbounded_capped": sum(r[3] >= args.unbounded_cap_s for r in rows),
                "bounded_vs_unbounded": round(worst_bounded / worst_unbounded, 4),
            }
        )
    )


if __name__ == "__main__":
    main()
