"""Per-trajectory async rollout vs a turn-synchronous loop, same engine, tasks and sampling.

(a) async: `spear_ray.agent.loop.run_episode` for every trajectory at once; each advances on its
    own, so while one waits for its tool the engine batches the others' generations.
(b) turn-synchronous (how verl-agent's env manager steps a batch): every turn, all live
    trajectories generate together, then all step their envs together, and the next turn starts
    only when the slowest env call of the batch has returned.

The env is a tool-use stand-in with varied tool latency (exponential, seeded) and varied episode
lengths (1..max_turns turns, seeded), so the numbers isolate the scheduling. Real vLLM engine on
the tiny builtin model.

    python benchmarks/rollout.py [--trajectories 64] [--max-turns 6] [--mean-latency-ms 40]

Prints tokens/s and trajectories/s of both and the ratio; the last line is JSON with keys
async_tok_s, sync_tok_s, speedup.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor

from spear_ray.agent.chat import ChatFormat
from spear_ray.agent.loop import EpisodeSettings, Task, run_episode, stable_seed
from spear_ray.engines.base import SamplingSpec
from spear_ray.envs.base import EnvInfo, StepResult


class ToolLatencyEnv:
    """Episodes of a seeded length whose every step waits a seeded, exponential tool latency."""

    def __init__(self, max_turns: int, mean_latency_s: float):
        self.max_turns = max_turns
        self.mean_latency_s = mean_latency_s

    def reset(self, seed: int) -> str:
        self.rng = random.Random(seed)
        self.length = self.rng.randint(1, self.max_turns)
        self.turn = 0
        return f"Task {seed}: call the tool until it says done."

    def step(self, action_text: str) -> StepResult:
        time.sleep(self.rng.expovariate(1.0 / self.mean_latency_s))
        self.turn += 1
        done = self.turn >= self.length
        obs = "done" if done else f"tool output {self.turn}: " + "x " * self.rng.randint(1, 20)
        return StepResult(obs, 1.0 if done else 0.0, done, EnvInfo(success=done, tool_call=True))

    def close(self) -> None:
        pass


async def run_async(engine, chat, settings, tasks, make_env, executor) -> list:
    jobs = [
        run_episode(
            engine, make_env(), chat, settings, task=t, sample_index=k, env_executor=executor
        )
        for t in tasks
        for k in range(t.num_samples)
    ]
    return list(await asyncio.gather(*jobs))


async def run_turn_synchronous(engine, chat, settings, tasks, make_env, executor) -> int:
    """Lock-step baseline; returns the number of generated tokens."""
    loop = asyncio.get_running_loop()
    episodes = []
    for t in tasks:
        for k in range(t.num_samples):
            env = make_env()
            obs = await loop.run_in_executor(executor, env.reset, t.env_seed)
            episodes.append({"env": env, "ids": chat.prompt_ids(obs), "task": t, "k": k})
    live, generated, turn = episodes, 0, 0
    while live:
        specs = [
            SamplingSpec(
                max_tokens=settings.max_tokens_per_turn,
                temperature=settings.temperature,
                stop_token_ids=chat.stop_token_ids(),
                seed=stable_seed(settings.sampling_seed, e["task"].task_id, e["k"], turn),
            )
            for e in live
        ]
        gens = await asyncio.gather(
            *(engine.generate(e["ids"], s) for e, s in zip(live, specs, strict=True))
        )
        texts = []
        for e, g in zip(live, gens, strict=True):
            e["ids"] = e["ids"] + g.token_ids
            generated += len(g.token_ids)
            texts.append(chat.tokenizer.decode(g.token_ids, skip_special_tokens=True))
        # the barrier: every env call of the batch must return before the next turn
        results = await asyncio.gather(
            *(
                loop.run_in_executor(executor, e["env"].step, txt)
                for e, txt in zip(live, texts, strict=True)
            )
        )
        still = []
        for e, g, r in zip(live, gens, results, strict=True):
            if not r.done:
                e["ids"] += chat.turn_close_ids(g.token_ids) + chat.observation_ids(r.observation)
                still.append(e)
        live, turn = still, turn + 1
    return generated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trajectories", type=int, default=64)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-turns", type=int, default=6)
    parser.add_argument("--tokens-per-turn", type=int, default=24)
    parser.add_argument("--mean-latency-ms", type=float, default=40.0)
    parser.add_argument("--model", default="builtin:tiny-random")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from spear_ray.engines.vllm_engine import VLLMEngine
    from spear_ray.models import resolve_model_path

    model_dir = str(resolve_model_path(args.model))
    chat = ChatFormat(AutoTokenizer.from_pretrained(model_dir))
    engine = VLLMEngine(model_dir, max_model_len=2048)
    settings = EpisodeSettings(
        max_tokens_per_turn=args.tokens_per_turn,
        max_response_tokens=1536,
        max_prompt_tokens=512,
        temperature=1.0,
        sampling_seed=0,
        trajectory_timeout_s=600,
    )
    groups = args.trajectories // args.group_size
    tasks = [Task(f"t{i}", i, 1000 + i, args.group_size) for i in range(groups)]
    executor = ThreadPoolExecutor(max_workers=args.trajectories)

    def make_env():
        return ToolLatencyEnv(args.max_turns, args.mean_latency_ms / 1000)

    async def both():
        await run_async(engine, chat, settings, tasks[:2], make_env, executor)  # warm-up
        rows = {"async": [], "sync": []}
        for _ in range(args.repeats):  # interleaved, so drift hits both sides alike
            t0 = time.perf_counter()
            trajs = await run_async(engine, chat, settings, tasks, make_env, executor)
            rows["async"].append((sum(t.generated_tokens for t in trajs), time.perf_counter() - t0))
            t0 = time.perf_counter()
            tokens = await run_turn_synchronous(engine, chat, settings, tasks, make_env, executor)
            rows["sync"].append((tokens, time.perf_counter() - t0))
        return rows

    rows = asyncio.run(both())
    engine.shutdown()
    out = {}
    for name, runs in rows.items():
        tokens = sum(r[0] for r in runs)
        seconds = sum(r[1] for r in runs)
        out[name] = (tokens / seconds, args.trajectories * len(runs) / seconds)
        print(
            f"{name:>5}: {out[name][0]:9.1f} generated tok/s  {out[name][1]:7.2f} traj/s  "
            f"({tokens} tokens in {seconds:.2f} s over {len(runs)} runs)"
        )
    speedup = out["async"][0] / out["sync"][0]
    print(
        f"async / turn-synchronous: {speedup:.2f}x tokens/s, "
        f"{out['async'][1] / out['sync'][1]:.2f}x trajectories/s  (cpus={os.cpu_count()})"
    )
    print(
        json.dumps(
            {
                "async_tok_s": round(out["async"][0], 1),
                "sync_tok_s": round(out["sync"][0], 1),
                "speedup": round(speedup, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
