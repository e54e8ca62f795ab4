"""Final-answer extraction and equivalence checking for math tasks.

`extract_boxed(text)` returns the content of the last `\\boxed{...}` (nested braces allowed).
`answers_match(pred, gold)` decides whether two answers are the same value:

1. identical after light normalisation (spaces, `$`, `\\left`/`\\right`, `\\dfrac`, thousands
   separators, a trailing period, `\\text{...}` wrappers);
2. both exact rationals (integers, decimals, `a/b`, `\\frac{a}{b}`) and equal;
3. otherwise the symbolic backend: HuggingFace `math-verify` when it is installed (sets, tuples,
   intervals, radicals, pi, ...), else a small sympy fallback (`verifier="sympy"` forces it).

`answers_match` has no time or memory limit of its own (math-verify times its work out with
SIGALRM, which only works on the main thread). Rewards use
`spear_ray.envs.answer_check.bounded_answers_match`: `quick_match` (steps 1-2, bounded) in
process, `symbolic_match` (step 3) in a child process with a time and memory budget.
"""

from __future__ import annotations

import re
import threading
import unicodedata
from fractions import Fraction
from functools import lru_cache
from typing import Literal

VerifierName = Literal["auto", "math_verify", "sympy"]

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def find_boxed(text: str) -> list[tuple[int, int, str]]:
    """(start, end, content) of every `\\boxed{...}` in text, braces matched."""
    found = []
    for m in _BOXED.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
            i += 1
        if depth == 0:
            found.append((m.start(), i, text[m.end() : i - 1]))
    return found


def extract_boxed(text: str) -> str | None:
    found = find_boxed(text)
    return found[-1][2].strip() if found else None


_TEXT_WRAP = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")


# Characters that look like ASCII ones and mean the same in an answer.
_LOOK_ALIKES = str.maketrans({"\u2212": "-", "\u2013": "-", "\u2014": "-", "\u00b7": "*"})


def _plain_text(s: str) -> str:
    """NFKC (fullwidth digits and letters -> ASCII), dash look-alikes -> '-', and invisible
    format characters (zero-width spaces, direction marks) dropped."""
    s = unicodedata.normalize("NFKC", s).translate(_LOOK_ALIKES)
    return "".join(ch for ch in s if unicodedata.category(ch) != "Cf")


def strip_outer_braces(s: str) -> str:
    """`{{{1}}}` -> `1`: drop brace pairs that enclose the whole string, in one pass (a crafted
    answer may nest thousands deep). Unbalanced strings are returned unchanged."""
    lead = len(s) - len(s.lstrip("{"))
    trail = len(s) - len(s.rstrip("}"))
    pairs = min(lead, trail)
    if not pairs:
        return s
    depth, lowest = 0, pairs
    for i, ch in enumerate(s):
        depth += (ch == "{") - (ch == "}")
        if depth < 0:
            return s
        if lead <= i < len(s) - trail:  # the inner part: the outer pairs stay open over it
            lowest = min(lowest, depth)
    if depth != 0:
        return s
    if lead == len(s) - trail:  # nothing inside but braces: `{}`, `{{}}`
        lowest = pairs
    return s[lowest : len(s) - lowest]


def normalize(ans: str) -> str:
    s = strip_outer_braces(_plain_text(ans).strip())
    s = _TEXT_WRAP.sub(r"\1", s)
    for a, b in (
        ("\\left", ""),
        ("\\right", ""),
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
        ("\\!", ""),
        ("\\,", ""),
        ("\\;", ""),
        ("$", ""),
        ("^\\circ", ""),
        ("^{\\circ}", ""),
    ):
        s = s.replace(a, b)
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):  # 1,234,567 -> 1234567
        s = s.replace(",", "")
    return s


_FRAC = re.compile(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}")
_NUM = re.compile(r"-?(\d+(\.\d*)?|\.\d+)")


def as_rational(s: str) -> Fraction | None:
    """An exact rational for plain numbers, decimals, a/b and \\frac{a}{b}; else None."""
    try:
        if _NUM.fullmatch(s):
            return Fraction(s)
        m = _FRAC.fullmatch(s)
        if m:
            value = Fraction(int(m.group(2)), int(m.group(3)))
            return -value if m.group(1) else value
        if "/" in s:
            a, b = s.split("/", 1)
            if _NUM.fullmatch(a) and _NUM.fullmatch(b):
                return Fraction(a) / Fraction(b)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def answers_match(pred: str | None, gold: str, verifier: VerifierName = "auto") -> bool:
    """True when `pred` and `gold` denote the same mathematical value (no time limit: see the
    module docstring)."""
    if pred is None or not pred.strip():
        return False
    quick = quick_match(pred, gold)
    return quick if quick is not None else symbolic_match(pred, gold, verifier)


def quick_match(pred: str, gold: str) -> bool | None:
    """Steps 1-2: True/False when normalised text or exact rationals decide, else None. Linear
    in the answers' length (Python refuses integers of more than 4300 digits: not rational)."""
    p, g = normalize(pred), normalize(gold)
    if not p:
        return False
    if p == g:
        return True
    rp, rg = as_rational(p), as_rational(g)
    if rp is not None and rg is not None:
        return rp == rg
    return None


def symbolic_match(pred: str, gold: str, verifier: VerifierName = "auto") -> bool:
    """Step 3: math-verify (when installed and allowed) or the sympy fallback. Unbounded."""
    if verifier in ("auto", "math_verify") and _math_verify_available(verifier == "math_verify"):
        # math-verify parses LaTeX itself: give it the text, not normalize()'s squeezed form
        return _math_verify_match(_unwrapped(pred), _unwrapped(gold))
    return _sympy_match(normalize(pred), normalize(gold))


def _unwrapped(s: str) -> str:
    return strip_outer_braces(_plain_text(s).strip())


@lru_cache(maxsize=1)
def _has_math_verify() -> bool:
    try:
        import math_verify  # noqa: F401
    except ImportError:
        return False
    return True


def _math_verify_available(required: bool) -> bool:
    if _has_math_verify():
        return True
    if required:
        raise ImportError(
            "verifier='math_verify' needs the math-verify package (pip install"
            " math-verify); or use verifier='auto' or 'sympy'"
        )
    return False


def _math_verify_match(pred: str, gold: str) -> bool:
    import logging

    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=timeout)
        pred_parsed = parse(f"\\boxed{{{pred}}}", parsing_timeout=timeout)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))
    except Exception:  # a model answer that cannot be parsed is simply wrong
        return False


_LATEX_TO_PY = (
    (re.compile(r"\\frac\{([^{}]*)\}\{([^{}]*)\}"), r"((\1)/(\2))"),
    (re.compile(r"\\sqrt\{([^{}]*)\}"), r"sqrt(\1)"),
    (re.compile(r"\\pi"), "pi"),
    (re.compile(r"\\cdot|\\times"), "*"),
    (re.compile(r"\^"), "**"),
    (re.compile(r"\{|\}"), lambda m: "(" if m.group(0) == "{" else ")"),
)


def _sympy_match(p: str, g: str) -> bool:
    try:
        import sympy
        from sympy.parsing.sympy_parser import (
            implicit_multiplication_application,
            parse_expr,
            standard_transformations,
        )
    except ImportError:
        return False

    def to_expr(s: str):
        for _ in range(3):  # nested \frac / \sqrt
            for pattern, repl in _LATEX_TO_PY:
                s = pattern.sub(repl, s)
        if "\\" in s:
            raise ValueError(s)
        transforms = (*standard_transformations, implicit_multiplication_application)
        return parse_expr(s, transformations=transforms, evaluate=True)

    try:
        diff = sympy.simplify(to_expr(p) - to_expr(g))
        return diff == 0 or (diff.is_number and abs(complex(diff)) < 1e-9)
    except Exception:  # unparsable answer -> not equal
        return False
