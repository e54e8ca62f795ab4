"""What `spear-ray train` prints: step lines, the progress bar, quiet mode, and the CLI's choice."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
from rich.console import Console

from spear_ray import cli
from spear_ray.console import TrainOutput, eta_seconds, format_duration, quiet_log

METRICS = {
    "reward/mean": 0.5,
    "success_rate": 0.5,
    "buffer/size": 3,
    "spear/replay_rows": 2,
    "spear/w_sil": 0.25,
    "update/loss": -0.0123,
}


def test_lines_mode_prints_one_line_per_step_with_a_running_success_mean():
    lines: list[str] = []
    out = TrainOutput(5, mode="lines", log=lines.append)
    out.info("starting")
    out.start(0)
    out.step(0, {**METRICS, "success_rate": 0.0}, 1.25)
    out.step(1, METRICS, 1.5)
    out.notice("eval after 2 steps: success rate 0.500 on 4 held-out tasks")
    out.close()
    assert lines == [
        "starting",
        "step 1/5  reward +0.500  success 0.00  buffer 3  replayed 2  w_sil 0.25  loss -0.0123"
        "  (success over the last 1 steps 0.00; 1.2s)",
        "step 2/5  reward +0.500  success 0.50  buffer 3  replayed 2  w_sil 0.25  loss -0.0123"
        "  (success over the last 2 steps 0.25; 1.5s)",
        "eval after 2 steps: success rate 0.500 on 4 held-out tasks",
    ]


def test_quiet_mode_prints_only_notices():
    lines: list[str] = []
    out = TrainOutput(5, mode="quiet", log=lines.append)
    out.info("waiting for the rollout workers' engines to start")
    out.start(0)
    out.step(0, METRICS, 1.0)
    out.notice("checkpoint saved: runs/x/checkpoints/step_000000")
    out.close()
    assert lines == ["checkpoint saved: runs/x/checkpoints/step_000000"]


def test_bar_mode_shows_step_reward_success_buffer_and_eta():
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=160, color_system=None)
    logged: list[str] = []
    out = TrainOutput(5, mode="bar", log=logged.append, console=console)
    out.info("starting 1 learner rank(s)")
    out.start(1)  # resumed: the bar starts at step 1 of 5
    out.step(1, METRICS, 1.0)
    out.notice("checkpoint saved: here")
    out.close()
    text = screen.getvalue()
    assert logged == []  # in bar mode every message goes through the rich console
    assert "starting 1 learner rank(s)" in text and "checkpoint saved: here" in text
    assert "2/5" in text
    assert "reward +0.500" in text and "success 0.50" in text and "buffer 3" in text
    assert "ETA " in text and "ETA -" not in text.rsplit("2/5", 1)[1]
    assert "replayed" not in text  # the bar shows the short set; the line mode the long one


def test_eta_is_the_mean_pace_times_the_steps_left():
    assert eta_seconds(elapsed=10.0, steps_done=2, steps_left=3) == 15.0
    assert eta_seconds(elapsed=0.0, steps_done=0, steps_left=3) is None
    assert [format_duration(s) for s in (5, 75, 3725)] == ["5s", "1m15s", "1h02m"]


def test_quiet_log_drops_step_lines_also_behind_an_experiments_prefix():
    kept: list[str] = []
    log = quiet_log(kept.append)
    lines = [
        "step 3/3  reward +0.100  (success over the last 3 steps 0.00; 1.0s)",
        "[1/2] frozenlake/grpo/seed0 step 2/3  reward +0.100  (success ...)",
        "[1/2] frozenlake/grpo/seed0 eval after 3 steps: success rate 0.250 on 4 held-out tasks",
        "[1/2] frozenlake/grpo/seed0: done in 1m02s",
        "held-out success rate: 0.100 after 0 steps -> 0.300 after 40 steps (+0.200)",
    ]
    for line in lines:
        log(line)
    assert kept == lines[2:]


# ----------------------------------------------------------------------------- the CLI


@pytest.fixture
def fake_training(monkeypatch):
    import spear_ray.train as train

    calls: list[dict] = []
    monkeypatch.setattr(train, "resolve_run", lambda *args: ("config", "run", False))
    monkeypatch.setattr(train, "run_training", lambda config, **kw: calls.append(kw))
    return calls


def test_train_prints_step_lines_when_stdout_is_not_a_terminal(fake_training, monkeypatch):
    monkeypatch.setattr("sys.stdout", io.StringIO())
    assert cli.main(["train"]) == 0
    assert fake_training[0]["output"] == "lines"


def test_train_shows_a_bar_on_a_terminal_and_quiet_wins(fake_training, monkeypatch):
    terminal = io.StringIO()
    terminal.isatty = lambda: True  # type: ignore[method-assign]
    monkeypatch.setattr("sys.stdout", terminal)
    assert cli.main(["train"]) == 0
    assert cli.main(["train", "--quiet"]) == 0
    assert [call["output"] for call in fake_training] == ["bar", "quiet"]


def test_experiment_quiet_filters_the_runs_step_lines(monkeypatch, capsys):
    import spear_ray.experiments as experiments

    def fake_run_experiment(spec, root, *, address, keep_going, log, commit=False):
        log("[1/1] a/b/seed0 step 1/2  reward +0.100  (success ...)")
        log("[1/1] a/b/seed0: done in 5s")

    spec = SimpleNamespace(default_output_dir=lambda: "out")
    monkeypatch.setattr(experiments, "load_spec", lambda path: spec)
    monkeypatch.setattr(experiments, "run_experiment", fake_run_experiment)
    assert cli.main(["experiment", "spec.yaml", "--quiet"]) == 0
    assert capsys.readouterr().out.splitlines() == ["[1/1] a/b/seed0: done in 5s"]
    assert cli.main(["experiment", "spec.yaml"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_overrides_may_come_before_and_after_an_option(monkeypatch):
    """`spear-ray train a=b --quiet c=d` keeps both overrides; a stray non-override is an error."""
    import spear_ray.train as train

    seen: list[list[str]] = []
    monkeypatch.setattr(
        train,
        "resolve_run",
        lambda config, overrides, *rest: seen.append(overrides) or ("c", "r", False),
    )
    monkeypatch.setattr(train, "run_training", lambda config, **kw: None)
    monkeypatch.setattr("sys.stdout", io.StringIO())
    assert cli.main(["train", "run.total_steps=2", "--quiet", "learner.lr=0.1"]) == 0
    assert seen == [["run.total_steps=2", "learner.lr=0.1"]]
    with pytest.raises(SystemExit) as caught:
        cli.main(["train", "run.total_steps=2", "--quiet", "oops"])
    assert caught.value.code == 2
