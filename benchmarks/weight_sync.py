"""Weight sync of a real model: learner rank 0 to the rollout workers, against a memory copy.

    .venv/bin/python benchmarks/weight_sync.py [--model builtin:smollm2-135m] [--workers 2]

One DeepSpeed learner rank and `--workers` vLLM rollout workers hold the model (SmolLM2-135M by
default: 134.5M parameters, 0.54 GB in fp32). A sync is what every training step does:
`LearnerGroup.publish_weights` (rank 0 gathers its full state dict in the engines' dtype, packs
it into buckets in the object store) + `RolloutGroup.update_weights` (every worker awaits the
buckets and reloads its engine in place, the workers in parallel). The baseline is one
in-memory copy of the same bytes in this process (`{k: v.clone()}`), the least any sync must
do, timed right after each sync; the ratio is the median of the paired ratios over
`--repeats`. Nothing asserts a timing. The last line of stdout is JSON with
sync_s, memcpy_s, sync_vs_memcpy (aim <= 2), bytes, workers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    import ray
    from step import measure_weight_sync

    from actors.rollout_group import RolloutGroup
    from learners.learner_group import LearnerGroup
    from spear_ray.config import load_config
    from spear_ray.recipe import Recipe

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cpus = os.cpu_count() or 2
    share = cpus / (args.workers + 1)  # everything on this machine, each actor a fair share
    config = load_config(
        "demo",
        [
            f"model.path={args.model}",
            f"model.dtype={args.dtype}",
            f"rollout.num_workers={args.workers}",
            "rollout.cpu_kv_cache_gib=0.5",
            f"resources.cpus_per_rollout_worker={share}",
            f"resources.cpus_per_learner={share}",
        ],
    )
    recipe = Recipe.from_config(config)
    ray.init(num_cpus=cpus, include_dashboard=False)
    learners = rollouts = None
    try:
        learners = LearnerGroup(recipe.learner)
        rollouts = RolloutGroup(recipe.rollout)
        rollouts.health()
        holder = SimpleNamespace(learners=learners, rollouts=rollouts, weight_version=0)
        result = measure_weight_sync(holder, args.repeats)
    finally:
        if rollouts is not None:
            rollouts.shutdown()
        if learners is not None:
            learners.shutdown()
        ray.shutdown()
    ratio = result["sync_vs_memcpy"]  # the median of paired (sync, copy) ratios
    gb = result["bytes"] / 1e9
    print(
        f"sync of {gb:.3f} GB ({result['tensors']} tensors) to {args.workers} workers: "
        f"{result['sync_s']:.3f} s (publish {result['publish_s']:.3f} + load "
        f"{result['load_s']:.3f}); one in-memory copy {result['memcpy_s']:.3f} s; "
        f"ratio {ratio:.2f} (aim <= 2)"
    )
    print(
        json.dumps(
            {
                "sync_s": round(result["sync_s"], 4),
                "publish_s": round(result["publish_s"], 4),
                "load_s": round(result["load_s"], 4),
                "memcpy_s": round(result["memcpy_s"], 4),
                "sync_vs_memcpy": round(ratio, 2),
                "bytes": result["bytes"],
                "workers": args.workers,
            }
        )
    )


if __name__ == "__main__":
    main()
