"""Weight sync of a real model, both transports side by side: learner rank 0 to the rollout
workers through the object store and over a collective (gloo) weight group, each against an
in-memory copy.

    .venv/bin/python benchmarks/weight_sync.py [--model builtin:smollm2-135m] [--workers 2] [--gpu]

One DeepSpeed learner rank and `--workers` vLLM rollout workers hold the model (SmolLM2-135M by
default: 134.5M parameters, 0.54 GB in fp32; `--model builtin:tiny-llama` is the demo's). A sync
is what every training step does, `RolloutGroup.sync_weights` with `learner.weight_transport`:

- object_store: `LearnerGroup.publish_weights` (rank 0 gathers its full state dict in the
  engines' dtype and packs it into buckets in the object store) + every worker awaits the
  buckets and reloads its engine in place, the workers in parallel;
- collective: rank 0 packs the same buckets and broadcasts them over a torch.distributed group
  with the workers (gloo; NCCL with --gpu when there is a whole GPU for the learner and each
  worker, else the actors share GPUs and gloo goes through host memory), who receive them on a
  thread and reload their engines in place. The group is formed by a warm-up sync before the
  timed ones (it is formed once per run).

The baseline is one in-memory copy of the same bytes in this process (`{k: v.clone()}`), the
least any sync must do. Each repeat times both transports (in alternating order, so drift of a
shared machine hits both alike) and the copy; every ratio is the median of the per-repeat
ratios over `--repeats`. Nothing asserts a timing. The last line of stdout is JSON with
object_store_s, collective_s, memcpy_s, collective_vs_object_store, object_store_vs_memcpy,
collective_vs_memcpy, bytes, workers, model, backend. `--gpu` (NOT RUN HERE: no GPU on these
machines) puts the learner and the workers on GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def measure(learners, rollouts, repeats: int) -> dict[str, float]:
    """Median seconds of each transport's sync and of a memory copy, and the paired ratios."""
    state = learners.full_state_dict()
    nbytes = sum(v.numel() * v.element_size() for v in state.values())
    version = max(h["weight_version"] for h in rollouts.health())

    def sync(transport: str) -> float:
        nonlocal version
        version += 1  # a version the workers have not seen, or the load is a no-op
        t0 = time.perf_counter()
        used = rollouts.sync_weights(learners, version, transport=transport)
        seconds = time.perf_counter() - t0
        if used != transport:
            raise SystemExit(f"benchmarks/weight_sync.py: the {transport} sync fell back to {used}")
        return seconds

    sync("collective")  # warm-up: forms the weight group
    sync("object_store")
    times: dict[str, list[float]] = {"object_store": [], "collective": [], "memcpy": []}
    for k in range(repeats):
        order = ("object_store", "collective") if k % 2 == 0 else ("collective", "object_store")
        for transport in order:
            times[transport].append(sync(transport))
        t0 = time.perf_counter()
        copy = {name: tensor.clone() for name, tensor in state.items()}
        times["memcpy"].append(time.perf_counter() - t0)
        del copy

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

    return {
        "bytes": nbytes,
        "tensors": len(state),
        "object_store_s": statistics.median(times["object_store"]),
        "collective_s": statistics.median(times["collective"]),
        "memcpy_s": statistics.median(times["memcpy"]),
        "collective_vs_object_store": ratio("collective", "object_store"),
        "object_store_vs_memcpy": ratio("object_store", "memcpy"),
        "collective_vs_memcpy": ratio("collective", "memcpy"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--gpu",
        action="store_true",
        help="the learner and the workers on GPUs: a whole one each if there are enough (NCCL), "
        "else shares of them (gloo over host memory)",
    )
    args = parser.parse_args()

    import ray

    from actors.rollout_group import RolloutGroup
    from learners.learner_group import LearnerGroup
    from learners.weight_sync import collective_backend
    from spear_ray.config import load_config
    from spear_ray.recipe import Recipe

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cpus = os.cpu_count() or 2
    actors = args.workers + 1
    share = cpus / actors  # everything on this machine, each actor a fair share
    overrides = [
        f"model.path={args.model}",
        f"model.dtype={args.dtype}",
        f"rollout.num_workers={args.workers}",
        "rollout.cpu_kv_cache_gib=0.5",
        f"resources.cpus_per_rollout_worker={share}",
        f"resources.cpus_per_learner={share}",
        # the workers reload at the same time: more OpenMP threads than cores would make
        # libgomp throttle its spin-wait (README, "One OpenMP pool per engine process")
        f"resources.threads_per_rollout_worker={max(1, cpus // args.workers)}",
    ]
    ray.init(num_cpus=cpus, include_dashboard=False)
    if args.gpu:  # NOT RUN HERE (no GPU on these machines)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if gpus == 0:
            ray.shutdown()
            raise SystemExit("benchmarks/weight_sync.py --gpu: Ray sees no GPU on this machine")
        each = 1.0 if gpus >= actors else 1.0 / actors
        overrides += [
            f"resources.gpus_per_learner={each}",
            f"resources.gpus_per_rollout_worker={each}",
            f"rollout.gpu_memory_utilization={min(0.85, 0.8 * each):.3f}",
        ]
    config = load_config("demo", overrides)
    recipe = Recipe.from_config(config)
    res = config.resources
    backend = collective_backend(res.gpus_per_learner, res.gpus_per_rollout_worker)
    learners = rollouts = None
    try:
        learners = LearnerGroup(recipe.learner)
        rollouts = RolloutGroup(recipe.rollout)
        rollouts.health()
        result = measure(learners, rollouts, args.repeats)
        rollouts.close_weight_group(learners)
    finally:
        if rollouts is not None:
            rollouts.shutdown()
        if learners is not None:
            learners.shutdown()
        ray.shutdown()
    gb = result["bytes"] / 1e9
    print(
        f"{args.model}: sync of {gb:.3f} GB ({result['tensors']} tensors) to {args.workers} "
        f"workers: object store {result['object_store_s']:.3f} s, collective ({backend}) "
        f"{result['collective_s']:.3f} s, collective / object store "
        f"{result['collective_vs_object_store']:.2f}; one in-memory copy "
        f"{result['memcpy_s']:.4f} s (object store {result['object_store_vs_memcpy']:.1f}x, "
        f"collective {result['collective_vs_memcpy']:.1f}x)"
    )
    print(
        json.dumps(
            {
                "model": args.model,
                "object_store_s": round(result["object_store_s"], 4),
                "collective_s": round(result["collective_s"], 4),
                "memcpy_s": round(result["memcpy_s"], 5),
                "collective_vs_object_store": round(result["collective_vs_object_store"], 2),
                "object_store_vs_memcpy": round(result["object_store_vs_memcpy"], 2),
                "collective_vs_memcpy": round(result["collective_vs_memcpy"], 2),
                "bytes": result["bytes"],
                "workers": args.workers,
                "backend": backend,
            }
        )
    )


if __name__ == "__main__":
    main()
