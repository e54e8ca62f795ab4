"""Scripted demonstrations: the envs' oracle agents, made deliberately noisy, as chat transcripts.

A demonstration is the conversation the agent loop would have had: the first user message is the
env's first observation (task rules + state), every assistant message is one action, every later
user message is the observation that action produced. No system message. The transcript ends with
the last assistant turn (the observation after it is never shown to the policy).

    generate_demos(env_name, seeds, options=None, noise=0.2, seed=0, sandbox=None, think=True)
    turn_windows(messages, history_turns=0) -> one short chat per assistant turn

Oracles: frozenlake re-plans a BFS shortest path from the current cell every turn; sokoban
re-solves with the env's BFS solver from the current state; python_math writes a short program
for the problem's family (read off the generated prompt), reads the interpreter's output, then
answers `\\boxed{...}`; textworld follows the game's walkthrough. With probability `noise` a turn
is a mistake instead: mostly a random move, sometimes an invalid action (grid envs), a
wrong/unchecked answer (python_math) or a command that changes nothing (textworld: look,
inventory, examine ...), so a policy cloned from them succeeds often but far from always. Same
arguments -> same demonstrations.

Grid turns (think=True) first note where things are, then act: `P1,3 G0,1 <action>Up</action>`
(row,column of the player and the goal, 0-based from the top-left; sokoban lists P, every box X
and every target O). A tiny model learns to read positions off the map far faster with this
short, directly supervised note than from the action alone (measured on frozenlake with a 0.9M
model: 400-800 steps without the note left action accuracy at chance, 25%; with it, 400 steps
reach ~75%), and the turn stays within 24 tokens.

Only the standard library and the envs are imported, so the tokenizer corpus can use this module
without torch.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from spear_ray.envs import make_env
from spear_ray.envs.frozenlake import shortest_path
from spear_ray.envs.python_math import PythonMathEnv
from spear_ray.envs.sokoban import solve as sokoban_solve

Message = dict[str, str]
DEMO_ENVS = ("frozenlake", "sokoban", "python_math", "textworld")
_MOVES = ("Up", "Down", "Left", "Right")
_INVALID = ("<action>Jump</action>", "<action>Stay</action>", "Right", "<action></action>")


@dataclass
class Demo:
    env: str
    seed: int
    messages: list[Message]
    success: bool
    info: dict[str, Any] = field(default_factory=dict)


def turn_windows(messages: list[Message], history_turns: int = 0) -> list[list[Message]]:
    """One short chat per assistant turn: the observation before it (plus `history_turns`
    earlier exchanges) and the turn itself, i.e. the per-step rows of verl-agent with a
    history window. They teach the observation -> action map at a fraction of the tokens of
    whole episodes."""
    out = []
    for k, m in enumerate(messages):
        if m["role"] == "assistant":
            out.append(messages[max(0, k - 1 - 2 * history_turns) : k + 1])
    return out


def action_message(move: str, tag: str = "action") -> str:
    return f"<{tag}>{move}</{tag}>"


def generate_demos(
    env_name: str,
    seeds: Iterable[int],
    options: Mapping[str, Any] | None = None,
    noise: float = 0.2,
    seed: int = 0,
    sandbox: Any = None,
    think: bool = True,
) -> list[Demo]:
    """One noisy oracle demonstration per env seed. `seed` drives the noise only.

    `think` (grid envs): each turn starts with a short note of where things are, e.g.
    `P1,3 G0,1 <action>Up</action>` (row,column from the top-left, 0-based).
    """
    if env_name not in DEMO_ENVS:
        raise ValueError(f"no demonstrator for env {env_name!r}; known: {', '.join(DEMO_ENVS)}")
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be in [0, 1], got {noise}")
    one = {
        "frozenlake": frozenlake_demo,
        "sokoban": sokoban_demo,
        "python_math": math_demo,
        "textworld": textworld_demo,
    }
    demos = []
    for env_seed in seeds:
        rng = random.Random(f"demo:{env_name}:{seed}:{env_seed}")
        demos.append(one[env_name](env_seed, dict(options or {}), noise, rng, sandbox, think))
    return demos


def _noisy_move(rng: random.Random, tag: str, invalid_share: float = 0.2) -> str:
    if rng.random() < invalid_share:
        return rng.choice(_INVALID).replace("action>", f"{tag}>")
    return action_message(rng.choice(_MOVES), tag)


def _play(env_name: str, env, first_obs: str, seed: int, choose) -> Demo:
    """Run `choose(env) -> assistant text` until the episode ends."""
    messages: list[Message] = [{"role": "user", "content": first_obs}]
    while True:
        text = choose(env)
        messages.append({"role": "assistant", "content": text})
        result = env.step(text)
        if result.done:
            env.close()
            return Demo(env_name, seed, messages, result.info.success)
        messages.append({"role": "user", "content": result.observation})


def _at(symbol: str, pos: tuple[int, int]) -> str:
    return f"{symbol}{pos[0]},{pos[1]}"


def _grid_demo(
    env_name: str,
    env_seed: int,
    options: dict,
    noise: float,
    rng: random.Random,
    think: bool,
    look: Callable[[Any], tuple[list[str] | None, list[str]]],
) -> Demo:
    """The grid envs' oracle: `look(env) -> (plan, things)` gives the moves left to the goal (or
    None) and the positions the think note lists; with probability `noise` the turn is a mistake."""
    env = make_env(env_name, options)
    obs = env.reset(env_seed)
    tag = env.options.action_tag

    def choose(env) -> str:
        plan, things = look(env)
        note = " ".join(things) + " " if think else ""
        if not plan or rng.random() < noise:
            return note + _noisy_move(rng, tag)
        return note + action_message(plan[0].capitalize(), tag)

    return _play(env_name, env, obs, env_seed, choose)


def frozenlake_demo(
    env_seed: int,
    options: dict,
    noise: float,
    rng: random.Random,
    sandbox: Any = None,
    think: bool = True,
) -> Demo:
    def look(env) -> tuple[list[str] | None, list[str]]:
        plan = shortest_path(env.options.size, env.holes, env.player, env.goal)
        return plan, [_at("P", env.player), _at("G", env.goal)]

    return _grid_demo("frozenlake", env_seed, options, noise, rng, think, look)


def sokoban_demo(
    env_seed: int,
    options: dict,
    noise: float,
    rng: random.Random,
    sandbox: Any = None,
    think: bool = True,
) -> Demo:
    cache: dict[tuple, list[str] | None] = {}

    def look(env) -> tuple[list[str] | None, list[str]]:
        key = (env.boxes, env.player)
        if key not in cache:
            state = dataclasses.replace(env.level, boxes=env.boxes, player=env.player)
            cache[key] = sokoban_solve(state, max_states=20_000)
        things = [_at("P", env.player)]
        things += [_at("X", b) for b in sorted(env.boxes)]
        things += [_at("O", t) for t in sorted(env.level.targets)]
        return cache[key], things

    return _grid_demo("sokoban", env_seed, options, noise, rng, think, look)


# ---------------------------------------------------------------- python_math

_INT = r"(-?\d+)"


def _sieve(n_name: str) -> str:
    return (
        f"s = bytearray([1]) * {n_name}\ns[0] = s[1] = 0\n"
        f"for i in range(2, int({n_name} ** 0.5) + 1):\n"
        f"    if s[i]:\n        s[i * i :: i] = bytearray(len(range(i * i, {n_name}, i)))\n"
    )


# (family, prompt regex, program template); the program prints the answer.
_PROGRAMS: dict[str, tuple[str, str]] = {
    "modpow": (rf"\${_INT}\^\{{{_INT}\}}\$ is divided by \${_INT}\$", "print(pow({0}, {1}, {2}))"),
    "digit_sum_pow": (
        rf"digits of \${_INT}\^\{{{_INT}\}}\$",
        "print(sum(map(int, str({0} ** {1}))))",
    ),
    "big_product": (rf"Compute \${_INT} \\times {_INT}\$", "print({0} * {1})"),
    "divisors": (
        rf"divisors does \${_INT}\$",
        "n = {0}\nc = 0\nd = 1\nwhile d * d <= n:\n    if n % d == 0:\n"
        "        c += 1 if d * d == n else 2\n    d += 1\nprint(c)",
    ),
    "prime_count": (rf"less than \${_INT}\$\?", "n = {0}\n" + _sieve("n") + "print(sum(s))"),
    "multiples_sum": (
        rf"less than \${_INT}\$ that are multiples of \${_INT}\$ or \${_INT}\$",
        "print(sum(k for k in range(1, {0}) if k % {1} == 0 or k % {2} == 0))",
    ),
    "fibonacci": (
        rf"What is \$F_\{{{_INT}\}}\$ modulo \${_INT}\$",
        "a, b = 0, 1\nfor _ in range({0}):\n    a, b = b, (a + b) % {1}\nprint(a)",
    ),
    "digit_sum_count": (
        rf"\\le n \\le {_INT}\$ have digit sum exactly \${_INT}\$",
        "print(sum(1 for k in range(1, {0} + 1) if sum(map(int, str(k))) == {1}))",
    ),
    "collatz": (
        rf"Starting from \${_INT}\$",
        "n = {0}\nsteps = 0\nwhile n != 1:\n    n = n // 2 if n % 2 == 0 else 3 * n + 1\n"
        "    steps += 1\nprint(steps)",
    ),
    "lattice_points": (
        rf"x\^2 \+ y\^2 \\le {_INT}\$",
        "import math\nr = math.isqrt({0})\n"
        "print(sum(2 * math.isqrt({0} - x * x) + 1 for x in range(-r, r + 1)))",
    ),
    "telescoping": (
        rf"\\sum_\{{k=1\}}\^\{{{_INT}\}} \\frac\{{1\}}\{{(?:k\(k\+1\)|\(k\+\d+\)\(k\+{_INT}\))\}}",
        "from fractions import Fraction\n"
        "print(sum(Fraction(1, (k + {a} - 1) * (k + {a})) for k in range(1, {0} + 1)))",
    ),
    "binomial_mod": (
        rf"\\binom\{{{_INT}\}}\{{{_INT}\}}\$ modulo \${_INT}\$",
        "import math\nprint(math.comb({0}, {1}) % {2})",
    ),
    "coin_change": (
        rf"exactly \${_INT}\$ cents with unlimited coins worth ([\d, ]+) cents",
        "ways = [1] + [0] * {0}\nfor c in [{1}]:\n    for v in range(c, {0} + 1):\n"
        "        ways[v] += ways[v - c]\nprint(ways[{0}])",
    ),
    "totients": (
        rf"\\sum_\{{k=1\}}\^\{{{_INT}\}} \\varphi\(k\)",
        "n = {0}\nphi = list(range(n + 1))\nfor i in range(2, n + 1):\n    if phi[i] == i:\n"
        "        for j in range(i, n + 1, i):\n            phi[j] -= phi[j] // i\n"
        "print(sum(phi[1:]))",
    ),
    "prime_squares": (
        rf"squares of the first \${_INT}\$ prime",
        "n = {0}\nm = 100\nwhile True:\n"
        + "".join("    " + ln + "\n" for ln in _sieve("m").splitlines())
        + "    p = [i for i in range(m) if s[i]]\n"
        "    if len(p) >= n:\n        break\n    m *= 2\nprint(sum(q * q for q in p[:n]))",
    ),
}


def math_program(prompt: str, source: str, answer: str) -> str:
    """A short Python program that prints the answer of a generated problem.

    The family comes from the problem's `source` ("generated:L2:fibonacci") and its numbers are
    read off the prompt. Problems from data files (no known family) get `print(answer)`.
    """
    family = source.rsplit(":", 1)[-1] if source.startswith("generated:") else ""
    if family in _PROGRAMS:
        pattern, template = _PROGRAMS[family]
        m = re.search(pattern, prompt)
        if m is not None:
            groups = [g for g in m.groups() if g is not None]
            if family == "telescoping":
                a = int(groups[1]) if len(groups) > 1 else 1
                return template.format(groups[0], a=a)
            if family == "coin_change":
                return template.format(groups[0], groups[1].strip())
            return template.format(*groups)
    return f"print({answer!r})" if not _is_number(answer) else f"print({answer})"


def _is_number(text: str) -> bool:
    return re.fullmatch(r"-?\d+", text.strip()) is not None


def expected_output(answer: str) -> str:
    """What `math_program` prints for a generator answer (a `\\frac{p}{q}` prints as p/q)."""
    m = re.fullmatch(r"\\frac\{(-?\d+)\}\{(\d+)\}", answer.strip())
    if m:
        return str(Fraction(int(m.group(1)), int(m.group(2))))
    return answer


def _boxed_from_output(output: str) -> str:
    text = output.strip().splitlines()[-1].strip() if output.strip() else ""
    m = re.fullmatch(r"(-?\d+)/(\d+)", text)
    return f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}" if m else text


def _wrong(answer: str, rng: random.Random) -> str:
    if _is_number(answer):
        return str(int(answer) + rng.choice([-2, -1, 1, 2, 10]))
    return answer + "1"


def math_demo(
    env_seed: int,
    options: dict,
    noise: float,
    rng: random.Random,
    sandbox: Any = None,
    think: bool = True,
) -> Demo:
    """Tool call, interpreter output, boxed answer. Without a sandbox the output is the known
    answer (what the program prints); with one the program really runs."""
    from spear_ray.envs.python_math import PythonMathOptions

    env = PythonMathEnv(PythonMathOptions.model_validate(options), _Interp(sandbox))
    obs = env.reset(env_seed)
    problem = env.problem
    assert problem is not None
    o = env.options
    code = math_program(problem.prompt, problem.source, problem.answer)
    env.sandbox.expected = expected_output(problem.answer)
    messages: list[Message] = [{"role": "user", "content": obs}]

    def say(text: str):
        messages.append({"role": "assistant", "content": text})
        return env.step(text)

    if rng.random() < noise / 2:  # a guess without running code
        result = say(f"The answer is \\boxed{{{_wrong(problem.answer, rng)}}}.")
    else:
        if o.tool_call_syntax == "fence":
            result = say(f"```python\n{code}\n```")
        else:
            result = say(f"<{o.code_tag}>\n{code}\n</{o.code_tag}>")
        if not result.done:
            messages.append({"role": "user", "content": result.observation})
            boxed = _boxed_from_output(env.sandbox.last_output)
            if rng.random() < noise / 2:  # misread the output
                boxed = _wrong(boxed, rng)
            result = say(f"\\boxed{{{boxed}}}")
    return Demo("python_math", env_seed, messages, result.info.success, {"source": problem.source})


class _Interp:
    """The real sandbox when given; else a stand-in that 'prints' the known answer."""

    def __init__(self, sandbox: Any):
        self.sandbox = sandbox
        self.expected = ""
        self.last_output = ""

    def run_python(self, code: str, timeout_s: float | None = None):
        from spear_ray.sandbox.result import ExecResult

        if self.sandbox is not None:
            result = self.sandbox.run_python(code, timeout_s=timeout_s)
        else:
            result = ExecResult(
                stdout=self.expected + "\n", stderr="", exit_code=0, timed_out=False, wall_s=0.0
            )
        self.last_output = result.stdout
        return result


# ---------------------------------------------------------------- textworld

_TW_ENVS: dict[str, Any] = {}
_TW_IDLE = re.compile(r"^(look|inventory|examine .+)$")  # commands that leave the state as it is


def textworld_demo(
    env_seed: int,
    options: dict,
    noise: float,
    rng: random.Random,
    sandbox: Any = None,
    think: bool = True,
) -> Demo:
    """The game's walkthrough, one command per turn. A noisy turn is a command that changes
    nothing (look / inventory / examine X, from the admissible list) or, a fifth of the time, an
    action without its tag; either way the walkthrough goes on where it was."""
    key = repr(sorted(options.items()))
    if key not in _TW_ENVS:  # one env (and its loaded game sets) per options, not per demo
        _TW_ENVS[key] = make_env("textworld", options)
    env = _TW_ENVS[key]
    obs = env.reset(env_seed)
    tag = env.options.action_tag
    plan = list(env.walkthrough)

    def choose(env) -> str:
        if plan and rng.random() >= noise:
            return action_message(plan.pop(0), tag)
        if rng.random() < 0.2:
            return rng.choice(("look", f"<{tag}></{tag}>", "go north"))
        idle = [c for c in env._commands() if _TW_IDLE.match(c)] or ["look"]
        return action_message(rng.choice(idle), tag)

    return _play("textworld", env, obs, env_seed, choose)
