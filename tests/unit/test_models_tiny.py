"""Builtin models: build, load with transformers, cache reuse, locking, and path errors."""

from __future__ import annotations

import json
import threading
import time

import pytest

from spear_ray.models import tiny
from spear_ray.models.tiny import (
    BUILTINS,
    PRESETS,
    ModelPathError,
    builtin_dir,
    cache_root,
    ensure_tokenizer,
    resolve_model_path,
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh model cache for this module, sharing the (slow to train) tokenizer."""
    shared_tokenizer = ensure_tokenizer()
    root = tmp_path_factory.mktemp("spear_cache")
    mp = pytest.MonkeyPatch()
    mp.setenv(tiny.CACHE_ENV_VAR, str(root))
    (root / "models").mkdir()
    (root / "models" / shared_tokenizer.name).symlink_to(shared_tokenizer)
    yield root
    mp.undo()


@pytest.fixture(scope="module")
def tiny_random(cache):
    return resolve_model_path("builtin:tiny-random")


def test_cache_root_follows_env_var(cache, monkeypatch):
    assert cache_root() == cache / "models"
    monkeypatch.delenv(tiny.CACHE_ENV_VAR)
    assert str(cache_root()).endswith(".cache/spear_ray/models")


def test_tiny_random_loads_with_transformers(tiny_random):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert tiny_random.parent == cache_root()
    assert (tiny_random / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(tiny_random)
    tokenizer = AutoTokenizer.from_pretrained(tiny_random)
    config = model.config
    assert config.architectures == ["LlamaForCausalLM"]
    assert config.vocab_size == len(tokenizer)
    assert config.hidden_size == PRESETS["tiny"].hidden_size
    assert config.hidden_size // config.num_attention_heads in (32, 64)
    assert (
        config.eos_token_id
        == tokenizer.eos_token_id
        == tokenizer.convert_tokens_to_ids("<|im_end|>")
    )
    assert tokenizer.chat_template
    ids = tokenizer.encode("<|im_start|>user\n_O__\nG__P<|im_end|>\n", add_special_tokens=False)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tokenizer))
    info = json.loads((tiny_random / "build_info.json").read_text())
    assert info["name"] == "tiny-random" and info["num_parameters"] < 1_000_000
    # loadable by transformers 4.x too (vLLM builds pin it): no 5.x-only class name or fields
    tok_config = json.loads((tiny_random / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tok_config["chat_template"] == tokenizer.chat_template
    assert "extra_special_tokens" not in tok_config


def test_second_resolve_reuses_the_cache(tiny_random, monkeypatch, capsys):
    stamp = (tiny_random / "model.safetensors").stat().st_mtime_ns

    def no_rebuild(*args, **kwargs):
        raise AssertionError("rebuilt a cached builtin")

    monkeypatch.setattr(tiny, "build_builtin", no_rebuild)
    assert resolve_model_path("builtin:tiny-random") == tiny_random
    assert (tiny_random / "model.safetensors").stat().st_mtime_ns == stamp
    assert "building" not in capsys.readouterr().err


def test_concurrent_builds_build_once(cache, monkeypatch, capsys):
    calls = []

    def fake_build(name, path, log=None):
        calls.append(name)
        time.sleep(0.3)  # long enough for the other threads to reach the lock
        (path / "build_info.json").write_text("{}")
        return {"name": name}

    monkeypatch.setattr(tiny, "build_builtin", fake_build)
    monkeypatch.setattr(tiny, "BUILDER_VERSION", 10_000)  # a key nothing else has built
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(resolve_model_path("builtin:small-random")))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["small-random"]
    assert len(set(results)) == 1 and (results[0] / "build_info.json").is_file()
    err = capsys.readouterr().err
    assert err.count("building builtin:small-random") == 1 and err.count("\n") == 1
    # no temporary directories left behind
    assert not [p for p in cache_root().iterdir() if p.name.endswith(".tmp")]


def test_failed_build_leaves_nothing(cache, monkeypatch):
    def broken(name, path, log=None):
        (path / "half-written").write_text("x")
        raise RuntimeError("disk full")

    monkeypatch.setattr(tiny, "build_builtin", broken)
    monkeypatch.setattr(tiny, "BUILDER_VERSION", 10_001)
    with pytest.raises(RuntimeError, match="disk full"):
        resolve_model_path("builtin:tiny-random")
    assert not builtin_dir("tiny-random").exists()
    assert not [p for p in cache_root().iterdir() if p.name.endswith(".tmp")]


def test_cache_key_tracks_version_and_settings(monkeypatch):
    key = tiny.cache_key("tiny-random")
    assert key == tiny.cache_key("tiny-random")
    assert key != tiny.cache_key("small-random")
    monkeypatch.setattr(tiny, "BUILDER_VERSION", tiny.BUILDER_VERSION + 1)
    assert key != tiny.cache_key("tiny-random")


def test_real_paths_are_returned_as_given(tmp_path):
    assert resolve_model_path(str(tmp_path)) == tmp_path
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model_path(str(gguf)) == gguf


def test_missing_path_is_a_one_line_error(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ModelPathError) as err:
        resolve_model_path(missing)
    message = str(err.value)
    assert missing in message and "\n" not in message
    assert isinstance(err.value, FileNotFoundError)


def test_unknown_builtin_names_the_known_ones():
    with pytest.raises(ModelPathError) as err:
        resolve_model_path("builtin:gpt-17")
    message = str(err.value)
    assert "builtin:gpt-17" in message and "\n" not in message
    for name in BUILTINS:
        assert f"builtin:{name}" in message


@pytest.mark.slow
def test_tiny_llama_beats_its_random_init_on_eval_seeds():
    """The demo model (built into the real cache, minutes the first time) succeeds on held-out
    frozenlake maps far more often than the same architecture at random init."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spear_ray.models.sft import rollout_success_rate

    path = resolve_model_path("builtin:tiny-llama")
    info = json.loads((path / "build_info.json").read_text())
    recipe = info["sft"]["recipe"]
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    seeds = range(tiny.EVAL_SEED_START, tiny.EVAL_SEED_START + 64)
    options = recipe["env_options"]
    random_init = tiny.build_model(BUILTINS["tiny-llama"].size, tokenizer, seed=0)
    with tiny._build_threads():
        sft = rollout_success_rate(model, tokenizer, "frozenlake", options, seeds, sample_seed=1)
        base = rollout_success_rate(random_init, tokenizer, "frozenlake", options, seeds)
    # the demo model imitates a teacher that errs on 40% of turns: ~11-15% of held-out maps at
    # temperature 1 (8 of 64 here); random init walks into holes or off-format (~0%)
    assert base["success_rate"] <= 0.05, base
    assert sft["success_rate"] >= 0.08 and sft["success_rate"] > base["success_rate"] + 0.06, sft
    assert sft["invalid_action_rate"] < 0.2
