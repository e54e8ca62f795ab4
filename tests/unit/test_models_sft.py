"""Oracle demonstrations, their tokenisation and loss mask, and a few SFT steps on a tiny model."""

from __future__ import annotations

import itertools

import pytest

from spear_ray.envs import make_env
from spear_ray.envs.math_data import generate_problem
from spear_ray.models.demos import expected_output, math_program
from spear_ray.models.sft import (
    SFTSettings,
    chat_ids,
    encode_chat,
    generate_demos,
    rollout_success_rate,
    sft_train,
    turn_windows,
)
from spear_ray.models.tiny import build_model, ensure_tokenizer, load_tokenizer
from spear_ray.models.tokenizer import IM_END

GRID_ENVS = [("frozenlake", {"max_turns": 8}), ("sokoban", {}), ("frozenlake", {"size": 6})]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ensure_tokenizer())


@pytest.fixture
def one_thread():
    """Tiny models on a busy 2-core box: a second OpenMP thread only spins (5x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _check_structure(demo):
    roles = [m["role"] for m in demo.messages]
    assert roles[0] == "user" and roles[-1] == "assistant"
    assert all(a != b for a, b in itertools.pairwise(roles)), "roles must alternate"
    assert set(roles) == {"user", "assistant"}
    for m in demo.messages:
        assert set(m) == {"role", "content"} and isinstance(m["content"], str) and m["content"]
        assert "<|im_" not in m["content"] and "<|endoftext|>" not in m["content"]


@pytest.mark.parametrize(("env_name", "options"), GRID_ENVS)
def test_grid_demos_are_valid_chats_that_replay(env_name, options, tokenizer):
    demos = generate_demos(env_name, range(30), options, noise=0.3, seed=1)
    for demo in demos:
        _check_structure(demo)
        env = make_env(env_name, options)
        assert env.reset(demo.seed) == demo.messages[0]["content"]
        for k, m in enumerate(demo.messages[1:], start=1):
            if m["role"] == "assistant":
                result = env.step(m["content"])
                assert result.done == (k == len(demo.messages) - 1)
                # short turns: inside the demo preset's 24 tokens per turn
                assert len(tokenizer.encode(m["content"] + IM_END)) < 24
            else:
                assert m["content"] == result.observation
        assert result.info.success == demo.success


@pytest.mark.parametrize(("env_name", "options"), GRID_ENVS)
def test_noise_controls_the_success_rate(env_name, options):
    def rate(noise):
        demos = generate_demos(env_name, range(60), options, noise=noise)
        return sum(d.success for d in demos) / len(demos)

    assert rate(0.0) >= 0.95
    assert rate(1.0) < rate(0.5) < rate(0.0)


def test_grid_turns_note_positions_then_act():
    demo = generate_demos("frozenlake", [5], {}, noise=0.0)[0]
    env = make_env("frozenlake", {})
    env.reset(5)
    for m in demo.messages[1::2]:
        r, c = env.player
        gr, gc = env.goal
        assert m["content"].startswith(f"P{r},{c} G{gr},{gc} <action>")
        env.step(m["content"])
    plain = generate_demos("frozenlake", [5], {}, noise=0.0, think=False)[0]
    assert all(m["content"].startswith("<action>") for m in plain.messages[1::2])
    windows = turn_windows(demo.messages)
    assert len(windows) == len(demo.messages) // 2
    assert all([w[0]["role"], w[1]["role"]] == ["user", "assistant"] for w in windows)
    assert windows[-1] == demo.messages[-2:]
    assert turn_windows(demo.messages, history_turns=1)[1] == demo.messages[:4]


def test_demos_are_deterministic_per_seed():
    a = generate_demos("frozenlake", range(20), {}, noise=0.3, seed=0)
    b = generate_demos("frozenlake", range(20), {}, noise=0.3, seed=0)
    c = generate_demos("frozenlake", range(20), {}, noise=0.3, seed=1)
    assert [d.messages for d in a] == [d.messages for d in b]
    assert [d.messages for d in a] != [d.messages for d in c]


def test_unknown_env_and_bad_noise():
    with pytest.raises(ValueError, match="no demonstrator"):
        generate_demos("webshop", range(2))
    with pytest.raises(ValueError, match="noise"):
        generate_demos("frozenlake", range(2), noise=1.5)


def test_math_demos_without_sandbox():
    demos = generate_demos("python_math", range(40), {"levels": [1, 2]}, noise=0.0)
    for demo in demos:
        _check_structure(demo)
        assert demo.success
        assert demo.messages[1]["content"].startswith("<code>\n")
        assert demo.messages[2]["content"].startswith("<interpreter>\n")
        assert demo.messages[3]["content"].startswith("\\boxed{")
    noisy = generate_demos("python_math", range(80), {"levels": [1]}, noise=0.6)
    assert 0.3 < sum(d.success for d in noisy) / len(noisy) < 0.9


def test_math_programs_print_the_answer_in_the_sandbox():
    from spear_ray.sandbox import SandboxClient, SandboxConfig

    client = SandboxClient(SandboxConfig())
    try:
        seen = set()
        for seed in range(40):
            for level in (1, 2, 3):
                problem = generate_problem(seed, level)
                family = problem.source.rsplit(":", 1)[-1]
                if family in seen or family in SLOW_FAMILIES:
                    continue
                seen.add(family)
                code = math_program(problem.prompt, problem.source, problem.answer)
                assert (
                    problem.answer not in code or family == "big_product" or len(problem.answer) < 3
                ), f"{family}: the program should compute, not quote, the answer"
                result = client.run_python(code, timeout_s=20)
                assert result.stdout.strip() == expected_output(problem.answer), (family, code)
        assert len(seen) >= 10
        demos = generate_demos("python_math", range(6), {"levels": [1]}, 0.0, sandbox=client)
        assert all(d.success for d in demos)
    finally:
        client.close()


SLOW_FAMILIES = {"digit_sum_count", "multiples_sum"}  # brute force: seconds per run


@pytest.mark.slow
def test_every_math_family_program_at_every_level():
    from spear_ray.envs.math_data import FAMILIES
    from spear_ray.sandbox import SandboxClient, SandboxConfig

    client = SandboxClient(SandboxConfig())
    try:
        seen = set()
        for seed in range(200):
            for level in FAMILIES:
                problem = generate_problem(seed, level)
                key = (level, problem.source.rsplit(":", 1)[-1])
                if key in seen:
                    continue
                seen.add(key)
                code = math_program(problem.prompt, problem.source, problem.answer)
                result = client.run_python(code, timeout_s=30)
                assert result.stdout.strip() == expected_output(problem.answer), (key, code)
        for level in FAMILIES:  # every family a level can draw was checked at that level
            drawn = [f for lv, fs in FAMILIES.items() if lv <= level for f in fs]
            names = {f.__name__.lstrip("_") for f in drawn}
            assert {name for lv, name in seen if lv == level} == names
    finally:
        client.close()


@pytest.mark.parametrize(("env_name", "options"), [*GRID_ENVS, ("python_math", {})])
def test_loss_mask_covers_exactly_the_assistant_tokens(env_name, options, tokenizer):
    for demo in generate_demos(env_name, range(5), options, noise=0.3):
        ids, mask = encode_chat(tokenizer, demo.messages)
        assert len(ids) == len(mask) and set(mask) <= {0, 1}
        assert ids == chat_ids(tokenizer, demo.messages)  # same ids as the chat template
        spans, current = [], []
        for token, m in zip(ids, mask, strict=True):
            if m:
                current.append(token)
            elif current:
                spans.append(current)
                current = []
        assert not current
        assistant = [m["content"] for m in demo.messages if m["role"] == "assistant"]
        assert [tokenizer.decode(s) for s in spans] == [a + IM_END for a in assistant]


def test_sft_lowers_the_loss_and_the_sampler_plays(tokenizer, one_thread):
    short = {"max_turns": 4, "include_instructions": False}
    demos = generate_demos("frozenlake", range(32), short, noise=0.0)
    examples = [encode_chat(tokenizer, d.messages) for d in demos]
    model = build_model("tiny", tokenizer, seed=0)
    settings = SFTSettings(steps=12, batch_size=8, lr=1e-2, warmup_steps=2)
    losses = sft_train(model, examples, settings, seed=0, pad_id=tokenizer.pad_token_id)
    assert len(losses) == 12 and losses[-1] < losses[0] * 0.5
    stats = rollout_success_rate(
        model,
        tokenizer,
        "frozenlake",
        short,
        range(1_000_000, 1_000_006),
        max_tokens_per_turn=12,
        batch_size=4,
    )
    assert stats["episodes"] == 6 and 0.0 <= stats["success_rate"] <= 1.0
    assert 1 <= stats["turns_per_episode"] <= 4


def test_sft_is_deterministic(tokenizer, one_thread):
    short = {"max_turns": 4, "include_instructions": False}
    demos = generate_demos("frozenlake", range(8), short, noise=0.3)
    examples = [encode_chat(tokenizer, d.messages) for d in demos]
    settings = SFTSettings(steps=3, batch_size=4, lr=1e-2, warmup_steps=1)
    runs = []
    for _ in range(2):
        model = build_model("tiny", tokenizer, seed=3)
        runs.append(sft_train(model, examples, settings, seed=3, pad_id=tokenizer.pad_token_id))
    assert runs[0] == runs[1]
