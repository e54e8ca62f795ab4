"""clusters/: the launch files are valid and sized for the presets they claim to serve.

Ray cluster launcher files are validated against the JSON schema that ships inside the `ray`
package, raw and after the config preparation `ray up` does before it talks to a cloud
(`ray.autoscaler._private.util`, a private module: if it moves, update the import). The KubeRay
manifests get structure checks (their CRD schemas are not shipped with any Python package here).
No Ray is started.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path, PurePosixPath

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from spear_ray.config import load_config, preset_names

ROOT = Path(__file__).resolve().parents[2]
CLUSTERS = ROOT / "clusters"
LAUNCHER_FILES = ("aws-gpu.yaml", "gcp-gpu.yaml", "local.yaml")
KUBERAY_FILES = {"kuberay-raycluster.yaml": "RayCluster", "kuberay-rayjob.yaml": "RayJob"}
GPU_PRESETS = {"textworld-1.5b", "math-code-32b"}
COMMAND_KEYS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTERS / name).read_text())


@functools.cache
def _ray_schema() -> dict:
    return json.loads(Path(ray.autoscaler.__file__).with_name("ray-schema.json").read_text())


def _validate_launcher(config: dict) -> dict:
    """What `ray up` checks before it launches anything; returns the prepared config."""
    jsonschema.validate(config, _ray_schema())
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


# ----------------------------------------------------------------------------- placement


def _bundles(preset: str) -> list[tuple[float, float]]:
    """(CPU, GPU) of every placement-group bundle the preset reserves (README.md, Placement)."""
    cfg = load_config(preset)
    res = cfg.resources
    learners = [(res.cpus_per_learner, res.gpus_per_learner)] * cfg.learner.num_ranks
    rollout = [(res.cpus_per_rollout_worker, res.gpus_per_rollout_worker)] * cfg.rollout.num_workers
    return learners + rollout


def _gpus_needed(preset: str) -> float:
    cfg = load_config(preset)
    res = cfg.resources
    return (
        cfg.learner.num_ranks * res.gpus_per_learner
        + cfg.rollout.num_workers * res.gpus_per_rollout_worker
    )


def _packs(bundles: list[tuple[float, float]], nodes: list[tuple[float, float]]) -> bool:
    """First-fit decreasing: does every bundle fit on some node (a bundle never spans nodes)?"""
    free = [list(node) for node in nodes]
    for cpu, gpu in sorted(bundles, key=lambda b: (b[1], b[0]), reverse=True):
        for node in free:
            if node[0] >= cpu and node[1] >= gpu:
                node[0] -= cpu
                node[1] -= gpu
                break
        else:
            return False
    return True


def _assert_serves(preset: str, nodes: list[tuple[float, float]], where: str) -> None:
    needed = _gpus_needed(preset)
    have = sum(gpu for _, gpu in nodes)
    assert needed > 0, f"{preset} asks for no GPUs"
    assert have >= needed, f"{where}: {preset} needs {needed:g} GPUs, at most {have:g} available"
    assert _packs(_bundles(preset), nodes), (
        f"{where}: {preset}'s placement-group bundles do not fit on the worker nodes {nodes}"
    )


def test_the_packing_check_can_fail():
    assert _packs([(4, 1)] * 8, [(48, 8)])
    assert not _packs([(16, 4)] * 3, [(96, 8)])  # 12 GPUs on an 8-GPU node
    assert not _packs([(16, 4)] * 3, [(96, 4), (96, 4), (8, 4)])  # the third node lacks CPUs
    assert not _packs([(4, 1)] * 9, [(96, 8)])


# ----------------------------------------------------------------------------- launcher files


def test_every_cluster_file_is_covered_here():
    files = {p.name for p in CLUSTERS.glob("*.yaml")}
    assert files == set(LAUNCHER_FILES) | set(KUBERAY_FILES)


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_file_validates_against_rays_schema(name):
    _validate_launcher(_load(name))


def _unknown_top_level_field(config):
    config["head_start_commands"] = ["ray start --head"]


def _negative_max_workers(config):
    config["max_workers"] = -1


def _no_provider_type(config):
    del config["provider"]["type"]


def _commands_not_a_list(config):
    config["setup_commands"] = "pip install spear-ray"


@pytest.mark.parametrize(
    "breakage",
    [_unknown_top_level_field, _negative_max_workers, _no_provider_type, _commands_not_a_list],
)
@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_a_broken_launcher_file_fails_validation(name, breakage):
    config = _load(name)
    breakage(config)
    with pytest.raises(jsonschema.ValidationError):
        _validate_launcher(config)


@pytest.mark.parametrize("name", ["aws-gpu.yaml", "gcp-gpu.yaml"])
def test_a_node_type_with_a_fractional_gpu_count_fails_validation(name):
    config = _load(name)
    config["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 7.5
    with pytest.raises(jsonschema.ValidationError):
        _validate_launcher(config)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_commands_are_valid_bash(name):
    prepared = _validate_launcher(_load(name))
    commands = [cmd for key in COMMAND_KEYS for cmd in prepared.get(key, [])]
    for node_type in prepared["available_node_types"].values():
        commands += node_type.get("initialization_commands", [])
        commands += node_type.get("worker_setup_commands", [])
    assert commands
    for cmd in commands:
        result = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
        assert result.returncode == 0, f"{name}: {cmd!r}: {result.stderr}"


def _ray_start(command: str) -> tuple[str | None, list[str]]:
    """(the RAY_AUTH_MODE assignment right before `ray start`, the `ray start` arguments)."""
    words = shlex.split(command)
    for i in range(len(words) - 1):
        if words[i : i + 2] == ["ray", "start"]:
            env = words[i - 1] if i > 0 and words[i - 1].startswith("RAY_AUTH_MODE=") else None
            return env, words[i + 2 :]
    raise AssertionError(f"no `ray start` in {command!r}")


def _option_values(args: list[str], option: str) -> list[str]:
    values = [a.split("=", 1)[1] for a in args if a.startswith(option + "=")]
    values += [args[i + 1] for i, a in enumerate(args[:-1]) if a == option]
    return values


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_head_binds_dashboard_to_loopback_with_token_auth(name):
    config = _load(name)
    starts = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 1, starts
    env, args = _ray_start(starts[0])
    assert "--head" in args
    assert _option_values(args, "--dashboard-host") == ["127.0.0.1"]
    assert env == "RAY_AUTH_MODE=token"


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_workers_join_with_token_auth_and_the_token_reaches_every_node(name):
    config = _load(name)
    starts = [c for c in config["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 1, starts
    env, args = _ray_start(starts[0])
    assert env == "RAY_AUTH_MODE=token"
    assert _option_values(args, "--address") == ["$RAY_HEAD_IP:6379"]
    # the token file is copied to the head, and from the head to every worker
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    text = (CLUSTERS / name).read_text()
    assert "RAY_AUTH_MODE=disabled" not in text
    assert "dashboard-host=0.0.0.0" not in text


@pytest.mark.parametrize("name", ["aws-gpu.yaml", "gcp-gpu.yaml"])
def test_head_node_takes_no_training_actors(name):
    config = _load(name)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("CPU") == 0
    assert head["resources"].get("GPU", 0) == 0


def _launcher_worker_nodes(config: dict) -> list[tuple[float, float]]:
    """(CPU, GPU) of the most worker nodes the autoscaler may run at once, largest first."""
    nodes = []
    for name, node_type in config["available_node_types"].items():
        if name != config["head_node_type"]:
            count = node_type.get("max_workers", config["max_workers"])
            res = node_type["resources"]
            nodes += [(res.get("CPU", 0), res.get("GPU", 0))] * count
    nodes.sort(key=lambda n: (n[1], n[0]), reverse=True)
    return nodes[: config["max_workers"]]


LAUNCHER_CLAIMS = [
    (name, preset)
    for name in LAUNCHER_FILES
    for preset in _load(name).get("metadata", {}).get("spear_ray_presets", [])
]


def test_cloud_files_claim_both_gpu_presets():
    claimed = {name: {p for n, p in LAUNCHER_CLAIMS if n == name} for name in LAUNCHER_FILES}
    assert claimed["aws-gpu.yaml"] == GPU_PRESETS
    assert claimed["gcp-gpu.yaml"] == GPU_PRESETS


@pytest.mark.parametrize(("name", "preset"), LAUNCHER_CLAIMS)
def test_launcher_worker_nodes_hold_the_presets_they_claim(name, preset):
    assert preset in preset_names()
    config = _load(name)
    _assert_serves(preset, _launcher_worker_nodes(config), name)


@pytest.mark.parametrize("name", ["aws-gpu.yaml", "gcp-gpu.yaml"])
def test_min_workers_keep_the_smallest_claimed_preset_ready(name):
    """spear-ray waits 120 s for its placement groups, less than a GPU node takes to start."""
    config = _load(name)
    head = config["head_node_type"]
    types = [t for n, t in config["available_node_types"].items() if n != head]
    ready = sum(t.get("min_workers", 0) * t["resources"].get("GPU", 0) for t in types)
    smallest = min(_gpus_needed(p) for p in config["metadata"]["spear_ray_presets"])
    assert ready >= smallest


def test_too_few_worker_nodes_fail_the_preset_check():
    config = _load("aws-gpu.yaml")
    config["available_node_types"]["gpu_worker"]["max_workers"] = 3
    with pytest.raises(AssertionError, match="math-code-32b needs 32 GPUs"):
        _assert_serves("math-code-32b", _launcher_worker_nodes(config), "aws-gpu.yaml")


def test_gcp_disk_type_is_in_the_providers_zone():
    config = _load("gcp-gpu.yaml")
    zone = config["provider"]["availability_zone"]
    for node_type in config["available_node_types"].values():
        for disk in node_type["node_config"]["disks"]:
            disk_type = disk["initializeParams"].get("diskType")
            if disk_type is not None:
                assert disk_type.startswith(f"zones/{zone}/"), disk_type


def _installable_sources() -> set[str]:
    """pyproject.toml, its readme and the top-level packages it installs."""
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    return {"pyproject.toml", pyproject["project"]["readme"]} | {p.rstrip("*") for p in include}


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_ships_the_installable_project(name):
    mounts = _load(name)["file_mounts"]
    shipped = set()
    for remote, local in mounts.items():
        if remote.startswith("~/spear-ray/"):
            assert (ROOT / local).exists(), f"{name}: file_mounts source {local} does not exist"
            assert PurePosixPath(remote).name == PurePosixPath(local).name
            shipped.add(PurePosixPath(local).name)
    assert shipped == _installable_sources()


def test_image_holds_the_installable_project():
    copied = set()
    for line in (CLUSTERS / "gpu.Dockerfile").read_text().splitlines():
        words = line.split()
        if words and words[0] == "COPY":
            copied |= {w.rstrip("/") for w in words[1:-1] if not w.startswith("--")}
    assert copied == _installable_sources()
    for source in copied:
        assert (ROOT / source).exists()


def test_cluster_ray_versions_match_the_installed_ray():
    """`ray up` and `ray job submit` need the cluster's Ray to be the submitter's Ray."""
    version = ray.__version__
    image = re.escape(f"rayproject/ray:{version}-")
    for name in ("aws-gpu.yaml", "gcp-gpu.yaml"):
        assert re.match(image, _load(name)["docker"]["image"]), name
    local_setup = " ".join(_load("local.yaml")["setup_commands"])
    assert f"=={version}" in local_setup
    dockerfile = (CLUSTERS / "gpu.Dockerfile").read_text()
    assert re.search(rf"^FROM {image}", dockerfile, re.MULTILINE)
    for name in KUBERAY_FILES:
        assert _cluster_spec(_load(name))["rayVersion"] == version, name


# ----------------------------------------------------------------------------- KubeRay


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def _quantity(value) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


@pytest.mark.parametrize(("name", "kind"), KUBERAY_FILES.items())
def test_kuberay_manifest_structure(name, kind):
    doc = _load(name)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == kind
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    spec = _cluster_spec(doc)
    assert spec["authOptions"]["mode"] == "token"

    head = spec["headGroupSpec"]
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())
    assert head["rayStartParams"]["num-cpus"] == "0"
    head_container = head["template"]["spec"]["containers"][0]
    assert head_container["image"]
    assert "nvidia.com/gpu" not in head_container["resources"].get("limits", {})

    groups = spec["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert group["groupName"]
        assert isinstance(group["rayStartParams"], dict)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        container = group["template"]["spec"]["containers"][0]
        resources = container["resources"]
        assert int(resources["limits"]["nvidia.com/gpu"]) > 0
        if "nvidia.com/gpu" in resources.get("requests", {}):
            assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
    # every Ray node runs the same environment
    assert len({c["image"] for c in _containers(spec)}) == 1


def _kuberay_worker_nodes(spec: dict) -> list[tuple[float, float]]:
    nodes = []
    for group in spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        node = (_quantity(limits["cpu"]), _quantity(limits["nvidia.com/gpu"]))
        nodes += [node] * group["maxReplicas"]
    return nodes


def test_raycluster_holds_the_presets_it_claims():
    doc = _load("kuberay-raycluster.yaml")
    claimed = set(doc["metadata"]["annotations"]["spear-ray/presets"].split(","))
    assert claimed == GPU_PRESETS
    for preset in claimed:
        _assert_serves(preset, _kuberay_worker_nodes(doc["spec"]), "kuberay-raycluster.yaml")


def _mounted_volume_paths(pod_spec: dict) -> set[str]:
    """Mount paths of the first container's PersistentVolumeClaim volumes."""
    claims = {v["name"] for v in pod_spec.get("volumes", []) if "persistentVolumeClaim" in v}
    mounts = pod_spec["containers"][0].get("volumeMounts", [])
    return {m["mountPath"] for m in mounts if m["name"] in claims}


def test_rayjob_trains_a_preset_into_a_volume_every_node_mounts():
    doc = _load("kuberay-rayjob.yaml")
    spec = doc["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["spear-ray", "train", "--config"]
    preset, overrides = argv[3], argv[4:]
    assert preset in GPU_PRESETS
    load_config(preset, overrides)  # the overrides are valid
    runs_dirs = [o.split("=", 1)[1] for o in overrides if o.startswith("run.runs_dir=")]
    assert len(runs_dirs) == 1
    runs_dir = PurePosixPath(runs_dirs[0])
    assert runs_dir.is_absolute()  # a job's working directory is a temporary copy
    cluster = spec["rayClusterSpec"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        paths = _mounted_volume_paths(group["template"]["spec"])
        assert any(runs_dir.is_relative_to(p) for p in paths), (group, paths)

    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    assert spec["shutdownAfterJobFinishes"] is True
    _assert_serves(preset, _kuberay_worker_nodes(cluster), "kuberay-rayjob.yaml")
