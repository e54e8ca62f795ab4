"""The locally trained tokenizer: round trips, special tokens, the ChatML template, determinism."""

from __future__ import annotations

import pytest

from spear_ray.models.sft import chat_ids
from spear_ray.models.tiny import ensure_tokenizer, load_tokenizer
from spear_ray.models.tokenizer import (
    CHAT_TEMPLATE,
    ENDOFTEXT,
    IM_END,
    IM_START,
    PAD,
    SPECIAL_TOKENS,
    build_tokenizer,
)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ensure_tokenizer())


TEXTS = [
    "You are playing FrozenLake.\n\n_O__\n__O_\nG__P\n____",
    "<action>Right</action>",
    "######\n#_P###\n#X__##\n#O√_S#\n######",
    "<code>\nprint(pow(3, 200, 1000003))\n</code>",
    "<interpreter>\n123456789\n</interpreter> so \\boxed{\\frac{3}{4}}",
    "def f(n):\n    return n * (n + 1) // 2\n\n\ttabs  and   spaces  ",
    "unseen: héllo wörld ☃ 日本語 🙂 \x00\x7f",
    f"{IM_START}user\nhi{IM_END}\n{IM_START}assistant\n<action>Up</action>{IM_END}\n",
    f"{ENDOFTEXT}{PAD}",
    "",
]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < len(tokenizer) for i in ids)


def test_special_tokens_are_single_ids(tokenizer):
    ids = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert ids == [0, 1, 2, 3]
    for token, token_id in zip(SPECIAL_TOKENS, ids, strict=True):
        assert tokenizer.encode(token, add_special_tokens=False) == [token_id]
    assert tokenizer.eos_token == IM_END and tokenizer.eos_token_id == ids[2]
    assert tokenizer.pad_token == PAD and tokenizer.pad_token_id == ids[3]
    assert tokenizer.bos_token == ENDOFTEXT
    # special tokens are never pieces of ordinary text
    assert tokenizer.encode("<|im_end", add_special_tokens=False)[-1] not in ids
    assert tokenizer.encode("hello", add_special_tokens=True) == tokenizer.encode(
        "hello", add_special_tokens=False
    )  # no BOS is prepended


def test_vocab_size_and_grid_cells(tokenizer):
    assert 512 <= len(tokenizer) <= 4096
    # a map row of n cells is n tokens, so a model can find a cell by its position
    for row in ("_O__", "G__P", "#X√S#", "OOGP", "___"):
        assert len(tokenizer.encode(row, add_special_tokens=False)) == len(row)


def test_chat_template_renders_chatml(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Where now?"},
        {"role": "assistant", "content": "<action>Up</action>"},
    ]
    assert tokenizer.chat_template == CHAT_TEMPLATE
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhere now?<|im_end|>\n"
        "<|im_start|>assistant\n<action>Up</action><|im_end|>\n"
    )
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_apply_chat_template_ids(tokenizer):
    messages = [{"role": "user", "content": "_O__\nG__P"}]
    ids = chat_ids(tokenizer, messages, add_generation_prompt=True)
    im_start = tokenizer.convert_tokens_to_ids(IM_START)
    assert ids[0] == im_start
    assert ids[-3:] == tokenizer.encode(f"{IM_START}assistant\n", add_special_tokens=False)
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


def test_same_seed_same_tokenizer(tokenizer):
    fresh = build_tokenizer()  # trained again in this process; the fixture's came from the cache
    assert fresh.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(vocab_size=100)
