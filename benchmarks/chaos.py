"""Chaos: the demo trained while its actors are SIGKILLed at random times. Does the run finish,
and what did the faults cost?

    .venv/bin/python benchmarks/chaos.py [--steps 12] [--seed 0] [--kills-per-kind 1]
        [--kill-learner] [--tiny] [--checkpoint-every 2] [--address ADDR] [--runs-dir DIR]
        [override ...]

The run is `spear_ray.train.run_training` in this process on the demo preset, shortened:
run.total_steps=--steps, no evaluation, a checkpoint every --checkpoint-every steps; dotted
overrides (`rollout.num_workers=2`) follow. `--tiny` swaps in the random 0.2M-parameter test
model (builtin:tiny-random) and small sizes, for a quick check. Ray is a local one this script
starts (or --address; or the one already initialised in this process, e.g. a test's).

A background thread in the driver SIGKILLs actors of the run by pid:

- a random rollout worker and the replay-buffer actor, --kills-per-kind times each. Ray restarts
  both: the worker gets the current weights and its groups are re-issued or dropped
  (actors/rollout_group.py); the buffer restores its own checkpoint (buffers/actor.py).
- with --kill-learner, a random learner rank as many times. A dead rank stops the run by design
  (LearnerError, a RunFault); the script then resumes the run the way `spear-ray train --resume`
  does (run_training(resume=True): the newest usable checkpoint) and goes on to --steps.

Each kind's kills fall on distinct random steps among 1..steps-2, at a random fraction of the
previous step's duration into that step (or at its end, if it ends first), all drawn from
--seed. Never in the last step: a worker restarted then would be counted by no later step, and
the run would shut it down before it is back. The pids come from the actors' own methods:
RolloutWorker.health()["pid"], ReplayBuffer.pid(), and the `pid` of each rank's setup() answer,
which LearnerGroup keeps as `info[rank]`. A pid is killed only while it is still that process
(psutil checks pid reuse) and its command line names the actor's class.

What is printed at the end (the last stdout line is JSON with the same numbers):

- steps completed: distinct steps with a row in metrics.jsonl; the run completed if it reached
  --steps (after any resumes).
- restarts per kind: a worker or buffer restart is observed when the killed actor answers again
  with a new pid (and how long that took); `rollout/worker_restarts` summed over every row of
  metrics.jsonl is the controller's own count; a learner restart is a resume.
- groups re-issued / dropped and samples dropped: rollout/* summed over metrics.jsonl (rows of
  steps re-run after a resume included: those faults happened).
- buffer rows lost: per buffer kill, the rows admitted so far (stats()["admitted_total"], asked
  just before the kill) minus those in the checkpoint the restarted buffer restores (read from its
  file right after the kill, before the new process can write it); and the buffer's own
  missing_steps_total (steps whose end_step was never applied) from the last metrics row.
- whether the final checkpoint loads: RunDir.usable_checkpoint(checksums=True) must be the last
  step's, and transformers' AutoModelForCausalLM.from_pretrained of its learner/policy must give
  finite parameters.

Exit status 0 only if the run completed and the final checkpoint loads. benchmarks/soak.py uses
this file's controller hook and pid lookup.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import ray

from spear_ray.config import SpearConfig, load_config
from spear_ray.run_dir import RunDir

# The random test model and small sizes (as the e2e tests use): minutes on a 2-core machine.
# A random model's turns are all invalid/unreadable: the filters are off so its rows train.
TINY_OVERRIDES = [
    "model.path=builtin:tiny-random",
    "model.dtype=float32",
    "rollout.num_workers=1",
    "rollout.prompts_per_step=2",
    "rollout.samples_per_prompt=4",
    "rollout.max_tokens_per_turn=8",
    "rollout.max_response_tokens=256",
    "rollout.cpu_kv_cache_gib=0.25",
    "env.options={max_turns: 3}",
    "env.eval_tasks=4",
    "learner.num_ranks=1",
    "learner.tokens_per_micro_batch=1024",
    "resources.cpus_per_learner=0.5",
    "resources.cpus_per_rollout_worker=0.5",
    "algo.filters.void_turn=false",
    "algo.filters.unreadable=false",
    "algo.filters.group_keep_ratio=1.0",
    "buffer.size=2",
]

ACTOR_CLASS = {
    "rollout_worker": "RolloutWorker",
    "buffer": "ReplayBuffer",
    "learner_rank": "LearnerRank",
}
LOOKUP_TIMEOUT_S = 120.0  # asking an actor its pid (a worker may be restarting)
EXIT_TIMEOUT_S = 30.0  # a SIGKILLed process is gone
RESTART_TIMEOUT_S = 600.0  # watching for a killed actor to answer with a new pid
FIRST_STEP_S = 10.0  # the "previous step's duration" before any step has ended


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- config, Ray


def add_run_args(parser: argparse.ArgumentParser, steps: int) -> None:
    """The options chaos.py and soak.py share."""
    parser.add_argument("--steps", type=int, default=steps, help="training steps (run.total_steps)")
    parser.add_argument(
        "--tiny", action="store_true", help="builtin:tiny-random and small sizes (a quick check)"
    )
    parser.add_argument("--address", default=None, help="join this Ray instead of a local one")
    parser.add_argument(
        "--runs-dir", default=None, help="keep the run here (default: a temp dir, removed)"
    )
    parser.add_argument("--verbose", action="store_true", help="show the actors' logs")
    parser.add_argument(
        "override", nargs="*", help="dotted config overrides, after the script's own"
    )


def demo_config(args: argparse.Namespace, runs_dir: str, name: str, own: list[str]) -> SpearConfig:
    """The demo preset + `own` overrides + the --tiny sizes + the user's overrides (last wins)."""
    overrides = [
        f"run.total_steps={args.steps}",
        f"run.runs_dir={runs_dir}",
        f"run.name={name}-{time.strftime('%Y%m%d-%H%M%S')}",
        *own,
        *(TINY_OVERRIDES if args.tiny else []),
        *args.override,
    ]
    return load_config("demo", overrides)


def start_ray(config: SpearConfig, address: str | None, verbose: bool) -> bool:
    """Use the Ray this process has, or join `address`, or start a local one (never another
    local cluster's: address "local"); True if this call started or joined it."""
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=verbose)
        return True
    res = config.resources
    need = (
        res.cpus_per_learner * config.learner.num_ranks
        + res.cpus_per_rollout_worker * config.rollout.num_workers
    )
    ray.init(
        address="local",
        num_cpus=max(os.cpu_count() or 1, math.ceil(need)),
        include_dashboard=False,
        log_to_driver=verbose,
    )
    return True


# ----------------------------------------------------------------------------- the hook


@contextlib.contextmanager
def hooked_controller(
    on_attach: Callable[[Any], None] | None = None,
    on_step_start: Callable[[Any, int], None] | None = None,
    on_step_end: Callable[[Any, int, dict], None] | None = None,
    on_detach: Callable[[Any], None] | None = None,
) -> Iterator[None]:
    """While active, run_training builds a Controller subclass that calls these hooks: after
    __init__ (the actors are up), around each step, and before shutdown (the actors go).
    run_training imports spear_ray.controller.Controller when it is called, so replacing the
    module's attribute is enough; it is put back on exit."""
    import spear_ray.controller as module

    base = module.Controller

    class HookedController(base):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if on_attach is not None:
                on_attach(self)

        def step(self, t: int) -> dict[str, Any]:
            if on_step_start is not None:
                on_step_start(self, t)
            metrics = super().step(t)
            if on_step_end is not None:
                on_step_end(self, t, metrics)
            return metrics

        def shutdown(self) -> None:
            if on_detach is not None:
                on_detach(self)
            super().shutdown()

    module.Controller = HookedController
    try:
        yield
    finally:
        module.Controller = base


def actor_pids(controller: Any, timeout_s: float = LOOKUP_TIMEOUT_S) -> dict[str, int]:
    """{"buffer": pid, "rollout_worker_<i>": pid, ..., "learner_rank_<r>": pid}, each from the
    actor's own method (the buffer only with SIL on)."""
    pids: dict[str, int] = {}
    if controller.buffer is not None:
        pids["buffer"] = int(ray.get(controller.buffer.pid.remote(), timeout=timeout_s))
    refs = [worker.health.remote() for worker in controller.rollouts.workers]
    for i, answer in enumerate(ray.get(refs, timeout=timeout_s)):
        pids[f"rollout_worker_{i}"] = int(answer["pid"])
    for r, info in enumerate(controller.learners.info):
        pids[f"learner_rank_{r}"] = int(info["pid"])
    return pids


# ----------------------------------------------------------------------------- kills


@dataclass
class Kill:
    """One planned SIGKILL and what came of it."""

    kind: str
    step: int  # the step during which (or at whose end) it lands
    fraction: float  # how far into the step, as a fraction of the previous step's duration
    index: int = 0  # which worker / rank
    pid: int | None = None
    at_step: int | None = None  # the step in progress when it was sent
    done: bool = False
    skipped: str | None = None
    new_pid: int | None = None  # a worker's or the buffer's pid once it answered again
    restart_s: float | None = None
    rows_lost: int | None = None  # buffer only
    fired_at: float = field(default=0.0, repr=False)


def plan_kills(
    rng: random.Random, steps: int, per_kind: int, kinds: list[str], sizes: dict[str, int]
) -> list[Kill]:
    """`per_kind` kills of each kind on distinct random steps in 1..steps-2 (repeats only when
    there are fewer such steps than kills), at random fractions, on random workers/ranks."""
    candidates = list(range(1, steps - 1)) or list(range(max(steps - 1, 1)))
    plan = []
    for kind in kinds:
        if per_kind <= len(candidates):
            picks = rng.sample(candidates, per_kind)
        else:
            picks = rng.choices(candidates, k=per_kind)
        for step in picks:
            plan.append(Kill(kind, step, rng.random(), index=rng.randrange(sizes.get(kind, 1))))
    return sorted(plan, key=lambda k: (k.step, k.fraction))


class Killer(threading.Thread):
    """Follows the run through the controller hooks and fires the planned kills."""

    def __init__(self, plan: list[Kill], steps: int):
        super().__init__(name="chaos-killer", daemon=True)
        self.plan = plan
        self.steps = steps
        self.cond = threading.Condition()
        self.stop = threading.Event()
        self.controller: Any = None
        self.step = -1
        self.running = False
        self.step_started = 0.0
        self.last_step_s: float | None = None
        self.observers: list[threading.Thread] = []
        self.errors: list[str] = []

    # the hooks (driver thread)

    def attach(self, controller: Any) -> None:
        with self.cond:
            self.controller = controller
            self.cond.notify_all()

    def step_start(self, controller: Any, t: int) -> None:
        with self.cond:
            self.step, self.running, self.step_started = t, True, time.monotonic()
            self.cond.notify_all()

    def step_end(self, controller: Any, t: int, metrics: dict) -> None:
        with self.cond:
            self.running = False
            self.last_step_s = time.monotonic() - self.step_started
            self.cond.notify_all()

    def detach(self, controller: Any) -> None:
        with self.cond:
            if self.controller is controller:
                self.controller, self.running = None, False
            self.cond.notify_all()
        # let the restarts in progress be seen before the run's actors go
        deadline = time.monotonic() + 120.0
        for thread in self.observers:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def finish(self) -> None:
        self.stop.set()
        with self.cond:
            self.cond.notify_all()
        if self.ident is not None:  # started
            self.join(timeout=LOOKUP_TIMEOUT_S)
        for thread in self.observers:
            thread.join(timeout=10.0)

    # the thread

    def run(self) -> None:
        for kill in self.plan:
            try:
                self._fire(kill)
            except Exception as err:  # a fault of this script must not stop the run
                kill.skipped = f"{type(err).__name__}: {_first_line(err)}"
                self.errors.append(f"{kill.kind} kill at step {kill.step}: {kill.skipped}")
            if self.stop.is_set():
                break
        for kill in self.plan:
            if not kill.done and kill.skipped is None:
                kill.skipped = "the run ended first"

    def _fire(self, kill: Kill) -> None:
        with self.cond:  # wait for step kill.step (or a later one) to be under way
            self.cond.wait_for(
                lambda: (
                    self.stop.is_set()
                    or (self.controller is not None and self.running and self.step >= kill.step)
                )
            )
            if self.stop.is_set():
                return
            delay = kill.fraction * (self.last_step_s or FIRST_STEP_S)
            step = self.step
            # a random point into the step, or its end if that comes first
            self.cond.wait_for(
                lambda: self.stop.is_set() or not self.running or self.step != step,
                timeout=delay,
            )
            controller, at_step = self.controller, self.step
        if self.stop.is_set():
            return
        if controller is None:
            kill.skipped = "no controller at the time (the run was stopping)"
            return
        if at_step >= self.steps - 1:
            kill.skipped = f"step {at_step} is the last one"
            return
        self._kill(kill, controller, at_step)

    def _kill(self, kill: Kill, controller: Any, at_step: int) -> None:
        before: dict[str, Any] = {}
        if kill.kind == "rollout_worker":
            handle = controller.rollouts.workers[kill.index]
            pid = _ask_pid(handle, kill.kind, LOOKUP_TIMEOUT_S)
        elif kill.kind == "buffer":
            handle = controller.buffer
            if handle is None:
                kill.skipped = "no replay buffer (algo.sil.enabled=false)"
                return
            before = ray.get(handle.stats.remote(), timeout=LOOKUP_TIMEOUT_S)
            pid = _ask_pid(handle, kill.kind, LOOKUP_TIMEOUT_S)
        else:  # a dead rank is not restarted: the run stops (and is resumed)
            handle = None
            pid = controller.learners.info[kill.index]["pid"]
        proc = psutil.Process(pid)
        name = f"ray::{ACTOR_CLASS[kill.kind]}"
        if name not in " ".join(proc.cmdline()):
            kill.skipped = f"pid {pid} is not a {name} process"
            return
        proc.send_signal(signal.SIGKILL)  # psutil refuses if the pid was reused meanwhile
        kill.fired_at = time.monotonic()
        kill.pid, kill.at_step, kill.done = pid, at_step, True
        log(f"chaos: SIGKILL {kill.kind} {kill.index} (pid {pid}) during step {at_step}")
        with contextlib.suppress(psutil.Error):
            proc.wait(timeout=EXIT_TIMEOUT_S)
        if handle is None:
            return
        if kill.kind == "buffer":
            restored = _buffer_checkpoint_counters(controller.run.buffer_dir)
            kill.rows_lost = max(
                0, int(before.get("admitted_total", 0)) - int(restored.get("admitted_total", 0))
            )
        observer = threading.Thread(
            target=self._observe_restart, args=(kill, handle), name="chaos-observer", daemon=True
        )
        self.observers.append(observer)
        observer.start()

    def _observe_restart(self, kill: Kill, handle: Any) -> None:
        """Ask the killed actor its pid until a new one answers."""
        deadline = kill.fired_at + RESTART_TIMEOUT_S
        while time.monotonic() < deadline and not self.stop.is_set():
            try:
                pid = _ask_pid(handle, kill.kind, timeout_s=10.0)
            except Exception:  # restarting (or gone with the run): ask again
                self.stop.wait(1.0)
                continue
            if pid != kill.pid:
                kill.new_pid, kill.restart_s = pid, time.monotonic() - kill.fired_at
                log(f"chaos: {kill.kind} {kill.index} is back as pid {pid} ({kill.restart_s:.1f}s)")
                return
            self.stop.wait(1.0)


def _ask_pid(handle: Any, kind: str, timeout_s: float) -> int:
    """The pid of a rollout worker (health()) or of the buffer (pid())."""
    if kind == "buffer":
        return int(ray.get(handle.pid.remote(), timeout=timeout_s))
    return int(ray.get(handle.health.remote(), timeout=timeout_s)["pid"])


def _buffer_checkpoint_counters(buffer_dir: Path) -> dict[str, Any]:
    """The counters of the buffer's own checkpoint file ({} if none yet)."""
    import numpy as np

    from buffers.replay_buffer import CHECKPOINT_NAME

    path = Path(buffer_dir) / CHECKPOINT_NAME
    if not path.is_file():
        return {}
    with np.load(path, allow_pickle=False) as data:
        return dict(json.loads(str(data["meta"])).get("counters") or {})


def _first_line(err: BaseException) -> str:
    """One line: a failed actor call's own exception (not Ray's task header), no colours."""
    cause = getattr(err, "cause", None) if isinstance(err, ray.exceptions.RayTaskError) else None
    text = f"{type(cause).__name__}: {cause}" if isinstance(cause, BaseException) else str(err)
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines()]
    return next((line for line in lines if line), type(err).__name__)[:300]


# ----------------------------------------------------------------------------- the checks


def check_final_checkpoint(run: RunDir, steps: int) -> tuple[bool, str, str | None]:
    """(loads?, what was found, the checkpoint's name)."""
    import torch
    from transformers import AutoModelForCausalLM

    checkpoint = run.usable_checkpoint(checksums=True, log=log)
    if checkpoint is None:
        return False, "no usable checkpoint", None
    expected = f"step_{steps - 1:06d}"
    if checkpoint.name != expected:
        return False, f"newest usable checkpoint is {checkpoint.name}, not {expected}", None
    policy = checkpoint / "learner" / "policy"
    try:
        model = AutoModelForCausalLM.from_pretrained(str(policy))
    except Exception as err:
        return False, f"{policy} does not load: {type(err).__name__}: {_first_line(err)}", None
    params = dict(model.named_parameters())
    bad = [name for name, p in params.items() if not torch.isfinite(p).all()]
    if bad:
        return False, f"{policy}: non-finite parameters {bad[:3]}", checkpoint.name
    count = sum(p.numel() for p in params.values())
    detail = f"{checkpoint.name} verified (sizes + CRC) and loaded ({count} finite parameters)"
    return True, detail, checkpoint.name


def metrics_totals(run: RunDir) -> dict[str, Any]:
    """Steps with a metrics row, and the rollout fault counts summed over every step row."""
    rows = [r for r in run.read_metrics() if "reward/mean" in r]

    def total(key: str) -> int:
        return int(sum(r.get(key) or 0 for r in rows))

    last = rows[-1] if rows else {}
    return {
        "steps_seen": sorted({int(r["step"]) for r in rows}),
        "worker_restarts": total("rollout/worker_restarts"),
        "groups_reissued": total("rollout/groups_reissued"),
        "groups_dropped": total("rollout/groups_dropped"),
        "samples_dropped": total("rollout/samples_dropped"),
        "buffer_missing_steps": last.get("buffer/missing_steps_total"),
    }


# ----------------------------------------------------------------------------- the run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(parser, steps=12)
    parser.add_argument("--seed", type=int, default=0, help="kill plan seed")
    parser.add_argument("--kills-per-kind", type=int, default=1)
    parser.add_argument(
        "--kill-learner",
        action="store_true",
        help="also kill learner ranks (the run stops; it is resumed from its last checkpoint)",
    )
    parser.add_argument("--checkpoint-every", type=int, default=2, help="checkpoint.every_steps")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train with kills, then check; the report (see the module docstring)."""
    from spear_ray.train import run_training

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    runs_dir = args.runs_dir or tempfile.mkdtemp(prefix="chaos-")
    own = [
        "run.eval_every_steps=0",
        f"checkpoint.every_steps={args.checkpoint_every}",
        # enough restarts for every kill (a worker restarted unseen counts too)
        f"rollout.max_restarts={max(3, args.kills_per_kind + 1)}",
    ]
    config = demo_config(args, runs_dir, "chaos", own)
    kinds = ["rollout_worker", "buffer", *(["learner_rank"] if args.kill_learner else [])]
    sizes = {"rollout_worker": config.rollout.num_workers, "learner_rank": config.learner.num_ranks}
    rng = random.Random(args.seed)
    plan = plan_kills(rng, config.run.total_steps, args.kills_per_kind, kinds, sizes)
    log("chaos: plan " + ", ".join(f"{k.kind} {k.index} in step {k.step}" for k in plan))
    killer = Killer(plan, config.run.total_steps)
    stops: list[str] = []
    resumes = 0
    completed = False
    owns_ray = start_ray(config, args.address, args.verbose)
    try:
        run_dir = RunDir.create(config)
        killer.start()
        with hooked_controller(killer.attach, killer.step_start, killer.step_end, killer.detach):
            while True:
                try:
                    run_training(config, run=run_dir, resume=resumes > 0, log=log)
                    completed = True
                    break
                except Exception as err:
                    stops.append(f"{type(err).__name__}: {_first_line(err)}")
                    log(f"chaos: the run stopped: {stops[-1]}")
                    learner_kills = sum(k.done for k in plan if k.kind == "learner_rank")
                    if learner_kills <= resumes:  # not explained by a kill of ours
                        break
                    resumes += 1
                    log(f"chaos: resuming {run_dir.path} (resume {resumes})")
        killer.finish()
        totals = metrics_totals(run_dir)
        steps_done = len(totals["steps_seen"])
        completed = completed and totals["steps_seen"] == list(range(config.run.total_steps))
        loads, checkpoint_line, checkpoint = check_final_checkpoint(run_dir, config.run.total_steps)
    finally:
        killer.finish()
        if owns_ray:
            ray.shutdown()
        if args.runs_dir is None:
            shutil.rmtree(runs_dir, ignore_errors=True)

    def done(kind: str) -> list[Kill]:
        return [k for k in plan if k.kind == kind and k.done]

    lost = [k.rows_lost for k in done("buffer") if k.rows_lost is not None]
    return {
        "steps": config.run.total_steps,
        "steps_completed": steps_done,
        "completed": completed,
        "seed": args.seed,
        "kills_planned": {kind: sum(k.kind == kind for k in plan) for kind in kinds},
        "kills": {kind: len(done(kind)) for kind in kinds},
        "restarts": {
            "rollout_worker": sum(k.new_pid is not None for k in done("rollout_worker")),
            "buffer": sum(k.new_pid is not None for k in done("buffer")),
            "learner_rank": resumes,
        },
        "restart_s": {
            kind: [round(k.restart_s, 1) for k in done(kind) if k.restart_s is not None]
            for kind in ("rollout_worker", "buffer")
        },
        "worker_restarts_counted": totals["worker_restarts"],
        "groups_reissued": totals["groups_reissued"],
        "groups_dropped": totals["groups_dropped"],
        "samples_dropped": totals["samples_dropped"],
        "buffer_rows_lost": sum(lost) if lost else 0,
        "buffer_missing_steps": totals["buffer_missing_steps"],
        "resumes": resumes,
        "stops": stops,
        "checkpoint": checkpoint,
        "checkpoint_loads": loads,
        "checkpoint_detail": checkpoint_line,
        "ok": completed and loads,
        "wall_s": round(time.monotonic() - started, 1),
        "plan": [{k: v for k, v in asdict(kill).items() if k != "fired_at"} for kill in plan],
        "killer_errors": killer.errors,
        "run_dir": str(run_dir.path) if args.runs_dir else None,
    }


def report(r: dict[str, Any]) -> None:
    status = "run complete" if r["completed"] else "RUN DID NOT COMPLETE"
    print(
        f"chaos: {r['steps_completed']}/{r['steps']} steps ({status}) in {r['wall_s']:.0f} s, "
        f"seed {r['seed']}"
    )
    for kill in r["plan"]:
        where = f"pid {kill['pid']} in step {kill['at_step']}" if kill["done"] else kill["skipped"]
        back = ""
        if kill["new_pid"]:
            back = f", back as pid {kill['new_pid']} after {kill['restart_s']:.1f} s"
        print(f"  kill {kill['kind']} {kill['index']} (planned step {kill['step']}): {where}{back}")
    restarts = ", ".join(f"{kind} {n}" for kind, n in r["restarts"].items())
    print(
        f"restarts observed: {restarts} (rollout/worker_restarts counted by the controller: "
        f"{r['worker_restarts_counted']}; resumes: {r['resumes']})"
    )
    print(
        f"groups re-issued {r['groups_reissued']}, dropped {r['groups_dropped']} "
        f"(samples dropped {r['samples_dropped']})"
    )
    print(
        f"buffer rows lost: {r['buffer_rows_lost']} (admitted before a kill, not in the restored "
        f"checkpoint); buffer steps never applied: {r['buffer_missing_steps']}"
    )
    for stop in r["stops"]:
        print(f"run stopped: {stop}")
    loads = "loads" if r["checkpoint_loads"] else "DOES NOT LOAD"
    print(f"final checkpoint {loads}: {r['checkpoint_detail']}")
    keys = (
        "steps",
        "steps_completed",
        "completed",
        "kills",
        "restarts",
        "worker_restarts_counted",
        "groups_reissued",
        "groups_dropped",
        "samples_dropped",
        "buffer_rows_lost",
        "buffer_missing_steps",
        "resumes",
        "checkpoint",
        "checkpoint_loads",
        "restart_s",
        "wall_s",
        "seed",
        "ok",
    )
    print(json.dumps({k: r[k] for k in keys}))


def main(argv: list[str] | None = None) -> int:
    result = run(parse_args(argv))
    report(result)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
