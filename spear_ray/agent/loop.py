"""The per-trajectory agent loop: generate, act, observe, repeat — each trajectory on its own.

    trajectory = await run_episode(engine, env, chat, settings, task=task, sample_index=k)

Every trajectory advances independently (no turn barrier across the batch): while one waits for
its sandbox call, the engine keeps batching the others' generations. Env calls run in a thread
pool (`env_executor`) so a slow tool never blocks the event loop.

Failures: an exception from the env (including a sandbox infrastructure error) or the engine,
or the trajectory's wall-clock timeout, marks the trajectory as an infrastructure failure
(`Trajectory.failure`), which the controller excludes from group statistics. It is never a
scored zero. Invalid actions are normal: the env flags them and the loop adds the penalty.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field

from spear_ray.agent.chat import ChatFormat
from spear_ray.algo.filters import is_unreadable
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


async def _call_env(executor: Executor | None, fn, *args):
    return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)


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
    observation = await _call_env(executor, env.reset, task.env_seed)
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
        gen = await engine.generate(list(ep.token_ids), spec)
        ep.timings["generate_s"] += time.perf_counter() - t0
        start = len(ep.token_ids)
        ep.append(gen.token_ids, generated=True, logprobs=gen.logprobs)
        ep.turn_spans.append((start, len(ep.token_ids)))
        ep.weight_versions.append(gen.weight_version)
        text = chat.tokenizer.decode(gen.token_ids, skip_special_tokens=True)
        if is_unreadable(text):  # Dr.BoT's unreadable filter reads this flag (SPEAR.md §2)
            ep.extra["unreadable"] = True
        t0 = time.perf_counter()
        result: StepResult = await _call_env(executor, env.step, text)
        ep.timings["env_s"] += time.perf_counter() - t0
        info = result.info
        ep.task_reward += result.reward
        penalty = s.invalid_action_penalty if info.invalid_action else 0.0
        ep.turn_rewards.append(result.reward + penalty)
        ep.turn_anchors.append(info.anchor)
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
    except Exception as err:  # any env/engine failure is an infrastructure failure
        failure = f"{type(err).__name__}: {err}".splitlines()[0][:500]
    ep.timings["total_s"] = time.perf_counter() - t0
    # A failed episode may have stopped anywhere; keep its arrays consistent for the record.
    if len(ep.turn_spans) > len(ep.turn_rewards):
        ep.turn_rewards.append(0.0)
        ep.turn_anchors.append(None)
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
        # The oldest weights any token was sampled with: staleness is measured from it.
        weight_version=min(ep.weight_versions, default=0),
        failure=failure,
        timings=ep.timings,
        env_info=ep.extra,
    )
