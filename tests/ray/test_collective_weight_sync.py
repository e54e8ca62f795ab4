"""The collective weight sync (learner.weight_transport: collective) on a real local Ray: one
DeepSpeed learner rank and two rollout workers with real vLLM engines (the tiny random Llama,
float32), gloo over this CPU.

The engines' parameters are read back from vLLM's model inside each worker process. On CPU vLLM
repacks every linear layer's weight for its GEMM kernel and drops the original, so a linear
layer's weight is read through the layer itself: its output for the identity matrix, x @ W.T
with x = I, is W.T exactly (one non-zero term per output). vLLM fuses q/k/v and gate/up into one
layer each; the learner's HF tensors are fused the same way to compare.

Every pid killed here is the pid of a rollout-worker actor the test itself created."""

from __future__ import annotations

import os
import signal

import pytest
import ray
import torch

from actors.rollout_group import RolloutGroup
from learners.learner_group import LearnerGroup
from spear_ray.agent.loop import Task
from spear_ray.config import load_config
from spear_ray.recipe import Recipe, rollout_spec

pytestmark = pytest.mark.ray


def _config(**extra):
    overrides = {
        "model.path": "builtin:tiny-random",
        "model.dtype": "float32",
        "rollout.num_workers": 2,
        "rollout.samples_per_prompt": 2,
        "rollout.prompts_per_step": 4,
        "rollout.max_tokens_per_turn": 8,
        "rollout.cpu_kv_cache_gib": 0.25,
        "rollout.eval_temperature": 0.0,  # greedy: generations are comparable token for token
        "rollout.max_restarts": 2,
        "resources.cpus_per_rollout_worker": 0.25,  # a third engine (the fresh one) fits too
        "resources.cpus_per_learner": 1.0,
        "resources.threads_per_learner": 1,
        "resources.threads_per_rollout_worker": 1,
        "env.options": "{max_turns: 3}",
        "learner.weight_transport": "collective",
        "learner.collective_timeout_s": 30,
        **extra,
    }
    return load_config("demo", [f"{k}={v}" for k, v in overrides.items()])


@pytest.fixture(scope="module")
def actors(ray_local):
    recipe = Recipe.from_config(_config())
    rollouts = RolloutGroup(recipe.rollout)
    learners = None
    try:
        learners = LearnerGroup(recipe.learner)
        rollouts.health()  # the engines are up
        yield learners, rollouts
    finally:
        rollouts.shutdown()
        if learners is not None:
            learners.shutdown()


# ----------------------------------------------------------------------------- helpers


def _perturb(learner_rank, seed: int) -> None:
    """Runs inside learner rank 0: noise on every parameter, so the weights to sync differ
    visibly from the engines' (which start from the checkpoint)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in learner_rank.engine.module.parameters():
            param.add_(0.5 * torch.randn(param.shape, generator=generator, dtype=param.dtype))


def _perturb_learner(learners: LearnerGroup, seed: int) -> None:
    ray.get(learners.ranks[0].__ray_call__.remote(_perturb, seed))


def _read_engine(rollout_worker) -> dict[str, torch.Tensor]:
    """Runs inside a rollout worker: every parameter of its vLLM model under vLLM's names, in
    the engine's dtype (linear layers read through the identity, see the module docstring)."""

    def read(model) -> dict[str, torch.Tensor]:
        from vllm.model_executor.layers.linear import LinearBase

        out = {}
        with torch.no_grad():
            for name, module in model.named_modules():
                if isinstance(module, LinearBase):
                    eye = torch.eye(module.input_size_per_partition, dtype=module.params_dtype)
                    out[f"{name}.weight"] = module.quant_method.apply(module, eye).T.clone()
            for name, param in model.named_parameters():
                if param.numel() and name not in out:
                    out[name] = param.detach().clone()
        return out

    (params,) = rollout_worker.engine._engine.apply_model(read)
    return params


def _engine_params(rollouts: RolloutGroup, worker: int) -> dict[str, torch.Tensor]:
    return ray.get(rollouts.workers[worker].__ray_call__.remote(_read_engine))


def _as_vllm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF Llama tensors under vLLM's names: q/k/v and gate/up fused as vLLM fuses them."""
    out = {}
    for name, tensor in state.items():
        if ".k_proj." in name or ".v_proj." in name or ".up_proj." in name:
            continue
        if ".q_proj." in name:
            parts = [state[name.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            out[name.replace("q_proj", "qkv_proj")] = torch.cat(parts)
        elif ".gate_proj." in name:
            parts = [state[name.replace("gate_proj", p)] for p in ("gate_proj", "up_proj")]
            out[name.replace("gate_proj", "gate_up_proj")] = torch.cat(parts)
        else:
            out[name] = tensor
    return out


def _learner_params(learners: LearnerGroup, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return _as_vllm({k: v.to(dtype) for k, v in learners.full_state_dict().items()})


def _differing(engine: dict, learner: dict) -> list[str]:
    """The names of the learner's tensors that the engine does not hold bit for bit."""
    assert set(learner) <= set(engine), sorted(set(learner) - set(engine))
    # vLLM's lm_head of a tied model is embed_tokens itself: nothing of its own to compare
    assert set(engine) - set(learner) <= {"lm_head.weight"}, sorted(set(engine) - set(learner))
    differing = []
    for name, tensor in learner.items():
        held = engine[name]
        if "embed_tokens" in name:  # vLLM pads the vocabulary (to a multiple of 64)
            held = held[: tensor.shape[0]]
        assert held.dtype == tensor.dtype and held.shape == tensor.shape, name
        if not torch.equal(held, tensor):
            differing.append(name)
    return differing


def _greedy_tokens(rollouts: RolloutGroup, worker: int) -> list[list[int]]:
    """Worker `worker`'s greedy (eval_temperature 0) trajectories of three fixed tasks."""
    tokens = []
    for seed in (7, 8, 9):
        task = Task(f"probe{seed}", group_id=0, env_seed=seed, num_samples=1)
        (traj,) = ray.get(rollouts.workers[worker].rollout_group.remote(task=task, evaluation=True))
        assert traj.failure is None
        tokens.append(traj.token_ids)
    return tokens


# ----------------------------------------------------------------------------- tests


def test_a_collective_sync_gives_every_engine_the_learners_weights_bit_for_bit(actors):
    learners, rollouts = actors
    before = _greedy_tokens(rollouts, 0)
    _perturb_learner(learners, seed=1)
    learner = _learner_params(learners, torch.float32)
    assert _differing(_engine_params(rollouts, 0), learner)  # the check below can fail

    logged = []
    assert rollouts.sync_weights(learners, 1, transport="collective", log=logged.append) == (
        "collective"
    )
    assert logged == [] and rollouts.collective_failures == 0
    assert [h["weight_version"] for h in rollouts.health()] == [1, 1]
    for worker in (0, 1):
        assert _differing(_engine_params(rollouts, worker), learner) == [], worker
    assert _greedy_tokens(rollouts, 0) != before  # the new weights generate differently

    # the group stays formed: the next sync reuses it
    generation = rollouts._weight_group.generation
    _perturb_learner(learners, seed=2)
    assert rollouts.sync_weights(learners, 2, transport="collective") == "collective"
    assert rollouts._weight_group.generation == generation
    learner = _learner_params(learners, torch.float32)
    assert _differing(_engine_params(rollouts, 1), learner) == []


def test_generation_after_a_collective_sync_equals_a_fresh_engine_of_the_same_weights(
    actors, tmp_path
):
    learners, rollouts = actors
    _perturb_learner(learners, seed=3)
    assert rollouts.sync_weights(learners, 3, transport="collective") == "collective"
    synced = _greedy_tokens(rollouts, 1)
    learners.save_checkpoint(directory=str(tmp_path), step=0)  # writes an HF model: policy/
    fresh_config = _config(**{"model.path": str(tmp_path / "policy"), "rollout.num_workers": 1})
    fresh = RolloutGroup(rollout_spec(fresh_config))
    try:
        assert _greedy_tokens(fresh, 0) == synced
    finally:
        fresh.shutdown()


def test_a_restarted_worker_falls_back_to_the_object_store_then_rejoins_the_group(actors):
    learners, rollouts = actors
    version = max(h["weight_version"] for h in rollouts.health())
    assert rollouts.sync_weights(learners, version + 1, transport="collective") == "collective"
    generation = rollouts._weight_group.generation
    pid = rollouts.health()[1]["pid"]
    os.kill(pid, signal.SIGKILL)  # worker 1 dies while in the group

    # the collective fails (one line, no hang); that sync goes through the object store
    _perturb_learner(learners, seed=4)
    logged = []
    transport = rollouts.sync_weights(
        learners, version + 2, transport="collective", log=logged.append
    )
    assert transport == "object_store"
    assert len(logged) == 1 and f"collective weight sync of v{version + 2} failed" in logged[0]
    assert "re-formed at the next sync" in logged[0]
    health = rollouts.health()  # waits for worker 1 to be back with the current weights
    assert health[1]["pid"] != pid
    assert [h["weight_version"] for h in health] == [version + 2] * 2
    learner = _learner_params(learners, torch.float32)
    assert _differing(_engine_params(rollouts, 1), learner) == []

    # the next sync re-forms the group with the restarted worker in it
    _perturb_learner(learners, seed=5)
    learner = _learner_params(learners, torch.float32)
    assert _differing(_engine_params(rollouts, 1), learner)
    assert rollouts.sync_weights(learners, version + 3, transport="collective") == "collective"
    assert rollouts._weight_group.generation > generation
    assert rollouts._weight_group.members == [0, 1] and rollouts.collective_failures == 0
    for worker in (0, 1):
        assert _differing(_engine_params(rollouts, worker), learner) == [], worker
