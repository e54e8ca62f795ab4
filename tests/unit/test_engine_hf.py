"""The transformers reference engine (HFEngine), and the tiny random model the engine tests use.

No download anywhere: `build_tiny_llama` makes a 2-layer Llama with random weights and a
character-level tokenizer (tokenizers' WordLevel, one token per printable ASCII character plus
filler tokens `<tN>`) and saves both with save_pretrained, so vLLM can load the directory.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from spear_ray.engines.base import SamplingSpec
from spear_ray.engines.hf_engine import HFEngine
from spear_ray.models.tiny import ModelSize, random_llama

VOCAB = 512
BOS, EOS = 1, 2


def build_tiny_llama(out_dir: str | Path, seed: int = 0) -> Path:
    """A random Llama (hidden 64, 2 layers, head_dim 32: vLLM's CPU attention needs >= 32)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    vocab = {"<unk>": 0, "<s>": BOS, "</s>": EOS}
    for code in range(32, 127):
        vocab[chr(code)] = len(vocab)
    for i in range(len(vocab), VOCAB):
        vocab[f"<t{i}>"] = i
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(out_dir)
    model = random_llama(
        ModelSize(64, 2, 2, 1, 128, max_position_embeddings=1024),
        VOCAB,
        seed,
        bos_token_id=BOS,
        eos_token_id=EOS,
        tie_word_embeddings=False,
        initializer_range=0.2,  # peaked next-token distributions: no near-ties in greedy tests
    )
    model.save_pretrained(out_dir)
    return out_dir


def perturbed(state: dict[str, torch.Tensor], seed: int, scale: float = 0.5):
    """A copy of a state dict with every tensor shifted by random noise."""
    gen = torch.Generator().manual_seed(seed)
    return {
        name: t + scale * t.std() * torch.randn(t.shape, generator=gen, dtype=t.dtype)
        for name, t in state.items()
    }


def recompute_logprobs(
    model, prompt_ids: list[int], token_ids: list[int], temperature: float = 1.0
) -> list[float]:
    """log_softmax of logits / T at each generated position, gathered at the generated ids."""
    with torch.no_grad():
        ids = torch.tensor([prompt_ids + token_ids])
        logits = model(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits[len(prompt_ids) - 1 : -1] / temperature, dim=-1)
    return logp.gather(1, torch.tensor(token_ids)[:, None])[:, 0].tolist()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def hf(tiny_model) -> HFEngine:
    return HFEngine(tiny_model)


PROMPT = [BOS, *range(40, 52)]


def test_greedy_is_deterministic_and_runs_to_max_tokens_or_eos(hf):
    spec = SamplingSpec(max_tokens=12, temperature=0.0)
    a = asyncio.run(hf.generate(PROMPT, spec))
    b = asyncio.run(hf.generate(PROMPT, spec))
    assert a.token_ids == b.token_ids
    assert len(a.token_ids) == len(a.logprobs)
    if a.finish_reason == "length":
        assert len(a.token_ids) == 12
    else:
        assert a.token_ids[-1] == EOS


def test_logprobs_are_those_of_the_tempered_distribution(hf):
    spec = SamplingSpec(max_tokens=10, temperature=0.7, seed=3)
    gen = asyncio.run(hf.generate(PROMPT, spec))
    expected = recompute_logprobs(hf.model, PROMPT, gen.token_ids, temperature=0.7)
    assert gen.logprobs == pytest.approx(expected, abs=1e-5)
    raw = recompute_logprobs(hf.model, PROMPT, gen.token_ids)
    assert gen.logprobs != pytest.approx(raw, abs=1e-3)


def test_seeded_sampling_is_reproducible(hf):
    spec = SamplingSpec(max_tokens=10, temperature=1.0, seed=11)
    assert asyncio.run(hf.generate(PROMPT, spec)) == asyncio.run(hf.generate(PROMPT, spec))


def test_stops_on_stop_token_and_stop_string(hf):
    free = asyncio.run(hf.generate(PROMPT, SamplingSpec(max_tokens=12, temperature=0.0)))
    ids = free.token_ids
    assert len(ids) >= 5, "the fixture model should not stop this early"
    by_token = asyncio.run(
        hf.generate(PROMPT, SamplingSpec(12, temperature=0.0, stop_token_ids=(ids[3],)))
    )
    first = ids.index(ids[3])
    assert by_token.token_ids == ids[: first + 1]
    assert by_token.finish_reason == "stop"
    stop = hf.decode(ids[:4])[-3:]
    by_string = asyncio.run(
        hf.generate(PROMPT, SamplingSpec(12, temperature=0.0, stop_strings=(stop,)))
    )
    out = by_string.token_ids
    assert stop in hf.decode(out) and stop not in hf.decode(out[:-1])
    assert out == ids[: len(out)] and len(out) <= 4
    assert by_string.finish_reason == "stop"


def test_update_weights_changes_the_model_and_the_version(tiny_model):
    engine = HFEngine(tiny_model)
    before = asyncio.run(engine.generate(PROMPT, SamplingSpec(8, temperature=0.0)))
    new = perturbed(engine.model.state_dict(), seed=1)
    asyncio.run(engine.update_weights(new.items(), version=5))
    after = asyncio.run(engine.generate(PROMPT, SamplingSpec(8, temperature=0.0)))
    assert engine.weight_version == after.weight_version == 5
    assert before.token_ids != after.token_ids
    with pytest.raises(ValueError, match="unexpected"):
        asyncio.run(engine.update_weights([("nope.weight", torch.zeros(1))], version=6))


def test_missing_model_path_is_a_one_line_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        HFEngine(tmp_path / "absent")
    assert "\n" not in str(info.value)
