"""Math with a sandboxed Python interpreter as a tool (SPEAR's math-with-code recipe).

A turn of the model is one of:
- a tool call: code inside `<code>...</code>` (tag syntax; a ```python fence inside the tag is
  stripped) or inside ```python ... ``` blocks (fence syntax). All code blocks of one turn run
  as one program in a fresh interpreter; the observation is its stdout (and stderr on failure),
  wrapped by `observation_template` (default `<interpreter>...</interpreter>`). An unclosed last
  block counts up to the end of the turn, since engines usually drop a stop string such as
  `</code>` from the output.
- a final answer: `\\boxed{...}` outside code. When a turn has both, whichever comes last wins.
  The episode ends with `correct_reward` (+1) or `wrong_reward` (-1).
- neither: an invalid action (the caller penalises it); the episode goes on and the turn counts.
After `max_turns` turns without an answer the episode ends with `wrong_reward`, truncated.

`reset(seed)` picks the problem: from the built-in generator (seed and `levels` decide it), or
row `seed % len(data)` of `data_path`. A sandbox failure (ExecResult.infra_error) raises EnvError:
the trajectory is an infrastructure failure, not a wrong answer.
"""

from __future__ import annotations

import json
import random
import re
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

from spear_ray.envs.answer_check import bounded_answers_match
from spear_ray.envs.base import EnvError, EnvInfo, StepResult
from spear_ray.envs.math_data import (
    LEVELS,
    MathProblem,
    generate_problem,
    load_problems_cached,
)
from spear_ray.envs.math_verifier import VerifierName, find_boxed
from spear_ray.sandbox.result import ExecResult

ENV_NAME = "python_math"
DESCRIPTION = (
    "Math problems solved with a sandboxed Python tool; answer in \\boxed{}; +1 correct / -1 wrong."
)

DEFAULT_PROMPT = (
    "Solve the following math problem. You can run Python code by writing it {tool_usage};"
    " the interpreter's output comes back inside"
    " <interpreter></interpreter> tags. Print what you want to see. Each run starts a fresh"
    " interpreter. When you are done, give the final answer as \\boxed{{ANSWER}}.\n\n"
    "Problem: {problem}"
)


class PythonSandbox(Protocol):
    """What python_math needs from a sandbox (spear_ray.sandbox.SandboxClient has it). A sandbox
    that also has `hide(*paths)` is given `data_path`, so the model's code cannot read the gold
    answers from it."""

    def run_python(self, code: str, timeout_s: float | None = None) -> ExecResult: ...


class PythonMathOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    max_turns: int = Field(
        8, ge=1, description="Turns (tool calls + answer) before the episode ends."
    )
    levels: tuple[int, ...] = Field(
        (1, 2, 3), min_length=1, description="Generator difficulty levels (1-4) drawn from by seed."
    )
    data_path: str | None = Field(
        None, description="A .jsonl/.parquet file or HF datasets dir of problems; None = generator."
    )
    data_split: str | None = Field(None, description="Split of a HF DatasetDict directory.")
    prompt_field: str = Field(
        "prompt", description="Row field with the problem (str or chat list)."
    )
    answer_field: str = Field(
        "auto", description="Row field with the answer; auto = answer / reward_model.ground_truth."
    )
    tool_call_syntax: Literal["tag", "fence", "hermes_json"] = Field(
        "tag",
        description="Code as <code_tag>...</code_tag> (tag), ```python blocks (fence), or a "
        'Qwen/Hermes <tool_call>{"name": "python", "arguments": {"code": ...}}</tool_call>.',
    )
    code_tag: str = Field(
        "code",
        pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$",
        description="Tag name of a tool call when tool_call_syntax=tag.",
    )
    observation_template: str = Field(
        "<interpreter>\n{output}\n</interpreter>",
        description="How a tool result is shown to the model; must contain {output}.",
    )
    include_instructions: bool = Field(
        True, description="Wrap the problem in prompt_template; False = the bare problem text."
    )
    prompt_template: str = Field(
        DEFAULT_PROMPT,
        description="First observation; {problem}, {tool_usage} and {code_tag} are filled in "
        "({{ }} = brace).",
    )
    tool_timeout_s: float = Field(30.0, gt=0, description="Wall-clock limit of one code run.")
    max_output_chars: int = Field(
        2000, ge=64, description="Tool output longer than this is cut (head and tail kept)."
    )
    verifier: VerifierName = Field(
        "auto", description="Answer checker: auto (math-verify if installed, else sympy)."
    )
    verifier_timeout_s: float = Field(
        0.5,
        gt=0,
        le=60,
        description="Time budget of one answer's symbolic check (in a child process); past it "
        "the answer is wrong. Crafted answers (2^{10^9}, 10^9!) would otherwise hang a reward.",
    )
    verifier_memory_mb: int = Field(
        512,
        ge=128,
        description="Address-space limit (MB) of the answer-checking child process; an answer "
        "whose check needs more is wrong.",
    )
    correct_reward: float = Field(1.0, description="Task reward for a correct final answer.")
    wrong_reward: float = Field(-1.0, description="Task reward for a wrong or missing answer.")

    @field_validator("levels")
    @classmethod
    def _known_levels(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        bad = [lv for lv in v if lv not in LEVELS]
        if bad:
            raise ValueError(f"levels {bad} unknown; the generator has levels {list(LEVELS)}")
        return v

    @field_validator("observation_template")
    @classmethod
    def _has_output(cls, v: str) -> str:
        if "{output}" not in v:
            raise ValueError("observation_template must contain {output}")
        return v

    @field_validator("prompt_template")
    @classmethod
    def _has_problem(cls, v: str) -> str:
        if "{problem}" not in v:
            raise ValueError("prompt_template must contain {problem}")
        return v


OPTIONS_MODEL = PythonMathOptions

_FENCE = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


_TOOL_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)
# Names a Hermes-style call may give the interpreter tool.
PYTHON_TOOL_NAMES = ("python", "code_interpreter", "python_interpreter")


def hermes_code(payload: str) -> str:
    """The code of one `<tool_call>` JSON payload, or "" when it is malformed (an invalid action:
    bad JSON, another tool's name, or no string `arguments.code`)."""
    try:
        call = json.loads(payload)
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):  # some models emit the arguments as a JSON string
            arguments = json.loads(arguments)
        code = arguments.get("code")
    except (ValueError, AttributeError):
        return ""
    if call.get("name") not in PYTHON_TOOL_NAMES or not isinstance(code, str):
        return ""
    return code


def tool_usage(syntax: str, tag: str) -> str:
    """How the prompt tells the model to call the interpreter."""
    if syntax == "fence":
        return "in a ```python block"
    if syntax == "hermes_json":
        return (
            'as <tool_call>{"name": "python", "arguments": {"code": "YOUR CODE"}}</tool_call>'
            " (JSON)"
        )
    return f"inside <{tag}></{tag}> tags"


def find_code(text: str, syntax: str, tag: str) -> list[tuple[int, int, str]]:
    """(start, end, code) of every code block of a turn ("" code for a malformed tool call)."""
    if syntax == "fence":
        return [(m.start(), m.end(), m.group(1)) for m in _FENCE.finditer(text)]
    if syntax == "hermes_json":
        return [(m.start(), m.end(), hermes_code(m.group(1))) for m in _TOOL_CALL.finditer(text)]
    blocks = []
    pattern = re.compile(rf"<{re.escape(tag)}>(.*?)(?:</{re.escape(tag)}>|\Z)", re.DOTALL)
    for m in pattern.finditer(text):
        code = m.group(1)
        fenced = _FENCE.search(code)
        blocks.append((m.start(), m.end(), fenced.group(1) if fenced else code))
    return blocks


def parse_turn(text: str, syntax: str, tag: str) -> tuple[str, str | None]:
    """("answer", boxed) / ("code", program) / ("invalid", None) for one model turn."""
    blocks = find_code(text, syntax, tag)
    boxed = [b for b in find_boxed(text) if not any(s <= b[0] < e for s, e, _ in blocks)]
    last_code_end = blocks[-1][1] if blocks else -1
    if boxed and boxed[-1][0] >= last_code_end:
        return "answer", boxed[-1][2].strip()
    program = "\n".join(code.strip("\n") for _, _, code in blocks if code.strip())
    if program.strip():
        return "code", program
    return "invalid", None


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    head = limit * 2 // 3
    tail = limit - head
    return f"{text[:head]}\n...[{len(text) - limit} characters cut]...\n{text[-tail:]}"


def format_result(result: ExecResult, timeout_s: float, limit: int) -> str:
    """The interpreter's reply as the model sees it."""
    out = result.stdout
    if result.timed_out:
        out += f"\nTimeoutError: the code ran longer than {timeout_s:g} seconds."
    elif result.exit_code != 0:
        out += ("\n" if out and not out.endswith("\n") else "") + result.stderr
    if result.stdout_truncated or result.stderr_truncated:
        out += "\n[output truncated]"
    out = out.strip("\n")
    return _clip(out, limit) if out else "(no output; use print() to see values)"


class PythonMathEnv:
    @property
    def stop_strings(self) -> tuple[str, ...]:
        """Generation stops right after a closed tool call, so the tool can run. (A ```python
        fence closes with the same ``` that opens it, so fence syntax has no stop string.)"""
        o = self.options
        return {"tag": (f"</{o.code_tag}>",), "hermes_json": ("</tool_call>",)}.get(
            o.tool_call_syntax, ()
        )

    def __init__(self, options: PythonMathOptions, sandbox: PythonSandbox):
        if not callable(getattr(sandbox, "run_python", None)):
            raise TypeError("python_math needs a sandbox object with run_python(code, timeout_s)")
        self.options = options
        self.sandbox = sandbox
        self.problems: tuple[MathProblem, ...] | None = None
        if options.data_path:
            self.problems = load_problems_cached(
                options.data_path, options.prompt_field, options.answer_field, options.data_split
            )
            hide = getattr(sandbox, "hide", None)
            if callable(hide):  # a policy that prints its own problem's answer is reward hacking
                hide(options.data_path)
        self.problem: MathProblem | None = None
        self.turns = 0
        self.tool_calls = 0
        self.done = True

    def problem_for(self, seed: int) -> MathProblem:
        if self.problems is not None:
            return self.problems[seed % len(self.problems)]
        levels = self.options.levels
        level = levels[random.Random(f"python_math-level:{seed}").randrange(len(levels))]
        return generate_problem(seed, level)

    def reset(self, seed: int) -> str:
        o = self.options
        self.problem = self.problem_for(seed)
        self.turns = 0
        self.tool_calls = 0
        self.done = False
        if not o.include_instructions:
            return self.problem.prompt
        # replace, not str.format: problems are full of LaTeX braces
        text = o.prompt_template.replace("{problem}", "\0PROBLEM\0")
        text = text.replace("{tool_usage}", tool_usage(o.tool_call_syntax, o.code_tag))
        text = text.replace("{code_tag}", o.code_tag).replace("{{", "{").replace("}}", "}")
        return text.replace("\0PROBLEM\0", self.problem.prompt)

    def step(self, action_text: str) -> StepResult:
        if self.done or self.problem is None:
            raise EnvError("python_math: step() called before reset() or after the episode ended")
        o = self.options
        self.turns += 1
        kind, content = parse_turn(action_text, o.tool_call_syntax, o.code_tag)
        extra: dict = {"turn": self.turns, "kind": kind, "source": self.problem.source}
        if kind == "answer":
            correct = bounded_answers_match(
                content,
                self.problem.answer,
                o.verifier,
                timeout_s=o.verifier_timeout_s,
                memory_mb=o.verifier_memory_mb,
            )
            self.done = True
            extra.update(answer=content, gold=self.problem.answer, tool_calls=self.tool_calls)
            reward = o.correct_reward if correct else o.wrong_reward
            obs = "Correct." if correct else "Incorrect."
            info = EnvInfo(success=correct, anchor=obs, extra=extra)
            return StepResult(obs, reward, True, info)
        if kind == "code":
            result = self.sandbox.run_python(content, timeout_s=o.tool_timeout_s)
            if result.infra_error:
                raise EnvError(f"python_math: sandbox failed: {result.infra_error}")
            self.tool_calls += 1
            output = format_result(result, o.tool_timeout_s, o.max_output_chars)
            obs = o.observation_template.replace("{output}", output)
            extra.update(exit_code=result.exit_code, timed_out=result.timed_out)
        else:
            obs = (
                "No code to run and no final answer found. Run Python"
                f" {tool_usage(o.tool_call_syntax, o.code_tag)} or give the final answer as"
                " \\boxed{ANSWER}."
            )
        truncated = self.turns >= o.max_turns
        self.done = truncated
        if truncated:
            extra.update(answer=None, gold=self.problem.answer, tool_calls=self.tool_calls)
        info = EnvInfo(
            success=False,
            invalid_action=kind == "invalid",
            tool_call=kind == "code",
            anchor=obs,
            truncated=truncated,
            extra=extra,
        )
        return StepResult(obs, o.wrong_reward if truncated else 0.0, truncated, info)

    def close(self) -> None:
        self.done = True


def make(options: PythonMathOptions, sandbox: PythonSandbox | None = None) -> PythonMathEnv:
    if sandbox is None:
        raise TypeError(
            "python_math needs a sandbox client: make_env('python_math', options, sandbox=client)"
            " with client = spear_ray.sandbox.SandboxClient(SandboxConfig())"
        )
    return PythonMathEnv(options, sandbox)
