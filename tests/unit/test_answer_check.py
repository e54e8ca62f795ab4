"""Reward checks that cannot hang: a corpus of crafted answers and the verdict each must get.

bounded_answers_match (spear_ray/envs/answer_check.py) runs the symbolic part in a child process
with a time and memory budget; benchmarks/verifier.py times every case of CORPUS.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from spear_ray.envs import answer_check
from spear_ray.envs.answer_check import bounded_answers_match
from spear_ray.envs.math_verifier import extract_boxed

NESTED = 3000

# (model answer, gold answer, verdict)
CORPUS: list[tuple[str, str, bool]] = [
    # answers whose symbolic check explodes: wrong, within the budget
    ("2^{1000000000}", "1", False),
    ("2^{2^{2^{2^{2^{2}}}}}", "1", False),
    ("10^{10^{10^{10}}}", "1", False),
    ("1000000000!", "1", False),
    ("(10^{10})!", "1", False),
    ("\\frac{(10^{9})!}{(10^{9}-1)!}", "1000000000", False),
    ("9^{9^{9}} - 9^{9^{9}} + 1", "1", False),
    # nesting
    ("{" * NESTED + "1" + "}" * NESTED, "1", True),
    ("{" * NESTED + "2" + "}" * NESTED, "1", False),
    ("\\sqrt{" * 20 + "1" + "}" * 20, "1", True),
    ("\\sqrt{" * 400 + "1" + "}" * 400, "1", False),  # too deep for the backends: wrong
    ("(" * 5000 + "1" + ")" * 5000, "1", False),
    # megabyte-long answers
    ("1" * 1_000_000, "1", False),
    ("1" + " " * 1_000_000, "1", False),
    ("9" * 4000, "9" * 4000, True),
    ("9" * 5000, "9" * 4999 + "8", False),
    # unicode look-alikes
    ("１２", "12", True),
    ("\u22123", "-3", True),
    ("1\u200b2", "12", True),
    ("1\u043e", "10", False),  # Cyrillic o, not a zero
    ("\u0661\u0662", "12", True),  # decimal digits of any script are digits
    ("\U0001d7cf\U0001d7d0", "12", True),  # mathematical bold digits (NFKC)
    # NaN and infinity forms
    ("nan", "1", False),
    ("NaN", "1", False),
    ("\\text{NaN}", "1", False),
    ("float('nan')", "1", False),
    ("\\infty", "1", False),
    ("-\\infty", "1", False),
    ("inf", "1", False),
    ("oo", "1", False),
    ("1e309", "1", False),
    ("\\infty", "\\infty", True),
    # ordinary answers keep their verdicts
    ("\\frac{1}{2}", "0.5", True),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", True),
    ("2", "3", False),
    ("1,000,000", "1000000", True),
    ("", "1", False),
]


@pytest.mark.parametrize(
    ("pred", "gold", "verdict"),
    CORPUS,
    ids=[f"{i}:{p[:24]!r}" for i, (p, _, _) in enumerate(CORPUS)],
)
def test_every_crafted_answer_gets_its_verdict(pred, gold, verdict):
    # Every crafted answer is unequal to its gold answer, so its verdict does not depend on
    # whether its check finishes or is killed; a correct answer gets a budget no machine
    # should reach, so that its verdict does not depend on the machine's speed either.
    budget = 10.0 if verdict else 0.5
    assert bounded_answers_match(pred, gold, timeout_s=budget, memory_mb=512) is verdict


def test_deeply_nested_braces_in_a_boxed_answer_read_as_their_content():
    text = "so the answer is \\boxed{" + "{" * NESTED + "1" + "}" * NESTED + "}."
    assert bounded_answers_match(extract_boxed(text), "1") is True


def test_a_check_past_its_budget_kills_the_checker_and_the_next_check_works():
    pool = answer_check._pool(256)
    answer_check.bounded_answers_match("\\sqrt{2}", "\\sqrt{2}+0", memory_mb=256)  # warm
    before = {c.proc.pid for c in pool.all}
    assert bounded_answers_match("2^{1000000000}", "1", timeout_s=0.2, memory_mb=256) is False
    after = {c.proc.pid for c in pool.all}
    assert after - before, "the checker past its budget was not replaced"
    assert not any(c.alive() for c in pool.all if c.proc.pid in before - after)
    # the replacement works
    assert bounded_answers_match("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", memory_mb=256)


def test_the_checker_runs_under_its_memory_budget_and_survives_hitting_it():
    assert bounded_answers_match("\\sqrt{2}", "\\sqrt{2}+0", memory_mb=128)  # starts one
    checker = answer_check._pool(128).all[0]
    limits = Path(f"/proc/{checker.proc.pid}/limits").read_text()
    line = next(row for row in limits.splitlines() if row.startswith("Max address space"))
    assert line.split()[3:5] == [str(128 * 2**20)] * 2
    # 2^(2^33) needs a 1 GiB integer: past 128 MB it fails inside the child, which answers
    # False (or is replaced if it dies); the next check works either way.
    assert bounded_answers_match("2^{2^{33}} + 1", "1", memory_mb=128, timeout_s=5.0) is False
    assert bounded_answers_match("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", memory_mb=128)


def test_concurrent_checks_from_env_threads_each_get_their_own_verdict():
    from concurrent.futures import ThreadPoolExecutor

    cases = [("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", True), ("2^{10^9}", "1", False)] * 4
    with ThreadPoolExecutor(8) as pool:
        verdicts = list(pool.map(lambda c: bounded_answers_match(c[0], c[1], timeout_s=0.5), cases))
    assert verdicts == [v for _, _, v in cases]
    assert len(answer_check._pool(512).all) <= answer_check.MAX_CHECKERS
