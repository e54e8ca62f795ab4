"""python_math: turn parsing, the verifier, the generator, the data loader, and the env itself
driven through the real sandbox (no fake sandbox: the tool path is tested end to end)."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from fractions import Fraction

import pytest

from spear_ray.envs import EnvError, make_env
from spear_ray.envs.math_data import (
    FAMILIES,
    LEVELS,
    MathDataError,
    _count_digit_sum,
    generate_problem,
    load_problems,
)
from spear_ray.envs.math_verifier import answers_match, extract_boxed
from spear_ray.envs.python_math import parse_turn

# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "syntax", "kind", "content"),
    [
        ("Let me compute.\n<code>print(1+1)</code>", "tag", "code", "print(1+1)"),
        ("<code>\n```python\nprint(2)\n```\n</code>", "tag", "code", "print(2)"),
        ("<code>x = 3\nprint(x)", "tag", "code", "x = 3\nprint(x)"),  # stop string dropped
        ("<code>a=1</code> then <code>print(a)</code>", "tag", "code", "a=1\nprint(a)"),
        ("<code>print(5)</code> so the answer is \\boxed{5}", "tag", "answer", "5"),
        ("I guess \\boxed{4}, let me check <code>print(4)</code>", "tag", "code", "print(4)"),
        ("<code>print('\\\\boxed{9}')</code>", "tag", "code", "print('\\\\boxed{9}')"),
        ("The answer is \\boxed{\\frac{1}{2}}.", "tag", "answer", "\\frac{1}{2}"),
        ("I am not sure.", "tag", "invalid", None),
        ("<code>   </code>", "tag", "invalid", None),
        ("```python\nprint(3)\n```", "fence", "code", "print(3)"),
        ("```python\nprint(3)\n```", "tag", "invalid", None),
        ("<code>print(3)</code>", "fence", "invalid", None),
        (
            '<tool_call>{"name": "python", "arguments": {"code": "print(1)"}}</tool_call>',
            "hermes_json",
            "code",
            "print(1)",
        ),
        (
            '<tool_call>{"name": "python", "arguments": "{\\"code\\": \\"x=2\\"}"}',
            "hermes_json",
            "code",
            "x=2",
        ),  # arguments as a JSON string, stop string dropped
        (
            '<tool_call>{"name": "python", "arguments": {"code": "print(1)"</tool_call>',
            "hermes_json",
            "invalid",
            None,
        ),  # malformed JSON
        (
            '<tool_call>{"name": "search", "arguments": {"code": "print(1)"}}</tool_call>',
            "hermes_json",
            "invalid",
            None,
        ),  # not the interpreter
        ("<code>print(3)</code>", "hermes_json", "invalid", None),
    ],
)
def test_parse_turn(text, syntax, kind, content):
    assert parse_turn(text, syntax, "code") == (kind, content)


def test_extract_boxed_nested_and_last():
    assert extract_boxed("\\boxed{1} and \\boxed{\\frac{a}{b^{2}}}") == "\\frac{a}{b^{2}}"
    assert extract_boxed("no answer") is None
    assert extract_boxed("\\boxed{unclosed") is None


# ---------------------------------------------------------------- verifier

EQUIVALENT = [
    ("42", "42"),
    ("42.0", "42"),
    ("$42$", "42"),
    ("1,234", "1234"),
    ("0.5", "\\frac{1}{2}"),
    ("1/2", "\\dfrac{1}{2}"),
    ("-\\frac{3}{4}", "-0.75"),
    ("\\sqrt{8}", "2\\sqrt{2}"),
    ("\\frac{\\pi}{2}", "\\pi/2"),
    ("1+x^2", "x^2+1"),
    ("\\text{7}", "7"),
    ("12.", "12"),
]
DIFFERENT = [
    ("41", "42"),
    ("0.3333", "\\frac{1}{3}"),
    ("2\\sqrt{3}", "\\sqrt{8}"),
    ("x^2-1", "x^2+1"),
    ("", "1"),
    ("hello", "1"),
]


@pytest.mark.parametrize("verifier", ["auto", "sympy"])
def test_verifier_accepts_equivalent_forms(verifier):
    for pred, gold in EQUIVALENT:
        assert answers_match(pred, gold, verifier), (pred, gold, verifier)
    for pred, gold in DIFFERENT:
        assert not answers_match(pred, gold, verifier), (pred, gold, verifier)
    assert not answers_match(None, "1", verifier)


def test_verifier_math_verify_handles_sets_and_tuples():
    pytest.importorskip("math_verify")
    assert answers_match("\\{2, 1\\}", "\\{1,2\\}", "math_verify")
    assert answers_match("(1, 2)", "(1,2)", "math_verify")


def test_verifier_works_off_the_main_thread():
    out = []
    t = threading.Thread(target=lambda: out.append(answers_match("\\sqrt{8}", "2\\sqrt{2}")))
    t.start()
    t.join()
    assert out == [True]


# ---------------------------------------------------------------- generator


def test_generator_is_deterministic_and_varied():
    for level in LEVELS:
        problems = [generate_problem(seed, level) for seed in range(40)]
        assert problems == [generate_problem(seed, level) for seed in range(40)]
        assert len({p.prompt for p in problems}) >= 36
        assert len({p.source for p in problems}) >= 3
        for p in problems:
            assert re.fullmatch(r"\d+|\\frac\{\d+\}\{\d+\}", p.answer), p
    assert generate_problem(0, 1) != generate_problem(0, 4)


def test_generator_covers_every_family_quickly():
    seen = set()
    t0 = time.perf_counter()
    for level in LEVELS:
        for seed in range(60):
            seen.add(generate_problem(1000 + seed, level).source.split(":")[-1])
    assert seen == {f.__name__.lstrip("_") for fams in FAMILIES.values() for f in fams}
    assert time.perf_counter() - t0 < 15


def test_generator_helpers_match_brute_force():
    for n, k in [(1234, 10), (999, 27), (5000, 5), (10**4, 1)]:
        brute = sum(1 for i in range(1, n + 1) if sum(map(int, str(i))) == k)
        assert _count_digit_sum(n, k) == brute
    for seed in range(30):  # the telescoping family's closed form
        p = generate_problem(seed, 3)
        if p.source.endswith("telescoping"):
            n, a = map(int, re.search(r"\^\{(\d+)\}.*\(k\+(\d+)\)\}\$", p.prompt).groups())
            exact = sum(Fraction(1, (k + a - 1) * (k + a)) for k in range(1, n + 1))
            assert answers_match(f"{exact.numerator}/{exact.denominator}", p.answer)


# ---------------------------------------------------------------- loader


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_load_jsonl_plain_and_dapo_shape(tmp_path):
    path = _write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": "What is 6*7?", "answer": 42},
            {
                "prompt": [
                    {"role": "system", "content": "sys"},
                    {"role": "user", "content": "1+1?"},
                ],
                "reward_model": {"ground_truth": "2", "style": "rule-based"},
            },
        ],
    )
    problems = load_problems(path)
    assert [(p.prompt, p.answer) for p in problems] == [("What is 6*7?", "42"), ("1+1?", "2")]
    assert problems[1].source == f"{path}:2"


@pytest.mark.parametrize(
    ("rows", "line", "needle"),
    [
        ([{"prompt": "a", "answer": "1"}, {"prompt": "b"}], 2, "no answer"),
        ([{"prompt": "a", "answer": "1"}, "", "{not json"], 3, "invalid JSON"),
        ([{"question": "a", "answer": "1"}], 1, "'prompt'"),
        ([["a", "1"]], 1, "expected an object"),
        ([{"prompt": [{"role": "assistant", "content": "x"}], "answer": "1"}], 1, "'prompt'"),
    ],
)
def test_bad_jsonl_row_names_file_and_line(tmp_path, rows, line, needle):
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(MathDataError) as info:
        load_problems(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: ")
    assert needle in message and "\n" not in message


def test_load_parquet_and_bad_parquet_row(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    good = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["p1", "p2"], "answer": ["1", "2"]}), good)
    assert [p.answer for p in load_problems(good)] == ["1", "2"]
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"prompt": ["p1", "p2"], "answer": ["1", None]}), bad)
    with pytest.raises(MathDataError, match=re.escape(f"{bad}:2: no answer")):
        load_problems(bad)


def test_load_custom_fields(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"q": "x?", "meta": {"sol": 3}}])
    (p,) = load_problems(path, prompt_field="q", answer_field="meta.sol")
    assert (p.prompt, p.answer) == ("x?", "3")


def test_load_unknown_format_and_missing_file(tmp_path):
    (tmp_path / "d.csv").write_text("prompt,answer\n")
    with pytest.raises(MathDataError, match="unknown data format"):
        load_problems(tmp_path / "d.csv")
    with pytest.raises(MathDataError, match="no such file"):
        load_problems(tmp_path / "missing.jsonl")


def test_load_hf_datasets_dir(tmp_path):
    try:
        import datasets
    except ImportError:
        (tmp_path / "ds").mkdir()
        (tmp_path / "ds" / "state.json").write_text("{}")
        with pytest.raises(MathDataError, match="needs the `datasets` package"):
            load_problems(tmp_path / "ds")
        return
    ds = datasets.Dataset.from_dict({"prompt": ["a", "b"], "answer": ["1", "2"]})
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    assert [p.answer for p in load_problems(tmp_path / "dd")] == ["1", "2"]


# ---------------------------------------------------------------- the env, with the real sandbox


@pytest.fixture(scope="module")
def sandbox():
    from spear_ray.sandbox.client import SandboxClient
    from spear_ray.sandbox.config import SandboxConfig

    client = SandboxClient(SandboxConfig())
    yield client
    client.close()


def _modpow_seed() -> tuple[int, str]:
    for seed in range(200):
        p = generate_problem(seed, 1)
        if p.source.endswith("modpow"):
            return seed, p.prompt
    raise AssertionError("no modpow problem in 200 seeds")


def test_oracle_solves_with_the_tool(sandbox):
    seed, _ = _modpow_seed()
    env = make_env("python_math", {"levels": [1]}, sandbox=sandbox)
    obs = env.reset(seed)
    assert "<code></code>" in obs and "\\boxed{ANSWER}" in obs
    a, b, m = map(int, re.search(r"\$(\d+)\^\{(\d+)\}\$ is divided by \$(\d+)\$", obs).groups())
    result = env.step(f"I'll use Python.\n<code>\nprint(pow({a}, {b}, {m}))\n")
    assert result.info.tool_call and not result.done and result.reward == 0.0
    value = re.fullmatch(r"<interpreter>\n(\d+)\n</interpreter>", result.observation).group(1)
    result = env.step(f"So the answer is \\boxed{{{value}}}.")
    assert result.done and result.info.success and result.reward == 1.0
    assert not result.info.tool_call and result.info.extra["tool_calls"] == 1


def test_wrong_answer_is_minus_one(sandbox):
    env = make_env("python_math", {}, sandbox=sandbox)
    env.reset(1)
    result = env.step("\\boxed{-123456789}")
    assert result.done and not result.info.success and result.reward == -1.0
    with pytest.raises(EnvError):
        env.step("after the end")


def test_invalid_turns_and_turn_limit(sandbox):
    env = make_env("python_math", {"max_turns": 3}, sandbox=sandbox)
    env.reset(2)
    r1 = env.step("Hmm, thinking without code or answer.")
    assert r1.info.invalid_action and not r1.done and not r1.info.tool_call
    assert "<code></code>" in r1.observation
    r2 = env.step("<code>print('still going')</code>")
    assert r2.observation == "<interpreter>\nstill going\n</interpreter>" and not r2.done
    r3 = env.step("<code>print(1)</code>")
    assert r3.done and r3.info.truncated and r3.reward == -1.0 and not r3.info.success


def test_errors_and_timeouts_are_shown_to_the_model(sandbox):
    env = make_env("python_math", {"tool_timeout_s": 1.0, "max_output_chars": 200}, sandbox=sandbox)
    env.reset(3)
    r = env.step("<code>print('before'); 1/0</code>")
    assert "before" in r.observation and "ZeroDivisionError: division by zero" in r.observation
    assert r.info.tool_call and not r.info.invalid_action
    r = env.step("<code>import time; time.sleep(5)</code>")
    assert "TimeoutError" in r.observation and r.info.extra["timed_out"]
    r = env.step("<code>print('x' * 5000)</code>")
    assert "characters cut" in r.observation and len(r.observation) < 300
    r = env.step("<code>x = 1</code>")
    assert "no output" in r.observation


def test_fence_syntax_and_custom_observation(sandbox):
    opts = {"tool_call_syntax": "fence", "observation_template": "```output\n{output}\n```"}
    env = make_env("python_math", opts, sandbox=sandbox)
    env.reset(4)
    r = env.step("```python\nprint(6 * 7)\n```")
    assert r.observation == "```output\n42\n```" and r.info.tool_call


def test_data_file_rows_by_seed(sandbox, tmp_path):
    path = _write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": "What is 2^100 mod 997?", "answer": str(pow(2, 100, 997))},
            {"prompt": "What is 1/2 + 1/3?", "answer": "\\frac{5}{6}"},
        ],
    )
    env = make_env(
        "python_math", {"data_path": str(path), "include_instructions": False}, sandbox=sandbox
    )
    assert env.reset(0) == "What is 2^100 mod 997?"
    assert env.reset(3) == "What is 1/2 + 1/3?"
    result = env.step("<code>from fractions import Fraction as F; print(F(1,2)+F(1,3))</code>")
    assert "5/6" in result.observation
    result = env.step("\\boxed{5/6}")
    assert result.info.success and result.reward == 1.0


def test_data_file_is_hidden_from_the_tool(sandbox, tmp_path):
    gold = "gold-4913"
    path = _write_jsonl(tmp_path / "answers.jsonl", [{"prompt": "Guess.", "answer": gold}])
    env = make_env("python_math", {"data_path": str(path)}, sandbox=sandbox)
    assert str(path.resolve()) in sandbox.hidden_paths  # the client masks it wherever it lies
    env.reset(0)
    r = env.step(f"<code>print(open({str(path)!r}).read())</code>")
    assert gold not in r.observation and "FileNotFoundError" in r.observation
    # a sandbox without hide() (a stand-in that only runs code) is still accepted
    stand_in = type("StandIn", (), {"run_python": lambda self, code, timeout_s=None: None})()
    make_env("python_math", {"data_path": str(path)}, sandbox=stand_in)


def test_seeds_reproduce_observations(sandbox):
    def play(seed):
        env = make_env("python_math", {}, sandbox=sandbox)
        return [env.reset(seed), env.step("<code>print(sum(range(10)))</code>").observation]

    assert play(7) == play(7)
    assert play(7)[0] != play(8)[0]


def test_sandbox_failure_raises_env_error(sandbox):
    """A real infrastructure failure: the sandbox server is killed mid-call."""
    env = make_env("python_math", {"tool_timeout_s": 20.0}, sandbox=sandbox)
    env.reset(5)
    sandbox.run_python("print(1)")  # make sure the server is up
    pid = sandbox.server_pid

    def kill_soon():
        time.sleep(1.0)
        os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_soon)
    killer.start()
    with pytest.raises(EnvError, match="sandbox failed"):
        env.step("<code>import time; time.sleep(15)</code>")
    killer.join()
    assert sandbox.run_python("print(2)").stdout == "2\n"  # the client restarts its server


def test_hermes_json_tool_calls_run_and_malformed_ones_are_invalid(sandbox):
    env = make_env("python_math", {"tool_call_syntax": "hermes_json"}, sandbox=sandbox)
    obs = env.reset(5)
    assert "<tool_call>" in obs and '"name": "python"' in obs
    r = env.step('<tool_call>{"name": "python", "arguments": {"code": "print(6*7)"}}</tool_call>')
    assert r.observation == "<interpreter>\n42\n</interpreter>" and r.info.tool_call
    r = env.step('<tool_call>{"name": "python", "arguments": {"code": </tool_call>')
    assert r.info.invalid_action and not r.info.tool_call and not r.done
    assert "<tool_call>" in r.observation  # tells the model the expected format
