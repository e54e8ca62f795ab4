"""Ray placement groups built from the `resources` config, and the shared actor teardown.

    bundle = bundle_of(cpus=res.cpus_per_learner, gpus=res.gpus_per_learner)
    group = reserve(bundle, num_ranks, strategy=res.placement_strategy, what="learner ranks",
                    fields=("learner.num_ranks", "resources.cpus_per_learner", ...))
    actor = ray.remote(Cls).options(num_cpus=..., scheduling_strategy=in_bundle(group, i))
    ...
    kill_actors(actors)
    remove(group)

A group of N identical bundles is reserved all at once (Ray places a group atomically), so a
LearnerGroup or RolloutGroup either gets every bundle or fails with one line: what could not be
placed, what the cluster has, and which config fields to change. On a cluster that can grow (an
autoscaler) a request bigger than today's nodes is what makes new nodes start, so `reserve` waits
up to its timeout, with a progress line every PROGRESS_EVERY_S. A local Ray that `connect_ray`
started cannot grow: `check_fits` compares a run's whole demand with it before anything waits.

Ray is imported here although spear_ray/ is otherwise Ray-free outside the controller and CLI:
this module is used only by the actor groups (actors/, learners/), never by `import spear_ray`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from spear_ray.faults import RunFault

PLACEMENT_TIMEOUT_S = 120.0  # how long a group may wait for resources (or for nodes to start)
PROGRESS_EVERY_S = 15.0  # a line while a group waits
_started_local_ray = False  # set by connect_ray: this process started a local, fixed-size Ray
SHUTDOWN_TIMEOUT_S = 30.0  # how long kill_actors waits for the actors' own shutdown()


class PlacementError(RunFault):
    """A placement group could not be placed; the one-line message says what was asked for,
    what the cluster has and which config fields to change (a RunFault: the CLI prints it as
    one line)."""


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Demand:
    """`count` bundles of one kind a run reserves, and the config fields that set them."""

    what: str
    bundle: Mapping[str, float]
    count: int
    fields: tuple[str, ...]


def cluster_can_grow() -> bool:
    """False when this process started the local Ray it runs on (no autoscaler: its
    resources are all there will ever be); True otherwise, as nothing rules growth out."""
    return not _started_local_ray


def check_fits(demands: Sequence[Demand]) -> None:
    """On a cluster that cannot grow, raise PlacementError at once when the demands together
    need more CPUs or GPUs than the cluster has in total (reserving would wait for its whole
    timeout first). A cluster that can grow is left to `reserve`."""
    if cluster_can_grow():
        return
    total = ray.cluster_resources()
    for key in ("CPU", "GPU"):
        need = sum(d.bundle.get(key, 0.0) * d.count for d in demands)
        if need > total.get(key, 0.0) + 1e-9:
            parts = " + ".join(
                f"{d.count} {d.what} x {d.bundle.get(key, 0.0):g}"
                for d in demands
                if d.bundle.get(key, 0.0)
            )
            fields = ", ".join(f for d in demands for f in d.fields)
            raise PlacementError(
                f"this run needs {need:g} {key}s ({parts}) but the local Ray has "
                f"{total.get(key, 0.0):g} and cannot grow; lower {fields}, or join a larger "
                "cluster with --address"
            )


def bundle_of(cpus: float, gpus: float = 0.0) -> dict[str, float]:
    """One bundle: {"CPU": cpus}, plus {"GPU": gpus} when gpus > 0 (a zero-GPU entry would be
    an error in Ray)."""
    bundle = {"CPU": float(cpus)}
    if gpus > 0:
        bundle["GPU"] = float(gpus)
    return bundle


def _amounts(resources: Mapping[str, float], keys: Iterable[str]) -> str:
    return "{" + ", ".join(f"{key}: {resources.get(key, 0.0):g}" for key in keys) + "}"


def reserve(
    bundle: Mapping[str, float],
    count: int,
    *,
    strategy: str = "PACK",
    what: str = "bundles",
    fields: Sequence[str] = (),
    timeout_s: float = PLACEMENT_TIMEOUT_S,
    name: str = "",
    log: Callable[[str], None] = _stderr,
) -> PlacementGroup:
    """Reserve a placement group of `count` copies of `bundle` and wait until it is placed.

    `what` names the N things placed ("learner ranks"), `fields` the config fields that set
    them; both go into the PlacementError raised when the group is not placed within
    `timeout_s` (the pending group is removed first, so nothing stays reserved)."""
    if count < 1:
        raise ValueError(f"reserve: count must be at least 1, got {count}")
    group = placement_group([dict(bundle) for _ in range(count)], strategy=strategy, name=name)
    ready = group.ready()
    started = time.monotonic()
    while True:
        left = timeout_s - (time.monotonic() - started)
        done, _ = ray.wait([ready], timeout=max(0.0, min(PROGRESS_EVERY_S, left)))
        if done:
            ray.get(ready)
            return group
        if time.monotonic() - started >= timeout_s:
            break
        free = _amounts(ray.available_resources(), sorted({"CPU", "GPU", *bundle}))
        log(
            f"waiting to place {count} {what} ({_amounts(bundle, bundle)} x {count}): "
            f"{time.monotonic() - started:.0f} of {timeout_s:g} s, the cluster has {free} free"
        )
    # timed out: nothing stays reserved
    keys = sorted({"CPU", "GPU", *bundle})
    total, free = ray.cluster_resources(), ray.available_resources()
    remove_placement_group(group)
    change = ", ".join(fields) if fields else "the resources asked for"
    asked = _amounts(bundle, bundle)
    raise PlacementError(
        f"cannot place {count} {what} within {timeout_s:g} s: {asked} x {count} "
        f"({strategy}); the cluster has {_amounts(total, keys)} in total, "
        f"{_amounts(free, keys)} available; lower {change}, change "
        f"resources.placement_strategy, or add nodes"
    )


def in_bundle(group: PlacementGroup, index: int) -> PlacementGroupSchedulingStrategy:
    """The scheduling strategy that puts an actor into bundle `index` of `group`. Tasks and
    actors the actor starts itself are not captured into the group (their resources are not in
    its bundle)."""
    return PlacementGroupSchedulingStrategy(
        placement_group=group, placement_group_bundle_index=index
    )


def remove(group: PlacementGroup | None) -> None:
    """Remove a placement group (its resources are free again); None or an already removed
    group is fine."""
    if group is None:
        return
    with contextlib.suppress(Exception):  # removed already, or Ray is shut down
        remove_placement_group(group)


def kill_actors(actors: Sequence[Any], timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
    """Ask every actor to `shutdown()` (all at once, so one hung actor costs `timeout_s` in all,
    not each), then `ray.kill` every one of them. Dead or hung actors, failing `shutdown`s and
    actors without a `shutdown` method are tolerated: they are killed all the same."""
    refs = []
    for actor in actors:
        with contextlib.suppress(AttributeError):  # no shutdown method: just killed below
            refs.append(actor.shutdown.remote())
    deadline = time.monotonic() + timeout_s
    for ref in refs:
        # died, hung (GetTimeoutError) or its shutdown raised: killed below either way
        with contextlib.suppress(ray.exceptions.RayError):
            ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
    for actor in actors:
        with contextlib.suppress(ValueError):  # not an actor handle
            ray.kill(actor)


def connect_ray(address: str | None, log) -> bool:
    """Start a local Ray, or join `address` (else $RAY_ADDRESS, which a Ray job's entrypoint
    gets), unless Ray is running already; True if this call started or joined it (so the caller
    owns the shutdown)."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log(f"connecting to Ray at {address}")
        ray.init(address=address, log_to_driver=True)
    else:
        global _started_local_ray
        log("starting a local Ray")
        ray.init(include_dashboard=False, log_to_driver=True)
        _started_local_ray = True
    return True
