"""Supervised warm start on oracle demonstrations, and a plain sampling loop to measure it.

    report = warm_start(model, tokenizer, recipe)      # recipe: tiny.SFTRecipe
    rollout_success_rate(model, tokenizer, "frozenlake", {"max_turns": 8}, seeds)

or by hand:

    demos = generate_demos("frozenlake", range(3000), {"max_turns": 8}, noise=0.2)
    examples = [encode_chat(tokenizer, d.messages) for d in demos]
    sft_train(model, examples, SFTSettings(steps=100), seed=0, pad_id=tokenizer.pad_token_id)

`encode_chat` tokenises a conversation exactly as the agent loop sees it, one message at a time
(token-in-token-out): `<|im_start|>{role}\\n` + content + `<|im_end|>` + `\\n`. The loss mask is 1
on the tokens the policy generates, i.e. each assistant message's content and its `<|im_end|>`,
and 0 elsewhere (headers, observations, the newline after `<|im_end|>`). The ids equal
`apply_chat_template(messages)` for the same messages (tests check this).

`warm_start` trains in two stages (see SFTRecipe): single-turn windows first (cheap rows that
teach the observation -> action map), then whole episodes (the layout the agent loop produces).
Training is plain torch AdamW on CPU (token-mean cross-entropy on masked tokens, linear warmup
then cosine decay to 10%, length-bucketed batches); deterministic for a seed on a given machine,
torch version and thread count.
"""

from __future__ import annotations

import inspect
import math
import random
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from spear_ray.models.demos import DEMO_ENVS, Demo, Message, generate_demos, turn_windows
from spear_ray.models.tokenizer import IM_END, IM_START

if TYPE_CHECKING:
    from spear_ray.models.tiny import SFTRecipe

__all__ = [
    "DEMO_ENVS",
    "Demo",
    "SFTSettings",
    "chat_ids",
    "encode_chat",
    "generate_demos",
    "rollout_success_rate",
    "sft_train",
    "turn_accuracy",
    "turn_windows",
    "warm_start",
]


def chat_ids(tokenizer, messages: Sequence[Message], add_generation_prompt: bool = False):
    """`apply_chat_template(..., tokenize=True)` as a list of ids (transformers 4 and 5)."""
    out = tokenizer.apply_chat_template(
        list(messages), tokenize=True, add_generation_prompt=add_generation_prompt
    )
    if isinstance(out, Mapping) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def encode_chat(tokenizer, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of a chat; the mask covers assistant content + its `<|im_end|>`."""
    ids: list[int] = []
    mask: list[int] = []
    for m in messages:
        header = _encode(tokenizer, f"{IM_START}{m['role']}\n")
        body = _encode(tokenizer, f"{m['content']}{IM_END}")
        tail = _encode(tokenizer, "\n")
        learn = 1 if m["role"] == "assistant" else 0
        ids += header + body + tail
        mask += [0] * len(header) + [learn] * len(body) + [0] * len(tail)
    return ids, mask


@dataclass(frozen=True)
class SFTSettings:
    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    grad_clip: float = 1.0
    max_len: int = 768  # longer examples are cut (the demo's prompt + response budget)


def sft_train(
    model,
    examples: Sequence[tuple[list[int], list[int]]],
    settings: SFTSettings,
    seed: int = 0,
    pad_id: int = 0,
    log: Callable[[str], None] | None = None,
    callback: Callable[[int], None] | None = None,
) -> list[float]:
    """Train `model` in place on (ids, loss_mask) examples; returns the loss of every step.

    `callback(step)` runs after every step (e.g. a periodic evaluation; it may switch the model
    to eval mode: training mode is restored after it)."""
    s = settings
    examples = [(i[: s.max_len], m[: s.max_len]) for i, m in examples if any(m[: s.max_len])]
    if not examples:
        raise ValueError("sft_train: no example has a masked (assistant) token")
    torch.manual_seed(seed)
    rng = random.Random(f"sft:{seed}")
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": s.weight_decay},
            {"params": no_decay, "weight_decay": 0},
        ],
        lr=s.lr,
        betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:
        if step < s.warmup_steps:
            return s.lr * (step + 1) / s.warmup_steps
        frac = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
        return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    model.train()
    batches: list[list[int]] = []
    losses = []
    t0 = time.monotonic()
    for step in range(s.steps):
        if not batches:
            batches = _length_bucketed_batches([len(i) for i, _ in examples], s.batch_size, rng)
        batch = [examples[i] for i in batches.pop()]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        attn = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (x, m) in enumerate(batch):
            ids[row, : len(x)] = torch.tensor(x)
            attn[row, : len(x)] = 1
            labels[row, : len(x)] = torch.tensor(
                [t if k else -100 for t, k in zip(x, m, strict=True)]
            )
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(),
            labels[:, 1:].reshape(-1),
            ignore_index=-100,
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        losses.append(loss.item())
        if callback is not None:
            callback(step + 1)
            model.train()
        if log and (step + 1) % max(1, s.steps // 5) == 0:
            elapsed = time.monotonic() - t0
            log(f"sft step {step + 1}/{s.steps} loss {loss.item():.3f} ({elapsed:.0f} s)")
    model.eval()
    return losses


def _length_bucketed_batches(lengths: list[int], batch_size: int, rng: random.Random):
    """One epoch of batches, each of similar-length examples (less padding), in random order."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    chunk = batch_size * 32
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: lengths[i])
        batches += [part[k : k + batch_size] for k in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def warm_start(
    model,
    tokenizer,
    recipe: SFTRecipe,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    callback: Callable[[str, int], None] | None = None,
) -> dict[str, Any]:
    """Generate the recipe's demonstrations and train `model` on them; returns a report.

    Demonstrations use env seeds [0, num_demos) (the training range: eval seeds start at
    1_000_000) and no sandbox: python_math's oracle program prints a known answer.
    """
    t0 = time.monotonic()
    if log:
        log(f"generating {recipe.num_demos} {recipe.env} demonstrations")
    demos = generate_demos(
        recipe.env, range(recipe.num_demos), recipe.env_options, recipe.noise, seed
    )
    episodes = [encode_chat(tokenizer, d.messages) for d in demos]
    if recipe.window_steps > 0 and not recipe.window_instructions:
        # the same episodes, without the rules text
        options = {**recipe.env_options, "include_instructions": False}
        demos = generate_demos(recipe.env, range(recipe.num_demos), options, recipe.noise, seed)
    windows = [encode_chat(tokenizer, w) for d in demos for w in turn_windows(d.messages)]
    report: dict[str, Any] = {
        "demo_success_rate": sum(d.success for d in demos) / len(demos),
        "episode_tokens": sum(len(i) for i, _ in episodes),
        "window_tokens": sum(len(i) for i, _ in windows),
    }
    pad = tokenizer.pad_token_id
    stages = [
        ("windows", windows, recipe.window_steps, recipe.window_batch_size),
        ("episodes", episodes, recipe.episode_steps, recipe.episode_batch_size),
    ]
    for k, (name, examples, steps, batch_size) in enumerate(stages):
        if steps <= 0:
            continue
        settings = SFTSettings(
            steps=steps, batch_size=batch_size, lr=recipe.lr, max_len=recipe.max_len
        )
        stage_log = (lambda msg, name=name: log(f"[{name}] {msg}")) if log else None
        stage_cb = (lambda step, name=name: callback(name, step)) if callback else None
        losses = sft_train(model, examples, settings, seed + k, pad, stage_log, stage_cb)
        report[f"{name}_final_loss"] = round(sum(losses[-10:]) / len(losses[-10:]), 4)
    report["train_seconds"] = round(time.monotonic() - t0, 1)
    return report


@torch.no_grad()
def turn_accuracy(model, examples: Sequence[tuple[list[int], list[int]]], pad_id: int = 0):
    """Teacher-forced: the fraction of assistant turns whose every token is the argmax."""
    was_training = model.training
    model.eval()
    hits = total = 0
    for start in range(0, len(examples), 16):
        batch = examples[start : start + 16]
        width = max(len(i) for i, _ in batch)
        ids = torch.tensor([i + [pad_id] * (width - len(i)) for i, _ in batch])
        attn = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch])
        pred = model(input_ids=ids, attention_mask=attn).logits[:, :-1].argmax(-1).tolist()
        for row, (x, m) in enumerate(batch):
            ok = None
            for t in range(1, len(x)):
                if m[t] and ok is None:
                    ok = True
                if m[t]:
                    ok = ok and pred[row][t - 1] == x[t]
                elif ok is not None:  # a turn just ended
                    hits += ok
                    total += 1
                    ok = None
            if ok is not None:
                hits += ok
                total += 1
    model.train(was_training)
    return hits / max(1, total)


@torch.no_grad()
def rollout_success_rate(
    model,
    tokenizer,
    env_name: str,
    options: Mapping[str, Any] | None,
    seeds: Sequence[int],
    temperature: float = 1.0,
    max_tokens_per_turn: int = 24,
    batch_size: int = 64,
    sample_seed: int = 0,
    env_deps: Mapping[str, Any] | None = None,
) -> dict[str, float]:
    """Play one episode per seed with plain transformers sampling; success rate and friends.

    Each turn the whole conversation so far is the prompt (ids kept, never re-tokenised); a turn
    ends at `<|im_end|>` or after `max_tokens_per_turn` tokens. temperature 0 = greedy.
    """
    from spear_ray.envs import make_env

    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    pad = tokenizer.pad_token_id
    gen = torch.Generator().manual_seed(sample_seed)
    successes = invalid = turns = 0
    model.eval()
    for start in range(0, len(seeds), batch_size):
        envs, convs = [], []
        for seed in seeds[start : start + batch_size]:
            env = make_env(env_name, options, **dict(env_deps or {}))
            obs = env.reset(seed)
            envs.append(env)
            convs.append(encode_chat(tokenizer, [{"role": "user", "content": obs}])[0])
        alive = list(range(len(envs)))
        header = _encode(tokenizer, f"{IM_START}assistant\n")
        while alive:
            prompts = [convs[i] + header for i in alive]
            outs = _sample(model, prompts, max_tokens_per_turn, temperature, im_end, pad, gen)
            still = []
            for i, out in zip(alive, outs, strict=True):
                text = tokenizer.decode([t for t in out if t != im_end])
                result = envs[i].step(text)
                turns += 1
                invalid += result.info.invalid_action
                if out[-1:] != [im_end]:
                    out = [*out, im_end]
                convs[i] = prompts[alive.index(i)] + out + _encode(tokenizer, "\n")
                if result.done:
                    successes += result.info.success
                    envs[i].close()
                else:
                    convs[i] += encode_chat(
                        tokenizer, [{"role": "user", "content": result.observation}]
                    )[0]
                    still.append(i)
            alive = still
    n = len(seeds)
    return {
        "success_rate": successes / n,
        "episodes": n,
        "invalid_action_rate": invalid / max(1, turns),
        "turns_per_episode": turns / n,
    }


def _cache_kwarg(model) -> str:
    # transformers >= 5.2x renamed forward(past_key_values=) to forward(cache=)
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _sample(model, prompts, max_new, temperature, stop_id, pad_id, gen) -> list[list[int]]:
    """Sample continuations of left-padded prompts with a KV cache; each stops at stop_id."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    cache_kw = _cache_kwarg(model)
    out = model(
        input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1
    )
    done = torch.zeros(len(prompts), dtype=torch.bool)
    results: list[list[int]] = [[] for _ in prompts]
    next_pos = pos[:, -1:] + 1
    for _ in range(max_new):
        logits = out.logits[:, -1].float()
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            tok = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
        else:
            tok = logits.argmax(-1)
        for row in range(len(prompts)):
            if not done[row]:
                results[row].append(int(tok[row]))
        done |= tok == stop_id
        if bool(done.all()):
            break
        attn = torch.cat([attn, torch.ones(len(prompts), 1, dtype=attn.dtype)], dim=-1)
        out = model(
            input_ids=tok[:, None],
            attention_mask=attn,
            position_ids=next_pos,
            use_cache=True,
            **{cache_kw: out.past_key_values},
        )
        next_pos = next_pos + 1
    return results


def stderr_log(message: str) -> None:
    print(f"spear_ray: {message}", file=sys.stderr, flush=True)
