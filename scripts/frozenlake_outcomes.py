"""How a model's frozenlake episodes end: success, fell into a hole, or ran out of turns, and how
many of its moves ran into the edge (changed nothing). A diagnostic for issue 19's demo pilots.

    .venv/bin/python scripts/frozenlake_outcomes.py MODEL_DIR [--temperature 0] [--tasks 128]
        [--options '{"max_turns": 8}']

MODEL_DIR is an HF model directory: a builtin's cache directory or `spear-ray export --to DIR
RUN/checkpoints/step_N`. Episodes are played with plain transformers on the held-out seeds the
runs evaluate on (spear_ray.models.tiny.EVAL_SEED_START onwards), one per seed, as the model build
evaluates its warm start (spear_ray.models.sft.rollout_success_rate).
"""

from __future__ import annotations

import argparse
import collections
import json

import torch
from transformers import AutoModelForCausalLM

import spear_ray.envs
from spear_ray.models import sft
from spear_ray.models.tiny import EVAL_SEED_START, load_tokenizer


def counting_make_env(counts: collections.Counter):
    """make_env whose frozenlake envs count how each episode ends and the edge bumps."""
    make_env = spear_ray.envs.make_env

    def make(*args, **kwargs):
        env = make_env(*args, **kwargs)
        step = env.step

        def counted(text: str):
            result = step(text)
            counts["moves"] += 1
            counts["edge_bumps"] += bool(result.info.extra.get("bumped"))
            if result.done:
                if result.info.success:
                    counts["success"] += 1
                elif result.info.extra.get("fell"):
                    counts["fell"] += 1
                else:
                    counts["out_of_turns"] += 1
            return result

        env.step = counted
        return env

    return make


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--tasks", type=int, default=128, help="held-out maps (default 128)")
    parser.add_argument("--options", default='{"max_turns": 8}', help="frozenlake options, JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir)
    counts: collections.Counter = collections.Counter()
    spear_ray.envs.make_env = counting_make_env(counts)  # sft imports it at call time
    seeds = list(range(EVAL_SEED_START, EVAL_SEED_START + args.tasks))
    stats = sft.rollout_success_rate(
        model, tokenizer, "frozenlake", json.loads(args.options), seeds, args.temperature
    )
    print(json.dumps({"success_rate": stats["success_rate"], **counts}))


if __name__ == "__main__":
    main()
