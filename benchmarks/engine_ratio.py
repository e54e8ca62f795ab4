"""The rollout worker's agent loop against its own engine's limit, on the same model and prompts.

    .venv/bin/python benchmarks/engine_ratio.py [--model builtin:small-random] [--prompts 8]

(a) engine: vLLM's `LLM.generate` in a plain process (a subprocess of this one, so its threads
    are its own), with as many torch/OpenMP threads as the rollout worker gets, on the
    token-id prompts the agent loop used, one request per sample, the same sampling. This is the
    limit: a rollout can not generate faster than its engine.
(b) agent loop: `RolloutGroup.rollout` through Ray (one RolloutWorker actor, the spear-ray
    agent loop, a benchmark env registered in every Ray worker), generated tokens per second
    of the rollout's wall time, in three workloads:
    - single turn: one generation per trajectory, env step of zero latency;
    - multi turn: `--turns` turns, zero tool latency (observations feed the next turn);
    - with latency: `--turns` turns, each env step sleeps `--latency-ms` (exponential, seeded),
      with `--latency-groups` times as many trajectories in flight to hide it.

Ratios: engine_ratio = single-turn agent loop tok/s / engine tok/s; multi_turn_engine_ratio and
with_latency_engine_ratio divide the other two workloads by the same engine figure (their
prompts are longer from turn 2 on, so the engine's own limit there is a little lower: the
ratios are conservative). Each workload is timed `--repeats` times after a warm-up. Agent-loop
and engine rounds alternate (the other side idles meanwhile), and each ratio is the median of
the per-round ratios, so drift of a shared machine hits both sides.
Nothing asserts a timing; the last line of stdout is JSON with engine_tok_s,
agent_loop_tok_s, engine_ratio, multi_turn_engine_ratio, with_latency_engine_ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydantic import Field

from spear_ray.envs.actions import TurnOptions
from spear_ray.envs.base import EnvInfo, StepResult

ROOT = Path(__file__).resolve().parent.parent
BENCH_ENV = "bench_tool"


# ----------------------------------------------------------------------------- the env


class BenchToolOptions(TurnOptions):
    latency_ms: float = Field(0.0, ge=0, description="Mean tool latency per env step (ms).")


class BenchToolEnv:
    """Every turn is a tool call: a (seeded, exponential) latency, then a short observation;
    the episode ends after max_turns turns. Any text is a valid action. The last turn scores 1
    when its text has an even number of characters: arbitrary, but it varies within a group,
    so GRPO has non-zero advantages to train on (benchmarks/step.py)."""

    def __init__(self, options: BenchToolOptions):
        self.options = options

    def reset(self, seed: int) -> str:
        self.rng = random.Random(seed)
        self.turn = 0
        return f"Task {seed}: call the tool until it says done."

    def step(self, action_text: str) -> StepResult:
        if self.options.latency_ms:
            time.sleep(self.rng.expovariate(1000.0 / self.options.latency_ms))
        self.turn += 1
        done = self.turn >= self.options.max_turns
        obs = "done" if done else f"tool output {self.turn}: " + "x " * self.rng.randint(1, 12)
        reward = float(done and len(action_text) % 2 == 0)
        return StepResult(obs, reward, done, EnvInfo(tool_call=True, truncated=done))

    def close(self) -> None:
        pass


def register_bench_env() -> None:
    """Runs in the driver and, as Ray's worker_process_setup_hook, in every Ray worker."""
    from spear_ray.envs.registry import register_env

    register_env(
        BENCH_ENV,
        BenchToolEnv,
        BenchToolOptions,
        "benchmark tool env (latency, fixed turns)",
        overwrite=True,
    )


# ----------------------------------------------------------------------------- (a) the engine


def engine_only(args: argparse.Namespace) -> None:
    """Subprocess entry: LLM.generate on the prompts in --prompt-file; prints one JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    job = json.loads(Path(args.prompt_file).read_text())
    llm = LLM(
        model=job["model_dir"],
        dtype=job["dtype"],
        max_model_len=job["max_model_len"],
        enforce_eager=True,
        enable_chunked_prefill=False,
        max_num_batched_tokens=max(job["max_model_len"], 2048),
        kv_cache_memory_bytes=int(job["kv_cache_gib"] * 2**30),
        seed=0,
    )
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]]
    params = [
        SamplingParams(
            max_tokens=job["max_tokens"],
            temperature=job["temperature"],
            seed=k,
            stop_token_ids=job["stop_token_ids"],
            logprobs=0,  # the agent loop asks for the sampled token's log-prob too
        )
        for k in range(len(prompts))
    ]
    llm.generate(prompts[:4], params[:4], use_tqdm=False)  # warm-up
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:  # one timed round per "go": the parent interleaves them with its own
        if line.strip() != "go":
            break
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        print(json.dumps({"tok_s": tokens / seconds}), flush=True)


class EngineProcess:
    """The engine in its own process, idle (blocked on stdin) between rounds, so it and the
    rollout worker never compete for the cores."""

    def __init__(self, job: dict, threads: int):
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(job, f)
        self.job_file = f.name
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(threads),
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "VLLM_LOGGING_LEVEL": "WARNING",
        }
        command = [sys.executable, __file__, "--engine-only", f.name, "--threads", str(threads)]
        self.proc = subprocess.Popen(
            command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self._read()  # ready

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"engine subprocess ended (exit {self.proc.wait()})")

    def round(self) -> float:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return self._read()["tok_s"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        os.unlink(self.job_file)


# ----------------------------------------------------------------------------- (b) the loop


def config_for(args: argparse.Namespace, turns: int, latency_ms: float, groups: int):
    from spear_ray.config import load_config

    return load_config(
        "demo",
        [
            f"model.path={args.model}",
            "model.dtype=float32",
            "rollout.num_workers=1",
            f"rollout.prompts_per_step={groups}",
            f"rollout.samples_per_prompt={args.samples}",
            f"rollout.max_tokens_per_turn={args.max_tokens}",
            "rollout.max_prompt_tokens=256",
            "rollout.max_response_tokens=1024",
            f"rollout.temperature={args.temperature}",
            f"rollout.cpu_kv_cache_gib={args.kv_cache_gib}",
            f"resources.cpus_per_rollout_worker={args.worker_cpus}",
            f"env.name={BENCH_ENV}",
            f"env.options={{max_turns: {turns}, latency_ms: {latency_ms}}}",
        ],
    )


def engine_job(args, model_dir: str, trajectories) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return {
        "model_dir": model_dir,
        "dtype": "float32",
        "max_model_len": 256 + 1024,
        "kv_cache_gib": args.kv_cache_gib,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "stop_token_ids": [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [],
        "prompts": [t.token_ids[: t.prompt_length] for t in trajectories],
    }


def interleaved(args, model_dir: str, turns: int, latency_ms: float, groups: int, engine):
    """Alternate agent-loop rounds (RolloutGroup.rollout through Ray) with engine rounds.
    Returns (agent tok/s per round, engine tok/s per round, engine) -- the engine is started
    on the first call, from the prompts of its warm-up rollout."""
    import ray

    from actors.rollout_group import RolloutGroup
    from spear_ray.agent.loop import Task
    from spear_ray.recipe import rollout_spec

    group = RolloutGroup(rollout_spec(config_for(args, turns, latency_ms, groups)))
    agent, reference = [], []
    try:
        group.health()  # the engine is up before anything is timed
        threads = ray.get(
            group.workers[0].__ray_call__.remote(lambda self: __import__("torch").get_num_threads())
        )
        for repeat in range(args.repeats + 1):  # the first is a warm-up
            tasks = [
                Task(f"r{repeat}-g{g}", g, 1000 * repeat + g, args.samples) for g in range(groups)
            ]
            t0 = time.perf_counter()
            trajectories = group.rollout(tasks)
            seconds = time.perf_counter() - t0
            failed = [t.failure for t in trajectories if t.failure]
            if failed:
                raise RuntimeError(f"{len(failed)} trajectories failed: {failed[0]}")
            if engine is None:
                engine = EngineProcess(engine_job(args, model_dir, trajectories), threads)
            if repeat:
                agent.append(sum(t.generated_tokens for t in trajectories) / seconds)
                reference.append(engine.round())
    finally:
        group.shutdown()
    return agent, reference, engine, threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:small-random")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--latency-ms", type=float, default=40.0)
    parser.add_argument("--latency-groups", type=int, default=4)
    parser.add_argument("--worker-cpus", type=float, default=1.0)
    parser.add_argument("--kv-cache-gib", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engine-only", metavar="PROMPT_FILE", default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.engine_only:
        args.prompt_file = args.engine_only
        engine_only(args)
        return

    import ray

    from spear_ray.models import resolve_model_path

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    register_bench_env()
    model_dir = str(resolve_model_path(args.model))
    ray.init(
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        runtime_env={
            "env_vars": {"PYTHONPATH": str(ROOT)},
            "worker_process_setup_hook": "benchmarks.engine_ratio.register_bench_env",
        },
    )
    engine = None
    rounds = {}
    try:
        workloads = {
            "single": (1, 0.0, args.prompts),
            "multi": (args.turns, 0.0, args.prompts),
            "latency": (args.turns, args.latency_ms, args.prompts * args.latency_groups),
        }
        for name, (turns, latency_ms, groups) in workloads.items():
            agent, reference, engine, threads = interleaved(
                args, model_dir, turns, latency_ms, groups, engine
            )
            ratios = [a / e for a, e in zip(agent, reference, strict=True)]
            rounds[name] = (statistics.median(agent), statistics.median(ratios))
            print(
                f"{name:>8}: agent loop {statistics.median(agent):8.1f} tok/s, engine "
                f"{statistics.median(reference):8.1f} tok/s, paired ratio "
                f"{statistics.median(ratios):.3f} (rounds: {', '.join(f'{r:.2f}' for r in ratios)})"
            )
            rounds.setdefault("engine", []).extend(reference)
    finally:
        ray.shutdown()
        if engine is not None:
            engine.close()
    result = {
        "engine_tok_s": round(statistics.median(rounds["engine"]), 1),
        "agent_loop_tok_s": round(rounds["single"][0], 1),
        "multi_turn_tok_s": round(rounds["multi"][0], 1),
        "with_latency_tok_s": round(rounds["latency"][0], 1),
        "engine_ratio": round(rounds["single"][1], 3),
        "multi_turn_engine_ratio": round(rounds["multi"][1], 3),
        "with_latency_engine_ratio": round(rounds["latency"][1], 3),
        "threads": threads,
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
