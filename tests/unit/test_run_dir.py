"""Run directories: refuse to clobber, atomic and fsynced checkpoints with a manifest, keep-last-K,
damaged or partial checkpoints skipped with a message, metrics."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest

from spear_ray.config import ConfigError, load_config
from spear_ray.run_dir import RunDir


def _config(tmp_path, **run):
    overrides = [f"run.runs_dir={tmp_path}", "run.name=r", "checkpoint.keep_last=2"]
    return load_config("demo", overrides + [f"run.{k}={v}" for k, v in run.items()])


def test_create_writes_the_resolved_config_and_refuses_an_existing_run(tmp_path):
    config = _config(tmp_path)
    run = RunDir.create(config)
    again, loaded = RunDir.open(run.path)
    assert loaded == config and again.path == run.path
    with pytest.raises(ConfigError, match="--resume"):
        RunDir.create(config)


def test_open_rejects_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(ConfigError, match="not a spear-ray run directory"):
        RunDir.open(tmp_path)


def test_checkpoints_are_atomic_and_only_the_newest_are_kept(tmp_path):
    run = RunDir.create(_config(tmp_path))
    for step in (9, 19, 29):
        with run.checkpoint(step) as d:
            (d / "payload").write_text(str(step))
    kept = run.complete_checkpoints()
    assert [p.name for p in kept] == ["step_000019", "step_000029"]
    assert run.latest_checkpoint().joinpath("payload").read_text() == "29"
    with pytest.raises(RuntimeError), run.checkpoint(39) as d:
        (d / "payload").write_text("half")
        raise RuntimeError("crash while writing")
    assert run.latest_checkpoint().name == "step_000029"  # the failed one never appears
    assert not list(run.checkpoints_dir.glob(".tmp_*"))


def test_a_checkpoint_without_its_complete_marker_is_ignored(tmp_path):
    run = RunDir.create(_config(tmp_path))
    with run.checkpoint(5) as d:
        (d / "x").write_text("ok")
    partial = run.checkpoints_dir / "step_000007"
    partial.mkdir()
    assert run.latest_checkpoint().name == "step_000005"


def test_metrics_are_appended_as_json_lines_with_nan_as_null(tmp_path):
    run = RunDir.create(_config(tmp_path))
    run.log_metrics({"step": 0, "loss": 1.5})
    run.log_metrics({"step": 1, "loss": math.nan})
    assert run.read_metrics() == [{"step": 0, "loss": 1.5}, {"step": 1, "loss": None}]


# ----------------------------------------------------------------------------- damaged checkpoints


def _save(run, step, size=100):
    with run.checkpoint(step) as d:
        (d / "learner").mkdir()
        (d / "learner" / "model.bin").write_bytes(b"m" * size)
        (d / "buffer.npz").write_bytes(b"b" * 10)
    return run.checkpoints_dir / f"step_{step:06d}"


def test_complete_holds_a_manifest_of_every_file(tmp_path):
    run = RunDir.create(_config(tmp_path))
    checkpoint = _save(run, 1)
    info = json.loads((checkpoint / "COMPLETE").read_text())
    assert info["step"] == 1
    assert sorted(info["files"]) == ["buffer.npz", "learner/model.bin"]
    assert info["files"]["learner/model.bin"]["size"] == 100
    assert run.verify(checkpoint) is None


def test_a_truncated_file_in_the_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    run = RunDir.create(_config(tmp_path))
    _save(run, 1)
    newest = _save(run, 2)
    with (newest / "learner" / "model.bin").open("r+b") as f:
        f.truncate(7)
    lines: list[str] = []
    assert run.usable_checkpoint(checksums=True, log=lines.append).name == "step_000001"
    assert lines == [
        "checkpoint step_000002 is damaged (file learner/model.bin: 7 bytes, expected 100): "
        "using step_000001"
    ]
    assert run.latest_checkpoint().name == "step_000001"  # sizes are checked there too


def test_a_flipped_byte_is_found_by_the_checksum(tmp_path):
    run = RunDir.create(_config(tmp_path))
    _save(run, 1)
    newest = _save(run, 2)
    data = bytearray((newest / "buffer.npz").read_bytes())
    data[3] ^= 0x01
    (newest / "buffer.npz").write_bytes(bytes(data))
    lines: list[str] = []
    assert run.usable_checkpoint(checksums=True, log=lines.append).name == "step_000001"
    assert lines == [
        "checkpoint step_000002 is damaged (file buffer.npz: checksum mismatch): using step_000001"
    ]
    # a missing file and an unreadable COMPLETE are damage too
    (newest / "buffer.npz").unlink()
    assert run.verify(newest).detail == "file buffer.npz: missing"
    (newest / "COMPLETE").write_text("{not json")
    assert run.verify(newest).detail == "file COMPLETE: unreadable"


def test_a_partial_checkpoint_is_skipped_with_a_message(tmp_path):
    run = RunDir.create(_config(tmp_path))
    _save(run, 1)
    partial = run.checkpoints_dir / "step_000002"
    (partial / "learner").mkdir(parents=True)
    lines: list[str] = []
    assert run.usable_checkpoint(checksums=True, log=lines.append).name == "step_000001"
    assert lines == [
        "checkpoint step_000002 is partial (no COMPLETE marker: it was being written when the "
        "run stopped): using step_000001"
    ]
    # with nothing usable left, the message says so
    shutil.rmtree(run.checkpoints_dir / "step_000001")
    lines.clear()
    assert run.usable_checkpoint(log=lines.append) is None
    assert lines[0].endswith("): no earlier usable checkpoint")


def test_keep_last_counts_complete_checkpoints_and_a_complete_without_manifest_is_trusted(
    tmp_path,
):
    run = RunDir.create(_config(tmp_path))  # keep_last=2
    for step in (1, 2, 3, 4):
        _save(run, step)
    assert [p.name for p in run.complete_checkpoints()] == ["step_000003", "step_000004"]
    legacy = run.checkpoints_dir / "step_000005"
    legacy.mkdir()
    (legacy / "COMPLETE").write_text(json.dumps({"step": 5}) + "\n")  # written before manifests
    assert run.verify(legacy) is None and run.latest_checkpoint() == legacy


def test_leftover_temporary_checkpoints_are_removed_on_resume(tmp_path):
    run = RunDir.create(_config(tmp_path))
    _save(run, 1)
    left = run.checkpoints_dir / ".tmp_step_000002"
    (left / "learner").mkdir(parents=True)
    lines: list[str] = []
    run.remove_unfinished(log=lines.append)
    assert not left.exists() and (run.checkpoints_dir / "step_000001").is_dir()
    assert lines == ["removed .tmp_step_000002, a checkpoint left unfinished when the run stopped"]


def test_files_and_directories_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    import spear_ray.run_dir as run_dir_module

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src)))
        real_replace(src, dst)

    monkeypatch.setattr(run_dir_module.os, "fsync", fsync)
    monkeypatch.setattr(run_dir_module.os, "replace", replace)
    run = RunDir.create(_config(tmp_path))
    events.clear()
    _save(run, 1)
    tmp = str(run.checkpoints_dir / ".tmp_step_000001")
    rename = events.index(("replace", tmp))
    before = {path for kind, path in events[:rename] if kind == "fsync"}
    assert {
        f"{tmp}/learner/model.bin",
        f"{tmp}/buffer.npz",
        f"{tmp}/COMPLETE",
        tmp,
        f"{tmp}/learner",
    } <= before
    assert ("fsync", str(run.checkpoints_dir)) in events[rename:]


def test_export_takes_the_previous_checkpoint_when_the_newest_is_damaged(tmp_path):
    from spear_ray.export import ExportError, resolve_checkpoint

    run = RunDir.create(_config(tmp_path))
    for step in (1, 2):
        with run.checkpoint(step) as d:
            policy = d / "learner" / "policy"
            policy.mkdir(parents=True)
            (policy / "config.json").write_text("{}")
            (policy / "model.safetensors").write_bytes(b"w" * 64)
    newest = run.checkpoints_dir / "step_000002"
    weights = newest / "learner" / "policy" / "model.safetensors"
    weights.write_bytes(b"w" * 63 + b"x")  # same size, other bytes
    with pytest.raises(ExportError) as info:
        resolve_checkpoint(run.path)
    assert str(info.value) == (
        f"{newest} is damaged (file learner/policy/model.safetensors: checksum mismatch); the "
        f"previous usable one is {run.checkpoints_dir / 'step_000001'}"
    )
    weights.write_bytes(b"w" * 10)  # truncated: skipped with a message, the previous one taken
    lines: list[str] = []
    assert resolve_checkpoint(run.path, log=lines.append).path.name == "step_000001"
    assert lines == [
        "checkpoint step_000002 is damaged (file learner/policy/model.safetensors: 10 bytes, "
        "expected 64): using step_000001"
    ]
