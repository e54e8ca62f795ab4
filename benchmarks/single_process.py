"""The strongest simple alternative to a spear-ray training step: one plain process.

    .venv/bin/python benchmarks/single_process.py CONFIG.json STEPS_PER_ROUND  (benchmarks/step.py
    runs it, and writes "go" on its stdin for each round)

One process holds an in-process vLLM engine and a transformers copy of the same model and uses
every core for both (torch threads = the machine's cores). Each step it does the work a GRPO step
of spear-ray does on the same workload, nothing more:
generate the step's completions with `LLM.generate` (token-id prompts from the same chat template
and env, the same sampling), score them with the env, GRPO advantages, one AdamW update with the
same loss code (`learners.policy.micro_batch_loss`, the recipe's on-policy PhaseLoss), and the
new weights into the engine (`reload_weights` in place). With one epoch and one mini-batch the
update's own detached log-probs are logp_old (ratio 1), so nothing is computed twice.

CONFIG.json is a resolved spear-ray config (model.dtype float32). On stdout: {"ready": true} once
set up, then per round one JSON line per step {"step": t, "seconds": s, "tokens": n} and
{"round_done": n}.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]


def main(config_path: str, steps: int) -> None:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from engine_ratio import register_bench_env
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from learners.policy import (
        micro_batch_loss,
        micro_batches,
        mini_batch_divisors,
        token_logprobs,
    )
    from spear_ray.agent.chat import ChatFormat
    from spear_ray.algo import grpo_advantages
    from spear_ray.algo.losses import loss_divisors
    from spear_ray.config import SpearConfig
    from spear_ray.containers import RewardParts, Trajectory, build_train_batch
    from spear_ray.envs import make_env
    from spear_ray.models import resolve_model_path
    from spear_ray.recipe import Recipe

    register_bench_env()
    config = SpearConfig.model_validate(json.loads(Path(config_path).read_text()))
    recipe = Recipe.from_config(config)
    rollout, learner = config.rollout, config.learner
    model_dir = str(resolve_model_path(config.model.path))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chat = ChatFormat(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    llm = LLM(
        model=model_dir,
        dtype=config.model.dtype,
        max_model_len=rollout.max_prompt_tokens + rollout.max_response_tokens,
        enforce_eager=True,
        enable_chunked_prefill=False,
        max_num_batched_tokens=max(rollout.max_prompt_tokens + rollout.max_response_tokens, 2048),
        kv_cache_memory_bytes=int(rollout.cpu_kv_cache_gib * 2**30),
        seed=config.run.seed,
    )
    torch.manual_seed(config.run.seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    model.eval()  # as the learner: dropout off
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=learner.lr,
        betas=tuple(learner.betas),
        weight_decay=learner.weight_decay,
    )
    loss = recipe.on_policy_loss
    env = make_env(config.env.name, config.env.options)
    for step in _steps(steps):
        t0 = time.perf_counter()
        # rollout: one generation per sample (single-turn workload), scored by the env
        prompts, seeds, groups = [], [], []
        for g in range(rollout.prompts_per_step):
            seed = step * rollout.prompts_per_step + g
            ids = chat.prompt_ids(env.reset(seed))
            for _ in range(rollout.samples_per_prompt):
                prompts.append(ids)
                seeds.append(seed)
                groups.append(g)
        params = [
            SamplingParams(
                max_tokens=rollout.max_tokens_per_turn,
                temperature=rollout.temperature,
                seed=1000 * step + k,
                stop_token_ids=chat.stop_token_ids(),
            )
            for k in range(len(prompts))
        ]
        requests = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        outs = llm.generate(requests, params, use_tqdm=False)
        t_generated = time.perf_counter()
        trajectories, rewards = [], []
        for k, (ids, out) in enumerate(zip(prompts, outs, strict=True)):
            gen = list(out.outputs[0].token_ids)
            env.reset(seeds[k])
            result = env.step(tokenizer.decode(gen, skip_special_tokens=True))
            rewards.append(result.reward)
            trajectories.append(
                Trajectory(
                    task_id=f"{step}-{groups[k]}",
                    group_id=groups[k],
                    env_seed=seeds[k],
                    prompt_length=len(ids),
                    token_ids=ids + gen,
                    loss_mask=[0] * len(ids) + [1] * len(gen),
                    behaviour_logprobs=[0.0] * (len(ids) + len(gen)),
                    turn_spans=[(len(ids), len(ids) + len(gen))],
                    rewards=RewardParts(task=result.reward),
                )
            )
        advantages = grpo_advantages(
            torch.tensor(rewards, dtype=torch.float64),
            torch.tensor(groups),
            norm_by_std=recipe.advantage.norm_by_std,
            epsilon=recipe.advantage.epsilon,
        )
        batch = build_train_batch(trajectories, advantages.tolist(), pad_id)
        # update: one mini-batch; logp_old = the update's own detached log-probs (ratio 1)
        divisors = mini_batch_divisors(
            float(batch.rows), float(loss_divisors(batch.loss_mask)["num_tokens"]), batch.rows
        )
        t_update = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        for micro in micro_batches(batch, learner.tokens_per_micro_batch):
            logits = model(input_ids=micro.input_ids, attention_mask=micro.attention_mask).logits
            with torch.no_grad():
                micro.old_logprobs = (
                    token_logprobs(logits, micro.input_ids, loss.temperature) * micro.loss_mask
                )
            micro_batch_loss(logits, micro, loss, divisors).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), learner.grad_clip)
        optimizer.step()
        t_sync = time.perf_counter()
        # the new weights into the engine, in place
        dtype = getattr(torch, config.model.dtype)
        state = [(name, t.detach().to(dtype)) for name, t in model.state_dict().items()]
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": state})
        llm.reset_prefix_cache()
        seconds = time.perf_counter() - t0
        tokens = sum(sum(t.loss_mask) for t in trajectories)
        phases = {
            "rollout": t_generated - t0,
            "experience": t_update - t_generated,
            "update": t_sync - t_update,
            "sync_weights": time.perf_counter() - t_sync,
        }
        print(
            json.dumps({"step": step, "seconds": seconds, "tokens": tokens, "phases": phases}),
            flush=True,
        )


def _steps(per_round: int):
    """Step numbers, `per_round` of them for each "go" line on stdin (the parent alternates
    rounds of this loop with rounds of spear-ray's, each side idle while the other runs)."""
    step = 0
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() != "go":
            return
        for _ in range(per_round):
            yield step
            step += 1
        print(json.dumps({"round_done": step}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
