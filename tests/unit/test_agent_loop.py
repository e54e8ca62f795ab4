"""The agent loop, token by token, driven by a scripted "model" through the real loop.

The scripted engine emits fixed text (tokenized with the project's real tokenizer) and records
what it was asked; envs and the sandbox are real. The vLLM-backed token/log-prob exactness
tests live in test_engine_*.py and tests/e2e.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time

import pytest

from spear_ray.agent.chat import ChatFormat, ChatTemplateError
from spear_ray.agent.loop import EnvThreads, EpisodeSettings, Task, run_episode
from spear_ray.config import SpearConfig
from spear_ray.engines.base import Generation, SamplingSpec
from spear_ray.envs import make_env
from spear_ray.envs.base import EnvInfo, StepResult
from spear_ray.recipe import rollout_spec


@pytest.fixture(scope="module")
def tokenizer():
    from spear_ray.models.tiny import ensure_tokenizer, load_tokenizer

    return load_tokenizer(ensure_tokenizer())


@pytest.fixture(scope="module")
def chat(tokenizer):
    return ChatFormat(tokenizer)


class ScriptedEngine:
    """Replies with the next scripted text; logprob of token i is -(i+1)/100 (recognisable)."""

    def __init__(self, tokenizer, replies, end_turn=True, delay_s=0.0, fail_at=None):
        self.tokenizer = tokenizer
        self.replies = list(replies)
        self.end_turn = end_turn
        self.delay_s = delay_s
        self.fail_at = fail_at
        self.weight_version = 3
        self.requests: list[tuple[list[int], SamplingSpec]] = []

    async def generate(self, prompt_ids, spec):
        self.requests.append((list(prompt_ids), spec))
        if self.fail_at is not None and len(self.requests) > self.fail_at:
            raise RuntimeError("engine blew up")
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        text = self.replies[min(len(self.requests) - 1, len(self.replies) - 1)]
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if self.end_turn:
            ids = [*ids, self.tokenizer.convert_tokens_to_ids("<|im_end|>")]
        ids = ids[: spec.max_tokens]
        logprobs = [-(i + 1) / 100 for i in range(len(ids))]
        reason = "stop" if len(ids) < spec.max_tokens else "length"
        return Generation(ids, logprobs, reason, self.weight_version)

    async def update_weights(self, named_tensors, version):
        self.weight_version = version

    def shutdown(self):
        pass


SETTINGS = EpisodeSettings(
    max_tokens_per_turn=64,
    max_response_tokens=2048,
    max_prompt_tokens=2048,
    invalid_action_penalty=-0.1,
    trajectory_timeout_s=30,
)
TASK = Task(task_id="t0", group_id=2, env_seed=7, num_samples=1)


def _play(engine, env, chat, settings=SETTINGS, task=TASK):
    return asyncio.run(run_episode(engine, env, chat, settings, task=task, sample_index=0))


def _frozenlake_solution(seed: int) -> list[str]:
    from spear_ray.envs.frozenlake import shortest_path

    env = make_env("frozenlake", {})
    env.reset(seed)
    plan = shortest_path(env.options.size, env.holes, env.start, env.goal)
    return [f"<action>{m}</action>" for m in plan]


def test_ids_are_prompt_then_generated_and_observations_in_order(tokenizer, chat):
    replies = _frozenlake_solution(TASK.env_seed)
    engine = ScriptedEngine(tokenizer, replies)
    env = make_env("frozenlake", {})
    traj = _play(engine, env, chat)
    assert traj.failure is None and traj.finished and traj.success
    assert traj.rewards.task == 10.0 and traj.invalid_actions == 0  # frozenlake pays 10
    assert traj.tool_calls == len(replies)  # agent env: every valid step counts for r_tc

    # Rebuild the expected ids independently: each request the engine saw is exactly the
    # trajectory so far, and what it returned is appended unchanged.
    prompt = engine.requests[0][0]
    assert traj.token_ids[: len(prompt)] == prompt and traj.prompt_length == len(prompt)
    for k, (start, end) in enumerate(traj.turn_spans):
        seen, _ = engine.requests[k]
        assert traj.token_ids[:start] == seen  # nothing before a turn was re-tokenized
        assert traj.loss_mask[start:end] == [1] * (end - start)
        assert traj.behaviour_logprobs[start:end] == [-(i + 1) / 100 for i in range(end - start)]
    generated = {i for s, e in traj.turn_spans for i in range(s, e)}
    assert [i for i, m in enumerate(traj.loss_mask) if m] == sorted(generated)
    assert all(lp == 0.0 for i, lp in enumerate(traj.behaviour_logprobs) if i not in generated)
    assert traj.weight_version == 3 and len(traj.turn_anchors) == len(replies)


def test_incremental_ids_equal_the_template_rendering_of_the_whole_chat(tokenizer, chat):
    """Appending ids turn by turn gives the same ids as the chat template on the full chat."""
    replies = _frozenlake_solution(11)
    env = make_env("frozenlake", {})
    traj = _play(
        ScriptedEngine(tokenizer, replies),
        env,
        chat,
        task=Task(task_id="x", group_id=0, env_seed=11, num_samples=1),
    )
    replay = make_env("frozenlake", {})
    messages = [{"role": "user", "content": replay.reset(11)}]
    for reply in replies[:-1]:
        messages.append({"role": "assistant", "content": reply})
        messages.append({"role": "user", "content": replay.step(reply).observation})
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = tokenizer.encode(rendered, add_special_tokens=False)
    last_start = traj.turn_spans[-1][0]
    assert traj.token_ids[:last_start] == expected


def test_a_turn_cut_by_a_stop_string_is_closed_by_non_trained_tokens(tokenizer, chat):
    engine = ScriptedEngine(
        tokenizer, ["<action>Jump</action>", "<action>Up</action>"], end_turn=False
    )
    env = make_env("frozenlake", {"max_turns": 2})
    traj = _play(engine, env, chat)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    start, end = traj.turn_spans[0]
    assert im_end not in traj.token_ids[start:end]
    assert traj.token_ids[end] == im_end and traj.loss_mask[end] == 0  # closed by the loop
    assert engine.requests[0][1].stop_strings == ("</action>",)
    assert im_end in engine.requests[0][1].stop_token_ids


def test_invalid_actions_are_penalised_and_the_episode_goes_on(tokenizer, chat):
    replies = ["I will jump", "<action>Fly</action>", "<action>Up</action>"]
    engine = ScriptedEngine(tokenizer, replies)
    env = make_env("frozenlake", {"max_turns": 3})
    traj = _play(engine, env, chat)
    assert traj.failure is None and len(traj.turn_spans) == 3
    assert traj.invalid_actions >= 2
    assert traj.rewards.invalid_penalty == pytest.approx(-0.1 * traj.invalid_actions)
    assert traj.turn_rewards[0] == pytest.approx(-0.1)


def test_response_token_budget_ends_the_episode(tokenizer, chat):
    settings = EpisodeSettings(
        max_tokens_per_turn=64, max_response_tokens=40, max_prompt_tokens=2048
    )
    engine = ScriptedEngine(tokenizer, ["<action>Jump</action>"])
    env = make_env("frozenlake", {"max_turns": 50})
    traj = _play(engine, env, chat, settings)
    assert traj.failure is None and not traj.finished
    assert traj.response_length <= 40
    assert traj.env_info["ended_by"] == "response_token_budget"
    assert all(spec.max_tokens <= 40 for _, spec in engine.requests)


def test_prompt_over_budget_is_an_infrastructure_failure(tokenizer, chat):
    settings = EpisodeSettings(max_tokens_per_turn=8, max_response_tokens=64, max_prompt_tokens=5)
    traj = _play(ScriptedEngine(tokenizer, ["x"]), make_env("frozenlake", {}), chat, settings)
    assert traj.failure and "max_prompt_tokens" in traj.failure


class _CrashingEnv:
    def reset(self, seed):
        return "start"

    def step(self, action_text):
        raise RuntimeError("game engine segfault")

    def close(self):
        pass


class _HangingEnv(_CrashingEnv):
    def __init__(self):
        self.release = threading.Event()

    def step(self, action_text):
        self.release.wait(10)
        return StepResult("late", 0.0, True, EnvInfo())


def test_env_crash_is_an_infrastructure_failure_not_a_score(tokenizer, chat):
    traj = _play(ScriptedEngine(tokenizer, ["hi"]), _CrashingEnv(), chat)
    # the one line says what and where: "RuntimeError: game engine segfault (at FILE:LINE in step)"
    assert traj.failure.startswith("RuntimeError: game engine segfault (at test_agent_loop.py:")
    assert traj.failure.endswith(" in step)")
    assert not traj.is_valid and traj.rewards.total == 0.0
    assert len(traj.turn_rewards) == len(traj.turn_spans)  # arrays stay consistent


def test_engine_error_and_timeout_are_infrastructure_failures(tokenizer, chat):
    traj = _play(
        ScriptedEngine(tokenizer, ["<action>Up</action>"], fail_at=1),
        make_env("frozenlake", {}),
        chat,
    )
    assert traj.failure.startswith("RuntimeError: engine blew up (at test_agent_loop.py:")
    env = _HangingEnv()
    quick = EpisodeSettings(
        max_tokens_per_turn=8,
        max_response_tokens=64,
        max_prompt_tokens=64,
        trajectory_timeout_s=0.5,
    )
    traj = _play(ScriptedEngine(tokenizer, ["go"]), env, chat, quick)
    env.release.set()
    assert traj.failure and traj.failure.startswith("timeout")


class _BlockingEnv:
    """An env whose calls named in `hang_in` ("reset", "step", "close") block until released."""

    def __init__(self, *hang_in: str):
        self.hang_in = hang_in
        self.release = threading.Event()
        self.closed_on: list[str] = []  # names of the threads close() ran on

    def _maybe_hang(self, call: str) -> None:
        if call in self.hang_in:
            self.release.wait(60)

    def reset(self, seed):
        self._maybe_hang("reset")
        return "start"

    def step(self, action_text):
        self._maybe_hang("step")
        return StepResult("next", 0.0, False, EnvInfo())

    def close(self):
        self.closed_on.append(threading.current_thread().name)
        self._maybe_hang("close")


def _wait_until(condition, limit_s=30.0):
    """Wait for an outcome (not a timing assertion): True once `condition()` holds."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


PER_CALL = EpisodeSettings(
    max_tokens_per_turn=64,
    max_response_tokens=2048,
    max_prompt_tokens=2048,
    trajectory_timeout_s=600,  # the per-call limits must fire, not this one
    env_call_timeout_s=0.3,
    generate_timeout_s=0.3,
)


@pytest.mark.parametrize("call", ["reset", "step"])
def test_a_hung_env_call_hits_its_own_timeout_and_does_not_hold_the_others(tokenizer, chat, call):
    threads = EnvThreads(hung_after_s=PER_CALL.env_call_timeout_s)
    hung = _BlockingEnv(call)

    async def both():
        # a healthy trajectory runs beside the hung one, on the same executor
        return await asyncio.gather(
            run_episode(
                ScriptedEngine(tokenizer, ["go"]),
                hung,
                chat,
                PER_CALL,
                task=TASK,
                sample_index=0,
                env_executor=threads,
            ),
            run_episode(
                ScriptedEngine(tokenizer, _frozenlake_solution(TASK.env_seed)),
                make_env("frozenlake", {}),
                chat,
                SETTINGS,
                task=TASK,
                sample_index=1,
                env_executor=threads,
            ),
        )

    try:
        failed, healthy = asyncio.run(both())
        assert failed.failure == f"timeout: env.{call} exceeded 0.3s" and not failed.is_valid
        assert healthy.failure is None and healthy.success
        # the hung call still runs, abandoned on its own thread, and is counted
        assert threads.running() == 1 and threads.hung() == 1
        # a later trajectory is not held up by the abandoned thread
        again = _play(
            ScriptedEngine(tokenizer, _frozenlake_solution(TASK.env_seed)),
            make_env("frozenlake", {}),
            chat,
        )
        assert again.success
    finally:
        hung.release.set()
    assert _wait_until(lambda: threads.running() == 0)  # released: the thread is gone
    assert threads.hung() == 0


def test_a_hung_generation_hits_its_own_timeout(tokenizer, chat):
    engine = ScriptedEngine(tokenizer, ["<action>Up</action>"], delay_s=600)
    traj = _play(engine, make_env("frozenlake", {}), chat, PER_CALL)
    assert traj.failure == "timeout: engine.generate exceeded 0.3s"
    assert not traj.is_valid and len(engine.requests) == 1


def _worker(tmp_path, tokenizer, **rollout):
    from actors.rollout_worker import RolloutWorker

    config = SpearConfig.model_validate(
        {
            "model": {"path": str(tmp_path)},  # not loaded: the engine and tokenizer are given
            "env": {"name": "frozenlake"},
            "rollout": {"env_call_timeout_s": 0.3, **rollout},
        }
    )
    return RolloutWorker(
        rollout_spec(config), engine=ScriptedEngine(tokenizer, ["go"]), tokenizer=tokenizer
    )


def test_a_rollout_worker_closes_a_hung_env_off_the_event_loop(tmp_path, tokenizer):
    worker = _worker(tmp_path, tokenizer)
    envs = [_BlockingEnv("step", "close") for _ in range(2)]
    worker._take_env = list(envs).pop
    try:
        group = asyncio.run(
            worker.rollout_group(task=Task("t", group_id=0, env_seed=1, num_samples=2))
        )
        assert [t.failure for t in group] == ["timeout: env.step exceeded 0.3s"] * 2
        # rollout_group returned while both closes hang: they run on env threads, not the loop
        assert _wait_until(lambda: all(env.closed_on for env in envs))
        assert all(env.closed_on[0].startswith("env-") for env in envs)
        assert worker.health()["hung_env_threads"] >= 2 and worker.failures == 2
        assert worker._idle_envs == []  # a failed env is never reused
    finally:
        for env in envs:
            env.release.set()
    worker.shutdown()


@pytest.mark.parametrize("limit", [1, 2])
def test_a_worker_past_max_hung_env_threads_exits_its_process(
    tmp_path, tokenizer, monkeypatch, limit
):
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    worker = _worker(tmp_path, tokenizer, max_hung_env_threads=limit)
    worker.exit_when_hung = True  # as spawn_rollout_worker sets it for a Ray actor
    envs = [_BlockingEnv("step") for _ in range(2)]
    worker._take_env = list(envs).pop
    try:
        asyncio.run(worker.rollout_group(task=Task("t", group_id=0, env_seed=1, num_samples=2)))
        hung = worker.health()["hung_env_threads"]
    finally:
        for env in envs:
            env.release.set()
    assert hung == 2
    if limit == 1:  # 2 hung > 1: the process exits (with an exit code Ray restarts it for)
        assert exits and set(exits) == {70}
    else:
        assert exits == []


def test_tokenizer_without_chat_template_is_a_one_line_error(tokenizer):
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    with pytest.raises(ChatTemplateError) as info:
        ChatFormat(bare, name="tokenizer /models/x")
    assert "/models/x has no chat template" in str(info.value) and "\n" not in str(info.value)


def test_python_math_tool_calls_through_the_real_sandbox(tokenizer, chat):
    from spear_ray.sandbox import SandboxClient, SandboxConfig

    with SandboxClient(SandboxConfig()) as sandbox:
        env = make_env("python_math", {"levels": [1]}, sandbox=sandbox)
        first = env.reset(0)
        answer = str(env.problem.answer)
        replies = [
            "Let me think.",  # neither code nor answer: invalid
            f"<code>print({answer})</code>",
            f"The result is \\boxed{{{answer}}}",
        ]
        engine = ScriptedEngine(tokenizer, replies)
        traj = _play(engine, env, chat, task=Task("m", 0, 0, 1))
    assert first  # the env really produced a prompt
    assert traj.failure is None and traj.finished and traj.success
    assert traj.tool_calls == 1 and traj.invalid_actions == 1
    assert traj.rewards.task == 1.0 and traj.rewards.invalid_penalty == pytest.approx(-0.1)
    # the interpreter's output came back as observation tokens (mask 0) before the last turn
    between = traj.token_ids[traj.turn_spans[1][1] : traj.turn_spans[2][0]]
    text = tokenizer.decode(between)
    assert re.search(rf"<interpreter>\s*{re.escape(answer)}\s*</interpreter>", text)
    assert engine.requests[1][1].stop_strings == ("</code>",)
