"""The `spear-ray` command line.

    spear-ray config show NAME|FILE [dotted.key=value ...]   print the fully resolved config
    spear-ray config check FILE [dotted.key=value ...]       validate a config, print "ok"
    spear-ray config presets                                 list the shipped presets
    spear-ray train [--config NAME|FILE] [dotted.key=value ...] [--address ADDR] [--quiet]
    spear-ray train --resume RUN_DIR                         continue a run from its checkpoint
    spear-ray experiment SPEC.yaml [--out DIR] [--dry-run | --summary-only] [--keep-going]
                                   [--commit]               a grid, each run committed to git
    spear-ray plot RUN_DIR... [--out PNG] [--window N]        learning curves of runs, overlaid
    spear-ray export CHECKPOINT --to DIR                     the policy as an HF model directory
    spear-ray eval --checkpoint DIR [--env NAME] [--tasks N] [--temperature T] [key=value ...]
                                                             held-out success of a checkpoint

Bad input exits with status 2 and one line naming the file, YAML line, override or field.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spear_ray.config import ConfigError, config_to_yaml, load_config, preset_names

EXIT_BAD_INPUT = 2


def _add_address_option(parser: argparse.ArgumentParser) -> None:
    """--address, the same for every command that runs on Ray."""
    parser.add_argument(
        "--address", default=None, help="Ray address to join (default: start a local Ray)"
    )


def _add_quiet_option(parser: argparse.ArgumentParser, text: str) -> None:
    parser.add_argument("--quiet", action="store_true", help=text)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spear-ray", description="SPEAR self-imitation RL for LLM agents, on Ray."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config = commands.add_parser("config", help="show, check or list configs")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = config_commands.add_parser("show", help="print the resolved YAML of a preset or file")
    show.add_argument("source", help="a preset name (see `config presets`) or a YAML file")
    show.add_argument("overrides", nargs="*", help="dotted overrides, e.g. algo.sil.coef=0.5")
    check = config_commands.add_parser("check", help="validate a preset or file; prints ok")
    check.add_argument("source", help="a preset name or a YAML file")
    check.add_argument("overrides", nargs="*", help="dotted overrides, e.g. run.total_steps=10")
    config_commands.add_parser("presets", help="list the presets shipped with spear-ray")

    train = commands.add_parser("train", help="train with SPEAR on a local or remote Ray")
    train.add_argument(
        "--config", default=None, help="a preset name or a YAML file (default: the demo preset)"
    )
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. run.total_steps=10")
    _add_address_option(train)
    train.add_argument(
        "--resume",
        default=None,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its latest checkpoint",
    )
    _add_quiet_option(
        train,
        "no per-step lines or progress bar: only the start, evaluations, checkpoints, errors and "
        "the final summary (for `ray job submit`)",
    )

    experiment = commands.add_parser(
        "experiment",
        help="run a grid of variants x seeds x envs (resumable), then summarise it",
        description="Run every unfinished run of SPEC.yaml's grid one after another (finished "
        "runs are skipped, partial ones resumed), then write summary.json, summary.md and "
        "plots/*.png into the experiment directory.",
    )
    experiment.add_argument("spec", metavar="SPEC.yaml", help="the experiment spec")
    experiment.add_argument(
        "--out", default=None, metavar="DIR", help="experiment directory (default: the spec's)"
    )
    _add_address_option(experiment)
    only = experiment.add_mutually_exclusive_group()
    only.add_argument(
        "--dry-run", action="store_true", help="list the runs and their state; run nothing"
    )
    only.add_argument(
        "--summary-only", action="store_true", help="write the summary of what has run so far"
    )
    experiment.add_argument(
        "--keep-going", action="store_true", help="go on with the next run when one fails"
    )
    experiment.add_argument(
        "--commit",
        action="store_true",
        help="commit each run's config.yaml, metrics.jsonl and FINISHED to git as it finishes "
        "(and finished runs not yet committed, at the start; the summary at the end), so a fresh "
        "clone continues the grid; the experiment directory must be inside a git work tree",
    )
    _add_quiet_option(experiment, "no per-step lines of the runs (for `ray job submit`)")

    plot = commands.add_parser(
        "plot",
        help="write PNG learning curves of one or several runs",
        description="Eval success, train success and task reward vs step, one curve per run. "
        "A directory without metrics.jsonl stands for every run directory below it.",
    )
    plot.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run (or experiment) dirs")
    plot.add_argument(
        "--out",
        default=None,
        metavar="PNG",
        help="output file (default: RUN_DIR/curves.png for one run, ./curves.png for several)",
    )
    plot.add_argument(
        "--window",
        type=int,
        default=None,
        metavar="N",
        help="moving-average window of the train curves (default: 10%% of the steps)",
    )

    export = commands.add_parser(
        "export",
        help="write a checkpoint's policy as an HF model directory (transformers, vLLM)",
        description="Write the policy of a complete checkpoint (RUN/checkpoints/step_N, or a run "
        "directory for its latest complete one) into DIR: model safetensors, config.json, "
        "generation_config.json and the tokenizer with its chat template (the checkpoint's, else "
        "the one the run's config names).",
    )
    export.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint or run directory")
    export.add_argument(
        "--to", required=True, metavar="DIR", help="output directory (new or empty)"
    )

    evaluate = commands.add_parser(
        "eval",
        help="held-out success rate of a checkpoint (one rollout worker, no learner)",
        description="Play the held-out tasks (seeds env.eval_seed_start, +1, ...) of the run's "
        "env with one rollout worker on the checkpoint's weights; prints one line per task and "
        "a final JSON line (success rate, mean task reward, infrastructure failures).",
    )
    evaluate.add_argument(
        "--checkpoint",
        required=True,
        metavar="DIR",
        help="a checkpoint or run directory (its latest complete checkpoint), or an exported HF "
        "model directory (then the env comes from --config)",
    )
    evaluate.add_argument(
        "--env", default=None, metavar="NAME", help="evaluate on this env (its default options)"
    )
    evaluate.add_argument(
        "--tasks", type=int, default=None, metavar="N", help="held-out tasks (env.eval_tasks)"
    )
    evaluate.add_argument(
        "--temperature",
        type=float,
        default=None,
        metavar="T",
        help="sampling temperature (rollout.eval_temperature; 0 = greedy)",
    )
    evaluate.add_argument(
        "--config",
        default=None,
        metavar="NAME|FILE",
        help="config for an exported HF directory (default: demo), or instead of the run's",
    )
    evaluate.add_argument("overrides", nargs="*", help="dotted overrides, e.g. env.options={}")
    _add_address_option(evaluate)
    return parser


def _export_command(args: argparse.Namespace) -> int:
    from spear_ray.export import export_checkpoint

    export_checkpoint(args.checkpoint, args.to, log=print)
    return 0


def _eval_command(args: argparse.Namespace) -> int:
    import json

    from spear_ray.evaluate import result_line, run_eval

    result = run_eval(
        args.checkpoint,
        env=args.env,
        tasks=args.tasks,
        temperature=args.temperature,
        overrides=args.overrides,
        config_source=args.config,
        address=args.address,
        on_result=lambda trajectory: print(result_line(trajectory), flush=True),
    )
    print(json.dumps(result), flush=True)
    return 0


def _config_command(args: argparse.Namespace) -> int:
    if args.config_command == "presets":
        print("\n".join(preset_names()))
        return 0
    config = load_config(args.source, args.overrides)
    if args.config_command == "show":
        sys.stdout.write(config_to_yaml(config))
    else:
        print(f"ok: {args.source} is a valid spear-ray config")
    return 0


def _train_command(args: argparse.Namespace) -> int:
    from spear_ray.train import resolve_run, run_training

    # every check (model, tokenizer, data, --address, resume) runs before the run dir is written
    config, run, resume = resolve_run(args.config, args.overrides, args.resume, args.address)
    # a progress bar on a terminal; a line per step in a log file or a Ray job's logs
    output = "quiet" if args.quiet else ("bar" if sys.stdout.isatty() else "lines")
    run_training(config, run=run, resume=resume, address=args.address, output=output)
    return 0


def _experiment_command(args: argparse.Namespace) -> int:
    from spear_ray.experiments import ExperimentError, load_spec, plan_runs, run_experiment
    from spear_ray.experiments.runner import FINISHED, GitRecorder, commit_finished_runs
    from spear_ray.experiments.summary import write_summary

    spec = load_spec(args.spec)
    root = args.out or spec.default_output_dir()
    recorder = GitRecorder.for_output(root, spec.name, print) if args.commit else None
    if args.dry_run:
        plan = plan_runs(spec, root)
        for i, planned in enumerate(plan, 1):
            state = planned.state
            if recorder is not None and state == FINISHED and recorder.run_pending(planned):
                state += ", not yet committed"
            print(f"[{i}/{len(plan)}] {planned.run.label}: {state}  ({planned.path})")
        return 0
    if args.summary_only:
        if recorder is not None:
            plan = plan_runs(spec, root)
            commit_finished_runs(plan, recorder, print)
        summary = write_summary(spec, root)
        if recorder is not None:
            recorder.commit_summary(Path(root), summary, len(plan))
        return 0
    from spear_ray.console import quiet_log

    log = quiet_log(print) if args.quiet else print
    try:
        run_experiment(
            spec,
            root,
            address=args.address,
            keep_going=args.keep_going,
            log=log,
            commit=args.commit,
        )
    except ExperimentError as err:
        print(f"spear-ray: {err}", file=sys.stderr)
        return 1
    return 0


def _plot_command(args: argparse.Namespace) -> int:
    from spear_ray.plots import plot_runs

    if args.window is not None and args.window < 1:
        raise ConfigError(f"--window: expected a number of steps >= 1, got {args.window}")
    print(plot_runs(args.runs, args.out, window=args.window))
    return 0


def _is_override(text: str) -> bool:
    return "=" in text and not text.startswith("-")


def main(argv: list[str] | None = None) -> int:
    from spear_ray.faults import RunFault

    parser = _build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides after an option (`train a=b --quiet c=d`): argparse leaves the later ones over
    if extra and hasattr(args, "overrides") and all(_is_override(e) for e in extra):
        args.overrides = [*(args.overrides or []), *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "config":
            return _config_command(args)
        if args.command == "train":
            return _train_command(args)
        if args.command == "experiment":
            return _experiment_command(args)
        if args.command == "plot":
            return _plot_command(args)
        if args.command == "export":
            return _export_command(args)
        if args.command == "eval":
            return _eval_command(args)
    except ConfigError as err:
        print(f"spear-ray: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RunFault as err:  # one line: what stopped the run, its last checkpoint, --resume
        print(f"spear-ray: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
