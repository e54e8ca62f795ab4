"""The per-trajectory agent loop: generate, act, observe, repeat — each trajectory on its own.

    trajectory = await run_episode(engine, env, chat, settings, task=task, sample_index=k)

Every trajectory advances independently (no turn barrier across the batch): while one waits for
its sandbox call, the engine keeps batching the others' generations. Env calls run on threads
(`env_executor`, an `EnvThreads` in a rollout worker) so a slow tool never blocks the event loop.

Failures: an exception from the env (including a sandbox infrastructure error) or the engine,
one env call past `env_call_timeout_s`, one generation past `generate_timeout_s`, or the
trajectory's wall-clock timeout, marks the trajectory as an infrastructure failure
(`Trajectory.failure`), which the controller excludes from group statistics. It is never a
scored zero. Invalid actions are normal: the env flags them and the loop adds the penalty.

Hung env calls: a Python thread cannot be killed, so an env call past its timeout is abandoned,
not stopped. `EnvThreads` runs every env call on its own daemon thread: an abandoned call holds
only that thread (no pool slot that later calls wait for, and it never blocks process exit), and
`EnvThreads.hung()` counts the abandoned calls still running. The rollout worker reports that
count and restarts its process past `rollout.max_hung_env_threads` (a process restart is the
only way to free a thread stuck in a call).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import threading
import time
import traceback
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from pathlib import Path

from spear_ray.agent.chat import ChatFormat
from spear_ray.containers import RewardParts, Trajectory
from spear_ray.engines.base import Engine, SamplingSpec
from spear_ray.envs.base import StepResult, TextEnv


@dataclass(frozen=True)
class Task:
    """One prompt of a step: G samples of it form a group sharing the env seed."""

    task_id: str
    group_id: int
    env_seed: int
    num_samples: int


@dataclass(frozen=True)
class EpisodeSettings:
    max_tokens_per_turn: int
    max_response_tokens: int
    max_prompt_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    invalid_action_penalty: float = -0.1
    trajectory_timeout_s: float = 600.0
    env_call_timeout_s: float | None = None  # one env reset/step (None: only the trajectory's)
    generate_timeout_s: float | None = None  # one engine.generate call
    sampling_seed: int | None = None  # base of per-request seeds (None = engine's own RNG)


@dataclass
class _Episode:
    """Mutable state of one trajectory while it runs."""

    token_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    turn_spans: list[tuple[int, int]] = field(default_factory=list)
    turn_anchors: list[str | None] = field(default_factory=list)
    turn_rewards: list[float] = field(default_factory=list)
    turn_texts: list[str] = field(default_factory=list)
    turn_invalid: list[bool] = field(default_factory=list)
    task_reward: float = 0.0
    invalid_actions: int = 0
    tool_calls: int = 0
    success: bool = False
    finished: bool = False
    prompt_length: int = 0
    weight_versions: list[int] = field(default_factory=list)
    timings: dict[str, float] = field(
        default_factory=lambda: {"generate_s": 0.0, "env_s": 0.0, "total_s": 0.0}
    )
    extra: dict = field(default_factory=dict)

    def append(self, ids: list[int], *, generated: bool, logprobs: list[float] | None = None):
        self.token_ids += ids
        self.loss_mask += [1 if generated else 0] * len(ids)
        self.logprobs += logprobs if generated and logprobs is not None else [0.0] * len(ids)


def stable_seed(*parts: object) -> int:
    """A 31-bit seed from the parts, the same in every process (unlike hash() of a str)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


class CallTimeout(Exception):
    """One env call or generation ran past its own timeout (an infrastructure failure)."""


class EnvThreads(Executor):
    """An executor that runs each call on a new daemon thread (see the module docstring).

    A thread per call costs tens of microseconds, nothing next to a generation; in exchange a
    hung call never occupies a slot other calls need, and a hung thread never blocks the exit of
    the process. `hung()` is the number of calls still running `hung_after_s` after they began.
    """

    def __init__(self, hung_after_s: float, name: str = "env"):
        self.hung_after_s = hung_after_s
        self._name = name
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._started: dict[int, float] = {}  # call id -> monotonic start, while it runs
        self._closed = False

    def submit(self, fn, /, *args, **kwargs) -> Future:
        if self._closed:
            raise RuntimeError("EnvThreads: submit after shutdown")
        future: Future = Future()
        call = next(self._ids)

        def run() -> None:
            try:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(*args, **kwargs))
                    except BaseException as err:  # delivered to the awaiting coroutine
                        future.set_exception(err)
            finally:
                with self._lock:
                    self._started.pop(call, None)

        with self._lock:
            self._started[call] = time.monotonic()
        threading.Thread(target=run, name=f"{self._name}-{call}", daemon=True).start()
        return future

    def running(self) -> int:
        with self._lock:
            return len(self._started)

    def hung(self) -> int:
        limit = time.monotonic() - self.hung_after_s
        with self._lock:
            return sum(started < limit for started in self._started.values())

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        # Running calls cannot be stopped; their daemon threads end with their call.
        self._closed = True


async def _with_timeout(awaitable, timeout_s: float | None, what: str):
    if timeout_s is None:
        return await awaitable
    try:
        return await asyncio.wait_for(awaitable, timeout=timeout_s)
    except TimeoutError:  # (the trajectory's own timeout reaches this as a CancelledError)
        raise CallTimeout(f"timeout: {what} exceeded {timeout_s:g}s") from None


async def _call_env(executor: Executor | None, fn, *args, timeout_s=None, what="env call"):
    call = asyncio.get_running_loop().run_in_executor(executor, fn, *args)
    return await _with_timeout(call, timeout_s, what)


async def _play(
    engine: Engine,
    env: TextEnv,
    chat: ChatFormat,
    s: EpisodeSettings,
    task: Task,
    sample_index: int,
    ep: _Episode,
    executor: Executor | None,
) -> None:
    t0 = time.perf_counter()
    observation = await _call_env(
        executor, env.reset, task.env_seed, timeout_s=s.env_call_timeout_s, what="env.reset"
    )
    ep.timings["env_s"] += time.perf_counter() - t0
    prompt = chat.prompt_ids(observation)
    if len(prompt) > s.max_prompt_tokens:
        raise PromptTooLong(
            f"prompt of task {task.task_id} has {len(prompt)} tokens > "
            f"rollout.max_prompt_tokens={s.max_prompt_tokens}"
        )
    ep.append(prompt, generated=False)
    ep.prompt_length = len(prompt)
    stop_strings = tuple(getattr(env, "stop_strings", ()))
    turn = 0
    while True:
        budget = s.max_response_tokens - (len(ep.token_ids) - ep.prompt_length)
        if budget <= 0:
            ep.extra["ended_by"] = "response_token_budget"
            return
        seed = None
        if s.sampling_seed is not None:
            seed = stable_seed(s.sampling_seed, task.task_id, sample_index, turn)
        spec = SamplingSpec(
            max_tokens=min(s.max_tokens_per_turn, budget),
            temperature=s.temperature,
            top_p=s.top_p,
            stop_token_ids=chat.stop_token_ids(),
            stop_strings=stop_strings,
            seed=seed,
        )
        t0 = time.perf_counter()
        gen = await _with_timeout(
            engine.generate(list(ep.token_ids), spec), s.generate_timeout_s, "engine.generate"
        )
        ep.timings["generate_s"] += time.perf_counter() - t0
        start = len(ep.token_ids)
        ep.append(gen.token_ids, generated=True, logprobs=gen.logprobs)
        ep.turn_spans.append((start, len(ep.token_ids)))
        ep.weight_versions.append(gen.weight_version)
        text = chat.tokenizer.decode(gen.token_ids, skip_special_tokens=True)
        ep.turn_texts.append(text)  # the Dr.BoT filters judge each turn's text (experience.py)
        t0 = time.perf_counter()
        result: StepResult = await _call_env(
            executor, env.step, text, timeout_s=s.env_call_timeout_s, what="env.step"
        )
        ep.timings["env_s"] += time.perf_counter() - t0
        info = result.info
        ep.task_reward += result.reward
        penalty = s.invalid_action_penalty if info.invalid_action else 0.0
        ep.turn_rewards.append(result.reward + penalty)
        ep.turn_anchors.append(info.anchor)
        ep.turn_invalid.append(bool(info.invalid_action))
        ep.invalid_actions += int(info.invalid_action)
        ep.tool_calls += int(info.tool_call)
        ep.success = info.success
        turn += 1
        if result.done:
            ep.finished = True
            ep.extra["ended_by"] = "truncated" if info.truncated else "done"
            ep.extra = {**info.extra, **ep.extra}
            return
        between = chat.turn_close_ids(gen.token_ids) + chat.observation_ids(result.observation)
        if len(ep.token_ids) - ep.prompt_length + len(between) >= s.max_response_tokens:
            ep.extra["ended_by"] = "response_token_budget"
            return
        ep.append(between, generated=False)


class PromptTooLong(ValueError):
    pass


def _where(err: BaseException) -> str:
    """' (at file:line in function)' of the frame that raised `err`, so an infrastructure
    failure's one line says where it came from."""
    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return ""
    last = frames[-1]
    return f" (at {Path(last.filename).name}:{last.lineno} in {last.name})"


async def run_episode(
    engine: Engine,
    env: TextEnv,
    chat: ChatFormat,
    settings: EpisodeSettings,
    *,
    task: Task,
    sample_index: int,
    env_executor: Executor | None = None,
) -> Trajectory:
    """Play one trajectory of `task` to the end and return it (never raises for env, engine
    or timeout failures: those come back as `Trajectory.failure`)."""
    ep = _Episode()
    failure: str | None = None
    t0 = time.perf_counter()
    try:
        await asyncio.wait_for(
            _play(engine, env, chat, settings, task, sample_index, ep, env_executor),
            timeout=settings.trajectory_timeout_s,
        )
    except asyncio.TimeoutError:
        failure = f"timeout: trajectory exceeded {settings.trajectory_timeout_s:g}s"
    except asyncio.CancelledError:
        raise
    except CallTimeout as err:
        failure = str(err)
    except Exception as err:  # any env/engine failure is an infrastructure failure
        failure = f"{type(err).__name__}: {err}".splitlines()[0][:500] + _where(err)
    ep.timings["total_s"] = time.perf_counter() - t0
    # A failed episode may have stopped anywhere; keep its arrays consistent for the record.
    if len(ep.turn_spans) > len(ep.turn_rewards):
        ep.turn_rewards.append(0.0)
        ep.turn_anchors.append(None)
        ep.turn_invalid.append(False)
    ep.turn_texts += [""] * (len(ep.turn_spans) - len(ep.turn_texts))
    return Trajectory(
        task_id=task.task_id,
        group_id=task.group_id,
        env_seed=task.env_seed,
        prompt_length=ep.prompt_length,
        token_ids=ep.token_ids,
        loss_mask=ep.loss_mask,
        behaviour_logprobs=ep.logprobs,
        turn_spans=ep.turn_spans,
        rewards=RewardParts(
            task=ep.task_reward,
            invalid_penalty=settings.invalid_action_penalty * ep.invalid_actions,
        ),
        tool_calls=ep.tool_calls,
        invalid_actions=ep.invalid_actions,
        success=ep.success,
        finished=ep.finished,
        turn_anchors=ep.turn_anchors,
        turn_rewards=ep.turn_rewards,
        turn_texts=ep.turn_texts,
        turn_invalid=ep.turn_invalid,
        # The oldest weights any token was sampled with: staleness is measured from it.
        weight_version=min(ep.weight_versions, default=0),
        failure=failure,
        timings=ep.timings,
        env_info=ep.extra,
    )
