"""Build a builtin model into the cache, or try an SFT recipe without caching it.

    python scripts/pretrain_tiny.py builtin tiny-llama      # build (if needed), print build_info
    python scripts/pretrain_tiny.py try --env frozenlake --noise 0.2 --window-steps 400

`try` prints one JSON line: the recipe, timings, SFT losses, and the success rate at temperature 1
on eval seeds (>= 1_000_000) of the warm-started model (and, with --baseline, of its random init).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

from spear_ray.models.sft import (
    encode_chat,
    generate_demos,
    rollout_success_rate,
    stderr_log,
    turn_accuracy,
    turn_windows,
    warm_start,
)
from spear_ray.models.tiny import (
    BUILTINS,
    EVAL_SEED_START,
    PRESETS,
    SFTRecipe,
    build_model,
    ensure_builtin,
    ensure_tokenizer,
    load_tokenizer,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("builtin", help="build a builtin into the cache")
    b.add_argument("name", choices=sorted(BUILTINS))
    t = sub.add_parser("try", help="train and evaluate a recipe without caching it")
    t.add_argument("--env", default="frozenlake")
    t.add_argument("--options", default='{"max_turns": 8}', help="env options as JSON")
    t.add_argument("--size", default="small", choices=sorted(PRESETS))
    defaults = SFTRecipe("frozenlake")
    for f in dataclasses.fields(SFTRecipe):
        if f.name not in ("env", "env_options"):
            flag = "--" + f.name.replace("_", "-")
            kind = type(getattr(defaults, f.name))
            if kind is bool:
                t.add_argument(flag, type=lambda v: v.lower() in ("1", "true", "yes"))
            else:
                t.add_argument(flag, type=kind, default=None)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--baseline", action="store_true", help="also evaluate the random init")
    t.add_argument("--eval-every", type=int, default=0, help="held-out turn accuracy every N")
    t.add_argument("--success-every", type=int, default=0, help="success rate every N ep. steps")
    t.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()

    if args.cmd == "builtin":
        t0 = time.monotonic()
        path = ensure_builtin(args.name)
        info = json.loads((path / "build_info.json").read_text())
        print(json.dumps({"path": str(path), "wall_s": round(time.monotonic() - t0, 1), **info}))
        return

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    options = json.loads(args.options)
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(SFTRecipe)
        if f.name not in ("env", "env_options") and getattr(args, f.name, None) is not None
    }
    recipe = SFTRecipe(args.env, options, **overrides)
    tokenizer = load_tokenizer(ensure_tokenizer())
    model = build_model(args.size, tokenizer, args.seed)
    seeds = list(range(EVAL_SEED_START, EVAL_SEED_START + (recipe.eval_episodes or 64)))
    deps = {}
    if args.env == "python_math":
        from spear_ray.sandbox import SandboxClient, SandboxConfig

        deps["sandbox"] = SandboxClient(SandboxConfig())
    report: dict = {
        "size": args.size,
        "recipe": dataclasses.asdict(recipe),
        "params": sum(p.numel() for p in model.parameters()),
    }

    def success_rate() -> dict:
        """Success at temperature 1 on the eval seeds, of the model as it is now."""
        return rollout_success_rate(
            model,
            tokenizer,
            args.env,
            options,
            seeds,
            max_tokens_per_turn=recipe.eval_max_tokens_per_turn,
            env_deps=deps,
        )

    if args.baseline:
        report["random_init"] = success_rate()
    t0, c0 = time.monotonic(), time.process_time()
    curve = report["turn_accuracy"] = {}
    if args.eval_every:
        held = generate_demos(args.env, seeds[:100], options, noise=0.0)
        held_windows = [encode_chat(tokenizer, w) for d in held for w in turn_windows(d.messages)]
        held_eps = [encode_chat(tokenizer, d.messages) for d in held]

    def periodic(stage: str, step: int) -> None:
        if stage == "episodes" and args.success_every and step % args.success_every == 0:
            stats = success_rate()
            curve[f"success:{step}"] = stats["success_rate"]
            stderr_log(f"episodes step {step}: success rate {stats['success_rate']:.3f}")
        if args.eval_every and step % args.eval_every == 0:
            acc = (turn_accuracy(model, held_windows), turn_accuracy(model, held_eps))
            curve[f"{stage}:{step}"] = [round(a, 3) for a in acc]
            stderr_log(f"{stage} step {step}: held-out turn accuracy windows/episodes {acc}")

    report.update(warm_start(model, tokenizer, recipe, args.seed, stderr_log, periodic))
    report["train_cpu_s"] = round(time.process_time() - c0, 1)
    t0 = time.monotonic()
    report["sft"] = success_rate()
    report["eval_s"] = round(time.monotonic() - t0, 1)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
