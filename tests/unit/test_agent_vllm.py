"""Token exactness end to end: multi-turn trajectories sampled by the real vLLM engine through
the agent loop, checked against a transformers forward pass over the final ids."""

from __future__ import annotations

import asyncio

import pytest
import torch

from spear_ray.agent.chat import ChatFormat
from spear_ray.agent.loop import EpisodeSettings, Task, run_episode
from spear_ray.envs import make_env


@pytest.fixture(scope="module")
def setup():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spear_ray.engines.vllm_engine import VLLMEngine
    from spear_ray.models import resolve_model_path

    path = str(resolve_model_path("builtin:tiny-random"))
    engine = VLLMEngine(path, dtype="float32", max_model_len=1024, cpu_kv_cache_gib=0.1)
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    chat = ChatFormat(AutoTokenizer.from_pretrained(path))
    yield engine, model, chat
    engine.shutdown()


def test_sampled_multi_turn_trajectories_match_a_transformers_recomputation(setup):
    engine, model, chat = setup
    settings = EpisodeSettings(
        max_tokens_per_turn=12,
        max_response_tokens=400,
        max_prompt_tokens=600,
        temperature=1.0,
        sampling_seed=3,
    )

    async def play():
        jobs = [
            run_episode(
                engine,
                make_env("frozenlake", {"max_turns": 3}),
                chat,
                settings,
                task=Task(f"t{k}", k, 50 + k, 1),
                sample_index=0,
            )
            for k in range(4)
        ]
        return await asyncio.gather(*jobs)

    trajectories = asyncio.run(play())
    for traj in trajectories:
        assert traj.failure is None and len(traj.turn_spans) >= 2  # really multi-turn
        ids = torch.tensor([traj.token_ids])
        with torch.no_grad():
            logits = model(ids).logits[0]
        recomputed = torch.log_softmax(logits[:-1].double(), dim=-1)
        recomputed = recomputed.gather(1, ids[0, 1:, None])[:, 0]
        mask = torch.tensor(traj.loss_mask[1:], dtype=torch.bool)
        sampled = torch.tensor(traj.behaviour_logprobs[1:], dtype=torch.float64)
        assert mask.sum() == traj.generated_tokens > 0
        assert torch.allclose(sampled[mask], recomputed[mask], atol=1e-4), (
            (sampled[mask] - recomputed[mask]).abs().max()
        )
        # the mask covers exactly what the engine generated, turn by turn
        assert [i for i, m in enumerate(traj.loss_mask) if m] == [
            i for s, e in traj.turn_spans for i in range(s, e)
        ]
        assert traj.weight_version == engine.weight_version
