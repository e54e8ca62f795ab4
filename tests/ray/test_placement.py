"""Placement groups from the resources config, on a real local Ray (2 CPUs, no GPU): actors land
in their bundles, an impossible request fails fast with one line naming the config fields, and
shutdown frees everything. Cheap probe actors stand in for the real ones except in the last test,
which starts a real RolloutGroup (tiny model, one worker)."""

from __future__ import annotations

import time

import pytest
import ray
from ray.util import placement_group_table

from actors.rollout_group import RolloutGroup
from learners.learner_group import LearnerError, LearnerGroup
from spear_ray.config import load_config
from spear_ray.placement import PlacementError, bundle_of, in_bundle, kill_actors, remove, reserve
from spear_ray.recipe import learner_spec, rollout_spec

pytestmark = pytest.mark.ray

FAIL_FAST_S = 1.0  # placement timeout of the impossible requests


class Probe:
    """A stand-in actor: says which placement group it runs in."""

    def where(self) -> str | None:
        return ray.get_runtime_context().get_placement_group_id()

    def shutdown(self) -> None:
        pass


class HangsOnShutdown(Probe):
    def shutdown(self) -> None:
        time.sleep(600)


class NoShutdown:
    def ping(self) -> bool:
        return True


def _free_cpus() -> float:
    return ray.available_resources().get("CPU", 0.0)


def _wait_for_cpus(expected: float, timeout_s: float = 20.0) -> float:
    """Resources come back asynchronously after a kill / removal; poll until they do."""
    deadline = time.monotonic() + timeout_s
    while _free_cpus() < expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return _free_cpus()


def _bundle_cpus_left(group, index: int) -> float:
    """The CPUs still free in bundle `index` (Ray names them CPU_group_<index>_<group id>)."""
    return ray.available_resources().get(f"CPU_group_{index}_{group.id.hex()}", 0.0)


def _no_pending_groups() -> bool:
    return all(info["state"] != "PENDING" for info in placement_group_table().values())


def _config(**overrides):
    base = {
        "model.path": "builtin:tiny-random",
        "model.dtype": "float32",
        "rollout.num_workers": 1,
        "rollout.samples_per_prompt": 2,
        "rollout.prompts_per_step": 4,
        "rollout.max_tokens_per_turn": 8,
        "rollout.cpu_kv_cache_gib": 0.25,
        "resources.cpus_per_rollout_worker": 0.5,
        "env.options": "{max_turns: 3}",
        **overrides,
    }
    return load_config("demo", [f"{k}={v}" for k, v in base.items()])


# ----------------------------------------------------------------------------- the helpers


def test_actors_land_in_their_bundles_and_shutdown_frees_the_cpus(ray_local):
    # start from an idle cluster: earlier tests' actors may still be releasing their CPUs
    free_before = _wait_for_cpus(ray.cluster_resources()["CPU"])
    group = reserve(bundle_of(cpus=0.5), 2, strategy="PACK", what="probes", fields=("x.y",))
    actors = []
    try:
        assert placement_group_table(group)["bundles"] == {0: {"CPU": 0.5}, 1: {"CPU": 0.5}}
        assert placement_group_table(group)["strategy"] == "PACK"
        probe = ray.remote(Probe)
        actors = [
            probe.options(num_cpus=0.5, scheduling_strategy=in_bundle(group, i)).remote()
            for i in range(2)
        ]
        assert ray.get([a.where.remote() for a in actors]) == [group.id.hex()] * 2
        assert [_bundle_cpus_left(group, i) for i in range(2)] == [0.0, 0.0]  # one per bundle
        deadline = time.monotonic() + 20  # the resource view is updated asynchronously
        while _free_cpus() > free_before - 1.0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _free_cpus() == pytest.approx(free_before - 1.0)
    finally:
        kill_actors(actors, timeout_s=10)
        remove(group)
    assert placement_group_table(group)["state"] == "REMOVED"
    assert _wait_for_cpus(free_before) == pytest.approx(free_before)
    remove(group)  # removing twice is fine


def test_bundle_of_leaves_out_a_zero_gpu_count():
    assert bundle_of(2) == {"CPU": 2.0}
    assert bundle_of(2, 0.0) == {"CPU": 2.0}
    assert bundle_of(1, 4) == {"CPU": 1.0, "GPU": 4.0}


@pytest.mark.parametrize(
    ("bundle", "asked"), [({"CPU": 64.0}, "{CPU: 64} x 2"), ({"CPU": 0.5, "GPU": 1.0}, "GPU: 1}")]
)
def test_an_impossible_request_fails_fast_with_one_line(ray_local, bundle, asked):
    t0 = time.monotonic()
    with pytest.raises(PlacementError) as info:
        reserve(bundle, 2, what="probes", fields=("a.b", "c.d"), timeout_s=FAIL_FAST_S)
    assert time.monotonic() - t0 < FAIL_FAST_S + 10
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("cannot place 2 probes within 1 s: ")
    assert asked in message and "(PACK)" in message
    assert "the cluster has {CPU: 2, GPU: 0} in total" in message
    assert "lower a.b, c.d, change resources.placement_strategy" in message
    assert _no_pending_groups()  # the pending group was removed, nothing stays reserved


def test_kill_actors_tolerates_hung_dead_and_shutdown_less_actors(ray_local):
    hung = ray.remote(HangsOnShutdown).options(num_cpus=0).remote()
    dead = ray.remote(Probe).options(num_cpus=0).remote()
    plain = ray.remote(NoShutdown).options(num_cpus=0).remote()
    fine = ray.remote(Probe).options(num_cpus=0).remote()
    ray.get([hung.where.remote(), dead.where.remote(), plain.ping.remote(), fine.where.remote()])
    ray.kill(dead)
    t0 = time.monotonic()
    kill_actors([hung, dead, plain, fine], timeout_s=2)
    assert time.monotonic() - t0 < 10  # one shared timeout, not one per actor
    for actor, method in [(hung, "where"), (plain, "ping"), (fine, "where")]:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(getattr(actor, method).remote(), timeout=30)


# ----------------------------------------------------------------------------- the groups


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"resources.cpus_per_rollout_worker": 64}, "resources.cpus_per_rollout_worker"),
        ({"resources.gpus_per_rollout_worker": 1}, "resources.gpus_per_rollout_worker"),
    ],
)
def test_rollout_group_that_cannot_be_placed_names_the_config_fields(ray_local, overrides, field):
    t0 = time.monotonic()
    with pytest.raises(PlacementError) as info:
        RolloutGroup(rollout_spec(_config(**overrides)), placement_timeout_s=FAIL_FAST_S)
    assert time.monotonic() - t0 < FAIL_FAST_S + 10
    message = str(info.value)
    assert "\n" not in message and message.startswith("cannot place 1 rollout workers")
    assert "rollout.num_workers" in message and field in message
    assert _no_pending_groups()


def test_learner_group_that_cannot_be_placed_is_a_learner_error(ray_local):
    config = load_config("demo", ["resources.cpus_per_learner=64"])
    with pytest.raises(LearnerError) as info:
        LearnerGroup(learner_spec(config), placement_timeout_s=FAIL_FAST_S)
    assert isinstance(info.value, PlacementError)
    message = str(info.value)
    assert "\n" not in message and message.startswith("cannot place 1 learner ranks")
    assert "{CPU: 64} x 1" in message
    assert "learner.num_ranks, resources.cpus_per_learner, resources.gpus_per_learner" in message
    assert _no_pending_groups()


def test_rollout_group_starts_its_worker_in_its_placement_group(ray_local):
    free_before = _wait_for_cpus(ray.cluster_resources()["CPU"])
    rollouts = RolloutGroup(rollout_spec(_config()))
    try:
        group = rollouts.placement_group
        assert placement_group_table(group)["bundles"] == {0: {"CPU": 0.5}}
        worker = rollouts.workers[0]
        where = worker.__ray_call__.remote(
            lambda self: ray.get_runtime_context().get_placement_group_id()
        )
        assert ray.get(where) == group.id.hex()
        assert _bundle_cpus_left(group, 0) == 0.0
        assert rollouts.health()[0]["worker_index"] == 0  # the engine started in the bundle
    finally:
        rollouts.shutdown()
    assert rollouts.placement_group is None and rollouts.workers == []
    assert placement_group_table(group)["state"] == "REMOVED"
    assert _wait_for_cpus(free_before) == pytest.approx(free_before)
    rollouts.shutdown()  # a second shutdown is harmless


# ----------------------------------------------------------------------------- fixed clusters


def test_a_run_a_local_ray_can_never_hold_fails_before_anything_waits(ray_local, monkeypatch):
    from spear_ray import placement
    from spear_ray.train import run_demands

    config = load_config("demo", ["learner.num_ranks=2"])  # 2 + 1 CPUs on a 2-CPU Ray
    monkeypatch.setattr(placement, "_started_local_ray", False)
    placement.check_fits(run_demands(config))  # a Ray we joined may grow: left to reserve
    monkeypatch.setattr(placement, "_started_local_ray", True)
    with pytest.raises(PlacementError) as info:
        placement.check_fits(run_demands(config))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("this run needs 3 CPUs (2 learner ranks x 1 + 1 rollout workers x 1)")
    assert "the local Ray has 2 and cannot grow" in message
    assert "learner.num_ranks" in message and "rollout.num_workers" in message
    placement.check_fits(run_demands(load_config("demo")))  # 1 + 1 fits
    assert _no_pending_groups()


def test_a_waiting_placement_says_so_while_it_waits(ray_local, monkeypatch):
    from spear_ray import placement

    monkeypatch.setattr(placement, "PROGRESS_EVERY_S", 0.3)
    lines: list[str] = []
    with pytest.raises(PlacementError):
        reserve({"CPU": 64.0}, 1, what="probes", timeout_s=1.5, log=lines.append)
    assert lines, "no progress line while waiting"
    assert all(line.startswith("waiting to place 1 probes ({CPU: 64} x 1): ") for line in lines)
    assert "the cluster has {CPU: 2, GPU: 0} free" in lines[0]
    assert _no_pending_groups()
