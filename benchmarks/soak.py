"""Soak: the RSS of every process of a demo run, sampled every --every steps, and its trend.

    .venv/bin/python benchmarks/soak.py [--steps 300] [--every 10] [--eval] [--tiny]
        [--csv PATH] [--address ADDR] [--runs-dir DIR] [override ...]

The run is `spear_ray.train.run_training` in this process on the demo preset with
run.total_steps=--steps and no evaluation (--eval keeps the preset's); checkpoints as the preset
says (every 10 steps); dotted overrides follow, and `--tiny` swaps in the random test model and
small sizes (see benchmarks/chaos.py, whose controller hook and pid lookup this script uses).
At 5-9 s per demo step on a 2-core machine, the default 300 steps take 25-45 min; a short
--steps is a check that the script works, not a soak.

Processes: the driver (this process alone: its children are the local Ray's daemons and
workers), the replay-buffer actor, each rollout worker and each learner rank. Their pids come
from the actors' own methods (ReplayBuffer.pid(), RolloutWorker.health()["pid"], the `pid` of
each rank's setup() answer kept in LearnerGroup.info), asked again at every sample, so a
restarted actor is followed. An actor's RSS is that of its process and its descendants (a
process its engine or a compile pool starts is the actor's memory too).

Samples: once the actors are up (0 steps done), after every --every-th step, and after the last.
Printed: the table (steps done, RSS in MB per process), then per process the first and last
sample and the least-squares slope in MB per 100 steps over the samples of the second half of
the run (steps done >= steps / 2; the first half holds the warm-up: the engine's caches, the
first checkpoint, allocator pools). The last stdout line is JSON: steps, every, wall_s,
processes {name: start_mb, end_mb, slope_mb_per_100_steps}, rows [{step, rss_mb, pids}].
Exit status 1 if the run failed (the samples taken so far are still printed).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import psutil
from chaos import actor_pids, add_run_args, demo_config, hooked_controller, log, start_ray

MB = 1024 * 1024


def rss_mb(pid: int, with_children: bool) -> float | None:
    """RSS of `pid` (and its descendants) in MB; None if it is gone."""
    try:
        proc = psutil.Process(pid)
        procs = [proc, *(proc.children(recursive=True) if with_children else [])]
    except psutil.Error:
        return None
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:  # a child that just exited
            if p is proc:
                return None
    return total / MB


def _order(name: str) -> tuple[int, str]:
    kinds = ("driver", "buffer", "rollout_worker", "learner_rank")
    return next(i for i, k in enumerate(kinds) if name.startswith(k)), name


class Sampler:
    """Called from the controller hooks: a row of RSS per process at the chosen steps."""

    def __init__(self, steps: int, every: int):
        self.steps = steps
        self.every = every
        self.rows: list[dict[str, Any]] = []

    def sample(self, controller: Any, done: int) -> None:
        pids = {"driver": os.getpid(), **actor_pids(controller)}
        rss = {
            name: _round1(rss_mb(pid, with_children=name != "driver"))
            for name, pid in sorted(pids.items(), key=lambda item: _order(item[0]))
        }
        self.rows.append({"step": done, "rss_mb": rss, "pids": pids})
        log("soak: step " + f"{done}: " + "  ".join(f"{k} {_mb(v)}" for k, v in rss.items()))

    def attach(self, controller: Any) -> None:
        if not self.rows:  # not again for a controller built after a failure
            self.sample(controller, 0)

    def step_end(self, controller: Any, t: int, metrics: dict) -> None:
        done = t + 1
        if done % self.every == 0 or done == self.steps:
            self.sample(controller, done)


def _round1(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def slope_per_100_steps(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of MB over steps, times 100; None with fewer than 2 distinct steps."""
    if len({x for x, _ in points}) < 2:
        return None
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    sxy = sum((x - mx) * (y - my) for x, y in points)
    return 100.0 * sxy / sxx


def summarize(rows: list[dict[str, Any]], steps: int) -> dict[str, dict[str, float | None]]:
    names = sorted({n for r in rows for n in r["rss_mb"]}, key=_order)
    out = {}
    for name in names:
        series = [(r["step"], r["rss_mb"].get(name)) for r in rows]
        series = [(x, y) for x, y in series if y is not None]
        late = [(x, y) for x, y in series if x >= steps / 2]
        slope = slope_per_100_steps(late)
        out[name] = {
            "start_mb": round(series[0][1], 1) if series else None,
            "end_mb": round(series[-1][1], 1) if series else None,
            "slope_mb_per_100_steps": None if slope is None else round(slope, 2),
        }
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(parser, steps=300)
    parser.add_argument("--every", type=int, default=10, help="sample every K steps")
    parser.add_argument("--eval", action="store_true", help="keep the preset's evaluations")
    parser.add_argument("--csv", default=None, help="also write the samples to this CSV file")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from spear_ray.run_dir import RunDir
    from spear_ray.train import run_training

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    runs_dir = args.runs_dir or tempfile.mkdtemp(prefix="soak-")
    own = [] if args.eval else ["run.eval_every_steps=0"]
    config = demo_config(args, runs_dir, "soak", own)
    sampler = Sampler(config.run.total_steps, max(1, args.every))
    owns_ray = start_ray(config, args.address, args.verbose)
    error = None
    try:
        run_dir = RunDir.create(config)
        with hooked_controller(on_attach=sampler.attach, on_step_end=sampler.step_end):
            run_training(config, run=run_dir, log=log)
    except Exception as err:
        error = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:300]}"
        log(f"soak: the run failed: {error}")
    finally:
        if owns_ray:
            ray.shutdown()
        if args.runs_dir is None:
            shutil.rmtree(runs_dir, ignore_errors=True)
    return {
        "steps": config.run.total_steps,
        "every": sampler.every,
        "wall_s": round(time.monotonic() - started, 1),
        "error": error,
        "processes": summarize(sampler.rows, config.run.total_steps),
        "rows": sampler.rows,
    }


def report(r: dict[str, Any], csv_path: str | None = None) -> None:
    names = list(r["processes"])
    width = max([len(n) for n in names] + [8])
    print("RSS (MB) per process; actors include their child processes")
    print(f"{'step':>6}  " + "  ".join(f"{n:>{width}}" for n in names))
    for row in r["rows"]:
        cells = "  ".join(f"{_mb(row['rss_mb'].get(n)):>{width}}" for n in names)
        print(f"{row['step']:>6}  {cells}")
    print(f"start -> end, slope over steps >= {r['steps'] / 2:g} (MB per 100 steps):")
    for name, s in r["processes"].items():
        slope = s["slope_mb_per_100_steps"]
        slope_text = "n/a (fewer than 2 samples)" if slope is None else f"{slope:+.2f}"
        print(f"  {name:<{width}}  {_mb(s['start_mb'])} -> {_mb(s['end_mb'])} MB, {slope_text}")
    if r["error"]:
        print(f"the run failed: {r['error']}")
    print(f"wall {r['wall_s']:.0f} s, cpus={os.cpu_count()}")
    if csv_path:
        with open(csv_path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["step", *(f"{n}_rss_mb" for n in names), *(f"{n}_pid" for n in names)])
            for row in r["rows"]:
                writer.writerow(
                    [
                        row["step"],
                        *(_round(row["rss_mb"].get(n)) for n in names),
                        *(row["pids"].get(n, "") for n in names),
                    ]
                )
    print(json.dumps({k: r[k] for k in ("steps", "every", "wall_s", "processes", "rows")}))


def _round(value: float | None) -> str | float:
    return "" if value is None else round(value, 1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    report(result, args.csv)
    return 1 if result["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
