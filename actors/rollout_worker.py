"""RolloutWorker: one generation engine, its environments and the agent loop.

A plain class (testable without Ray); `actors.rollout_group.spawn_rollout_worker` applies
`ray.remote` with the resources of the spec. Its methods are async, so a Ray actor runs many
`rollout_group` calls at once on one event loop and the engine batches all their generations.

    worker = RolloutWorker(spec, worker_index=0)
    trajectories = await worker.rollout(tasks=[Task(...)], weight_version=0)
    await worker.update_weights(named_tensors=..., version=1)    # object store (or in memory)
    await worker.join_weight_group(spec=spec, rank=k)            # or a collective weight group
    await worker.receive_weights(generation=g, version=2)        # (RolloutGroup.sync_weights)

Faults: an env call or generation past its timeout fails only its trajectory (see
spear_ray/agent/loop.py); the env is not reused and is closed on its own thread, never on the
event loop. Abandoned env calls that keep running are counted (`health()["hung_env_threads"]`);
past `rollout.max_hung_env_threads` a worker spawned as an actor exits its process, so Ray
restarts it (`rollout.max_restarts`) and `RolloutGroup` gives it the current weights again and
re-issues its unfinished groups.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import sys
import time
from collections.abc import Iterable
from typing import Any

import torch

from learners.weight_sync import WeightGroup, WeightGroupError, WeightGroupSpec
from spear_ray.agent.chat import ChatFormat
from spear_ray.agent.loop import EnvThreads, EpisodeSettings, Task, run_episode
from spear_ray.containers import Trajectory
from spear_ray.engines.base import Engine
from spear_ray.envs.base import TextEnv
from spear_ray.envs.registry import env_spec, make_env
from spear_ray.recipe import RolloutSpec


class StaleWeightsError(RuntimeError):
    """A rollout asked for a weight version this worker does not have yet."""


class RolloutWorker:
    def __init__(
        self,
        spec: RolloutSpec,
        worker_index: int = 0,
        engine: Engine | None = None,
        tokenizer: Any = None,
        exit_when_hung: bool = False,
    ):
        """`exit_when_hung`: exit the process past rollout.max_hung_env_threads (only for a
        worker that Ray restarts: spawn_rollout_worker sets it)."""
        self.spec = spec
        self.exit_when_hung = exit_when_hung
        self.worker_index = worker_index
        model_dir, tokenizer_dir = _model_dirs(spec)
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.chat = ChatFormat(tokenizer, name=f"tokenizer {tokenizer_dir}")
        if engine is None:
            engine = _build_vllm_engine(spec, model_dir, tokenizer_dir)
        self.engine = engine
        self._sandbox = None
        if "sandbox" in inspect.signature(env_spec(spec.env.name).factory).parameters:
            from spear_ray.sandbox import SandboxClient

            self._sandbox = SandboxClient(spec.sandbox)
        # Env calls (sandbox calls, game engines) and closes of failed envs run here, off the
        # event loop, each on its own daemon thread (a hung one holds no slot others need).
        self._env_executor = EnvThreads(hung_after_s=spec.rollout.env_call_timeout_s)
        self._idle_envs: list[TextEnv] = []
        self.trajectories_done = 0
        self.failures = 0
        self._weight_group: WeightGroup | None = None  # learner.weight_transport: collective

    # ------------------------------------------------------------------ envs

    def _take_env(self) -> TextEnv:
        if self._idle_envs:
            return self._idle_envs.pop()
        return make_env(
            self.spec.env.name,
            self.spec.env.options,
            sandbox=self._sandbox,
            eval_seed_start=self.spec.env.eval_seed_start,
        )

    def _give_back_env(self, env: TextEnv, healthy: bool) -> None:
        if healthy:
            self._idle_envs.append(env)
        else:  # a failed or timed-out env may still be running in its thread: never reuse it,
            # and close it off the event loop (closing a hung env may hang too); nobody waits.
            self._env_executor.submit(_close_quietly, env)

    # ------------------------------------------------------------------ rollout

    def episode_settings(self, evaluation: bool = False) -> EpisodeSettings:
        r = self.spec.rollout
        return EpisodeSettings(
            max_tokens_per_turn=r.max_tokens_per_turn,
            max_response_tokens=r.max_response_tokens,
            max_prompt_tokens=r.max_prompt_tokens,
            temperature=r.eval_temperature if evaluation else r.temperature,
            top_p=1.0 if evaluation else r.top_p,
            invalid_action_penalty=self.spec.env.invalid_action_penalty,
            trajectory_timeout_s=r.trajectory_timeout_s,
            env_call_timeout_s=r.env_call_timeout_s,
            generate_timeout_s=r.generate_timeout_s,
            sampling_seed=self.spec.seed,
        )

    async def _one(self, task: Task, sample_index: int, settings: EpisodeSettings) -> Trajectory:
        env = self._take_env()
        traj = await run_episode(
            self.engine,
            env,
            self.chat,
            settings,
            task=task,
            sample_index=sample_index,
            env_executor=self._env_executor,
        )
        self._give_back_env(env, healthy=traj.failure is None)
        self.trajectories_done += 1
        self.failures += int(traj.failure is not None)
        if traj.failure is not None:
            self._check_hung_envs()
        return traj

    def _check_hung_envs(self) -> None:
        hung = self._env_executor.hung()
        limit = self.spec.rollout.max_hung_env_threads
        if hung > limit and self.exit_when_hung:
            print(
                f"rollout worker {self.worker_index}: {hung} env calls hung > "
                f"rollout.max_hung_env_threads={limit}; exiting so that Ray restarts this worker",
                file=sys.stderr,
                flush=True,
            )
            os._exit(70)  # not a clean exit: Ray restarts the actor (rollout.max_restarts)

    def _check_version(self, weight_version: int | None) -> None:
        have = self.engine.weight_version
        if weight_version is not None and have < weight_version:
            raise StaleWeightsError(
                f"rollout worker {self.worker_index} has weights v{have} but the rollout asked "
                f"for v{weight_version}; send update_weights first"
            )

    async def rollout_group(
        self, *, task: Task, weight_version: int | None = None, evaluation: bool = False
    ) -> list[Trajectory]:
        """The `task.num_samples` trajectories of one task (one group), played concurrently."""
        self._check_version(weight_version)
        settings = self.episode_settings(evaluation)
        return list(
            await asyncio.gather(*(self._one(task, k, settings) for k in range(task.num_samples)))
        )

    async def rollout(
        self, *, tasks: list[Task], weight_version: int | None = None, evaluation: bool = False
    ) -> list[Trajectory]:
        """All groups of `tasks`, every trajectory advancing on its own."""
        self._check_version(weight_version)
        groups = await asyncio.gather(
            *(self.rollout_group(task=t, evaluation=evaluation) for t in tasks)
        )
        return [traj for group in groups for traj in group]

    # ------------------------------------------------------------------ weights and health

    async def update_weights(
        self, *, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> int:
        """Load new weights in place (idempotent: an older or equal version is ignored)."""
        if version <= self.engine.weight_version:
            return self.engine.weight_version
        # Bucketed weights (learners.weight_sync.BucketedWeights) are awaited bucket by bucket,
        # so the trajectories in flight keep going meanwhile; a plain iterable of tensors (tests,
        # an in-process learner) is already in memory.
        fetch = getattr(named_tensors, "fetch", None)
        tensors = await fetch() if fetch is not None else list(named_tensors)
        await self.engine.update_weights(tensors, version)
        return self.engine.weight_version

    # ------------------------------------------------------------------ collective weight sync

    async def join_weight_group(self, *, spec: WeightGroupSpec, rank: int) -> int:
        """Leave any previous weight group and connect to this one as `rank` (on a thread: the
        event loop keeps serving rollouts); returns when every member has connected."""
        self.close_weight_group()
        group = WeightGroup(spec, rank)
        await asyncio.to_thread(group.connect)
        self._weight_group = group
        return rank

    async def receive_weights(self, *, generation: int, version: int) -> int:
        """Receive one broadcast of the weight group (on a thread, so the trajectories in flight
        keep going) and load it as `version` like update_weights does. The broadcast is received
        even when this version is loaded already: the sender waits for every member."""
        group = self._weight_group
        if group is None or group.spec.generation != generation:
            have = "none" if group is None else group.spec.generation
            raise WeightGroupError(
                f"rollout worker {self.worker_index} is not in weight group {generation} "
                f"(its group: {have}; restarted since the group was formed?)"
            )
        try:
            tensors = await asyncio.to_thread(group.receive)
        except WeightGroupError:
            self._weight_group = None  # receive closed it: the driver re-forms the group
            raise
        if version > self.engine.weight_version:
            await self.engine.update_weights(tensors, version)
        return self.engine.weight_version

    def close_weight_group(self) -> None:
        """Leave the weight group, if any. Idempotent."""
        group, self._weight_group = self._weight_group, None
        if group is not None:
            group.close()

    def health(self) -> dict[str, Any]:
        return {
            "worker_index": self.worker_index,
            "pid": os.getpid(),
            "weight_version": self.engine.weight_version,
            "trajectories_done": self.trajectories_done,
            "failures": self.failures,
            "idle_envs": len(self._idle_envs),
            "hung_env_threads": self._env_executor.hung(),
            "time": time.time(),
        }

    def shutdown(self) -> None:
        self.close_weight_group()
        for env in self._idle_envs:
            env.close()
        self._idle_envs.clear()
        self._env_executor.shutdown(wait=False, cancel_futures=True)
        if self._sandbox is not None:
            self._sandbox.close()
        self.engine.shutdown()


def _close_quietly(env: TextEnv) -> None:
    with contextlib.suppress(Exception):  # closing a broken env must not fail anything
        env.close()


def _model_dirs(spec: RolloutSpec) -> tuple[str, str]:
    from spear_ray.models import resolve_model_path

    model_dir = str(resolve_model_path(spec.model.path))
    tokenizer = spec.model.tokenizer_path
    return model_dir, str(resolve_model_path(tokenizer)) if tokenizer else model_dir


def _build_vllm_engine(spec: RolloutSpec, model_dir: str, tokenizer_dir: str) -> Engine:
    from spear_ray.engines.vllm_engine import VLLMEngine

    r = spec.rollout
    return VLLMEngine(
        model_dir,
        tokenizer_path=tokenizer_dir,
        dtype=spec.model.dtype,
        seed=spec.seed,
        max_model_len=r.max_prompt_tokens + r.max_response_tokens,
        cpu_kv_cache_gib=r.cpu_kv_cache_gib,
        gpu_memory_utilization=r.gpu_memory_utilization,
        tensor_parallel_size=r.tensor_parallel_size,
    )
