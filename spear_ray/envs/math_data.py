"""Math problems for python_math: a seeded generator and a loader for prompt/answer files.

Generator: `generate_problem(seed, level)` gives a problem that is tedious by hand and one short
Python program away (modular powers, prime counts, digit sums, coin change, totient sums, ...).
Levels 1-4 pick harder families and bigger numbers. Same seed and level -> same problem.

Loader: `load_problems(path)` reads .jsonl, .parquet, or a HF `datasets` directory written by
`save_to_disk` (needs the `datasets` package). A row needs a prompt and an answer:
- prompt: a string, or a list of chat messages (the DAPO-Math-17k shape), of which the last
  user message's content is taken;
- answer: the field named by `answer_field`; "auto" tries `answer`, then
  `reward_model.ground_truth` (DAPO-Math-17k), then `solution`. Dotted names reach into dicts.
A bad row raises MathDataError("FILE:LINE: what is wrong"); for parquet and datasets the line is
the 1-based row number.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class MathProblem:
    prompt: str
    answer: str
    source: str  # "generated:L<level>:<family>" or "<file>:<line>"


class MathDataError(ValueError):
    """A data file or row that cannot be used; the message starts with FILE:LINE."""


# ---------------------------------------------------------------- generator


def _primes_below(n: int) -> list[int]:
    if n <= 2:
        return []
    sieve = bytearray([1]) * n
    sieve[0] = sieve[1] = 0
    for i in range(2, math.isqrt(max(n - 1, 0)) + 1):
        if sieve[i]:
            sieve[i * i :: i] = bytearray(len(range(i * i, n, i)))
    return [i for i in range(n) if sieve[i]]


def _num_divisors(n: int) -> int:
    count, d = 1, 2
    while d * d <= n:
        e = 0
        while n % d == 0:
            n //= d
            e += 1
        count *= e + 1
        d += 1
    return count * (2 if n > 1 else 1)


def _fib_mod(n: int, m: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, (a + b) % m
    return a


def _collatz_steps(n: int) -> int:
    steps = 0
    while n != 1:
        n = n // 2 if n % 2 == 0 else 3 * n + 1
        steps += 1
    return steps


def _coin_ways(total: int, coins: tuple[int, ...]) -> int:
    ways = [1] + [0] * total
    for c in coins:
        for v in range(c, total + 1):
            ways[v] += ways[v - c]
    return ways[total]


def _count_digit_sum(n: int, k: int) -> int:
    """How many integers in [1, n] have digit sum k (digit DP)."""
    digits = list(map(int, str(n)))

    @cache
    def count(pos: int, remaining: int, tight: bool) -> int:
        if remaining < 0:
            return 0
        if pos == len(digits):
            return int(remaining == 0)
        top = digits[pos] if tight else 9
        return sum(count(pos + 1, remaining - d, tight and d == top) for d in range(top + 1))

    return count(0, k, True)  # k >= 1, so 0 is never counted


def _totient_sum(n: int) -> int:
    phi = list(range(n + 1))
    for i in range(2, n + 1):
        if phi[i] == i:
            for j in range(i, n + 1, i):
                phi[j] -= phi[j] // i
    return sum(phi[1:])


Family = Callable[[random.Random, int], tuple[str, Any]]


def _modpow(rng: random.Random, level: int) -> tuple[str, Any]:
    a = rng.randint(3, 10**level * 5)
    b = rng.randint(10 ** (level + 1), 10 ** (level + 2))
    m = rng.choice([1000, 10007, 99991, 10**6 + 3, 2**31 - 1][: level + 1])
    return f"What is the remainder when ${a}^{{{b}}}$ is divided by ${m}$?", pow(a, b, m)


def _digit_sum_pow(rng: random.Random, level: int) -> tuple[str, Any]:
    base = rng.choice([2, 3, 7, 11, 13])
    e = rng.randint(50 * level, 200 * level)
    return (
        f"What is the sum of the decimal digits of ${base}^{{{e}}}$?",
        sum(map(int, str(base**e))),
    )


def _big_product(rng: random.Random, level: int) -> tuple[str, Any]:
    a = rng.randint(10 ** (level + 3), 10 ** (level + 4))
    b = rng.randint(10 ** (level + 2), 10 ** (level + 3))
    return f"Compute ${a} \\times {b}$.", a * b


def _divisors(rng: random.Random, level: int) -> tuple[str, Any]:
    n = math.prod(rng.choice([2, 2, 3, 3, 5, 7, 11, 13]) for _ in range(3 + 2 * level))
    return f"How many positive divisors does ${n}$ have?", _num_divisors(n)


def _prime_count(rng: random.Random, level: int) -> tuple[str, Any]:
    n = rng.randint(10 ** (level + 2), 3 * 10 ** (level + 2))
    n = min(n, 2 * 10**6)
    return f"How many prime numbers are less than ${n}$?", len(_primes_below(n))


def _multiples_sum(rng: random.Random, level: int) -> tuple[str, Any]:
    a, b = rng.sample([3, 4, 6, 7, 9, 11, 13], 2)
    n = rng.randint(10 ** (level + 2), 10 ** (level + 3))

    def multiples_sum(k: int) -> int:
        m = (n - 1) // k
        return k * m * (m + 1) // 2

    total = multiples_sum(a) + multiples_sum(b) - multiples_sum(a * b // math.gcd(a, b))
    return (
        f"What is the sum of all positive integers less than ${n}$ that are multiples of ${a}$"
        f" or ${b}$?",
        total,
    )


def _fibonacci(rng: random.Random, level: int) -> tuple[str, Any]:
    n = rng.randint(100 * level, 1000 * level)
    m = rng.choice([1000, 10007, 65537, 10**9 + 7])
    return (
        f"Let $F_0 = 0$, $F_1 = 1$ and $F_{{n+1}} = F_n + F_{{n-1}}$. What is $F_{{{n}}}$"
        f" modulo ${m}$?",
        _fib_mod(n, m),
    )


def _digit_sum_count(rng: random.Random, level: int) -> tuple[str, Any]:
    n = rng.randint(10 ** (level + 2), 10 ** (level + 3))
    k = rng.randint(5, 9 + 3 * level)
    count = _count_digit_sum(n, k)
    return f"How many integers $n$ with $1 \\le n \\le {n}$ have digit sum exactly ${k}$?", count


def _collatz(rng: random.Random, level: int) -> tuple[str, Any]:
    n = rng.randint(10 ** (level + 1), 10 ** (level + 3))
    return (
        f"Starting from ${n}$, repeatedly replace $n$ by $n/2$ if $n$ is even and by $3n+1$"
        " if $n$ is odd. How many replacements does it take to reach $1$?",
        _collatz_steps(n),
    )


def _lattice_points(rng: random.Random, level: int) -> tuple[str, Any]:
    r = rng.randint(10 * level, 60 * level)
    count = sum(2 * math.isqrt(r * r - x * x) + 1 for x in range(-r, r + 1))
    return f"How many integer points $(x, y)$ satisfy $x^2 + y^2 \\le {r * r}$?", count


def _telescoping(rng: random.Random, level: int) -> tuple[str, Any]:
    n = rng.randint(20 * level, 400 * level)
    a = rng.randint(1, 3)
    # sum_{k=1}^{n} 1/((k+a-1)(k+a)) = 1/a - 1/(n+a)
    from fractions import Fraction

    value = Fraction(1, a) - Fraction(1, n + a)
    term = "k(k+1)" if a == 1 else f"(k+{a - 1})(k+{a})"
    return (
        f"Compute $\\sum_{{k=1}}^{{{n}}} \\frac{{1}}{{{term}}}$ as a fraction in lowest terms.",
        f"\\frac{{{value.numerator}}}{{{value.denominator}}}",
    )


def _binomial_mod(rng: random.Random, level: int) -> tuple[str, Any]:
    n = rng.randint(50 * level, 300 * level)
    k = rng.randint(n // 4, n // 2)
    p = rng.choice([1009, 10007, 10**9 + 7])
    return f"What is $\\binom{{{n}}}{{{k}}}$ modulo ${p}$?", math.comb(n, k) % p


def _coin_change(rng: random.Random, level: int) -> tuple[str, Any]:
    coins = tuple(sorted(rng.sample([1, 2, 3, 5, 7, 10, 20, 25, 50], 3 + level)))
    if 1 not in coins:
        coins = (1, *coins[1:])
    total = rng.randint(100 * level, 500 * level)
    return (
        f"In how many ways can you pay exactly ${total}$ cents with unlimited coins worth"
        f" {', '.join(map(str, coins))} cents (order does not matter)?",
        _coin_ways(total, coins),
    )


def _totients(rng: random.Random, level: int) -> tuple[str, Any]:
    n = rng.randint(2 * 10**level, 10 ** (level + 1))
    return (
        f"Let $\\varphi$ be Euler's totient function. Compute $\\sum_{{k=1}}^{{{n}}} \\varphi(k)$.",
        _totient_sum(n),
    )


def _prime_squares(rng: random.Random, level: int) -> tuple[str, Any]:
    n = rng.randint(50 * level, 300 * level)
    primes = _primes_below(max(100, int(n * (math.log(n) + math.log(math.log(n)) + 3))))[:n]
    return f"What is the sum of the squares of the first ${n}$ prime numbers?", sum(
        p * p for p in primes
    )


# Families per level; a level draws from its own list and every list below it.
FAMILIES: dict[int, tuple[Family, ...]] = {
    1: (_modpow, _digit_sum_pow, _big_product, _divisors),
    2: (_prime_count, _multiples_sum, _fibonacci, _binomial_mod),
    3: (_digit_sum_count, _collatz, _lattice_points, _telescoping),
    4: (_coin_change, _totients, _prime_squares),
}
LEVELS = tuple(sorted(FAMILIES))


@lru_cache(maxsize=4096)  # a group resets G envs with the same seed
def generate_problem(seed: int, level: int) -> MathProblem:
    """A problem from `seed` at `level` (1-4): deterministic and cheap to produce."""
    if level not in FAMILIES:
        raise ValueError(f"math level must be one of {LEVELS}, got {level}")
    rng = random.Random(f"python_math:{seed}:{level}")
    families = [f for lv in LEVELS if lv <= level for f in FAMILIES[lv]]
    # favour the level's own families: half the draws come from them
    family = rng.choice(FAMILIES[level]) if rng.random() < 0.5 else rng.choice(families)
    prompt, answer = family(rng, level)
    return MathProblem(prompt, str(answer), f"generated:L{level}:{family.__name__.lstrip('_')}")


# ---------------------------------------------------------------- loader


def _get(row: dict[str, Any], dotted: str) -> Any:
    value: Any = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def row_to_problem(row: Any, where: str, prompt_field: str, answer_field: str) -> MathProblem:
    if not isinstance(row, dict):
        raise MathDataError(
            f"{where}: expected an object with {prompt_field!r}, got {type(row).__name__}"
        )
    prompt = _get(row, prompt_field)
    if isinstance(prompt, list):  # chat messages: take the last user turn
        users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        prompt = users[-1].get("content") if users else None
    if not isinstance(prompt, str) or not prompt.strip():
        raise MathDataError(
            f"{where}: field {prompt_field!r} is missing or not a non-empty string"
            " (or a list of chat messages with a user turn)"
        )
    fields = (
        ["answer", "reward_model.ground_truth", "solution"]
        if answer_field == "auto"
        else [answer_field]
    )
    answer = next((a for a in (_get(row, f) for f in fields) if a is not None), None)
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise MathDataError(
            f"{where}: no answer: field(s) {', '.join(map(repr, fields))}"
            " missing, empty or not a string/number"
        )
    return MathProblem(prompt.strip(), answer.strip(), where)


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as f:  # decoded line by line, so a bad byte is named by its line
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                msg = (
                    f"{where}: not UTF-8 (byte {raw[e.start]:#04x} at offset {e.start} of the"
                    " line); save the file as UTF-8"
                )
                raise MathDataError(msg) from None
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                msg = f"{where}: invalid JSON ({e.msg} at column {e.colno})"
                raise MathDataError(msg) from None


def _iter_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        msg = f"{path}: reading parquet needs pyarrow (pip install pyarrow)"
        raise MathDataError(msg) from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:
        raise MathDataError(f"{path}: not a readable parquet file ({e})") from None
    for i, row in enumerate(rows, 1):
        yield f"{path}:{i}", row


def _iter_hf_dir(path: Path, split: str | None) -> Iterator[tuple[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise MathDataError(
            f"{path}: a HF datasets directory needs the `datasets` package (pip install datasets)"
            "; or export it to .jsonl or .parquet"
        ) from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        name = split or ("train" if "train" in ds else None)
        if name not in ds:
            raise MathDataError(f"{path}: choose a split with `split`: one of {', '.join(ds)}")
        ds, path = ds[name], path / name
    for i, row in enumerate(ds, 1):
        yield f"{path}:{i}", row


def load_problems(
    path: str | os.PathLike[str],
    *,
    prompt_field: str = "prompt",
    answer_field: str = "auto",
    split: str | None = None,
) -> list[MathProblem]:
    """Every row of a .jsonl / .parquet file or a HF datasets directory, as MathProblems."""
    p = Path(path).expanduser()
    if not p.exists():
        raise MathDataError(f"{p}:0: no such file or directory")
    if p.is_dir():
        rows = _iter_hf_dir(p, split)
    elif p.suffix in (".jsonl", ".json", ".ndjson"):
        rows = _iter_jsonl(p)
    elif p.suffix in (".parquet", ".pq"):
        rows = _iter_parquet(p)
    else:
        raise MathDataError(
            f"{p}:0: unknown data format (want .jsonl, .parquet or a HF datasets directory)"
        )
    problems = [row_to_problem(row, where, prompt_field, answer_field) for where, row in rows]
    if not problems:
        raise MathDataError(f"{p}:0: no rows")
    return problems


@lru_cache(maxsize=8)
def _cached(
    path: str, mtime_ns: int, prompt_field: str, answer_field: str, split: str | None
) -> tuple[MathProblem, ...]:
    return tuple(
        load_problems(path, prompt_field=prompt_field, answer_field=answer_field, split=split)
    )


def load_problems_cached(
    path: str, prompt_field: str, answer_field: str, split: str | None
) -> tuple[MathProblem, ...]:
    """load_problems, read once per process per file version (many envs share one file)."""
    p = Path(path).expanduser()
    mtime = p.stat().st_mtime_ns if p.exists() else 0
    return _cached(str(p), mtime, prompt_field, answer_field, split)
