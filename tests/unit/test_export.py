"""`spear-ray export` on a fake run directory laid out like a real one (no Ray, no DeepSpeed).

The fake checkpoint holds what `LearnerRank.save_checkpoint` writes: learner/deepspeed/ (here a
placeholder) and learner/policy/, an HF model directory written the learner's way
(`save_torch_state_dict` + config + generation config), here with weights that differ from the
builtin:tiny-random model they start from, and no tokenizer (so the export takes the run's).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch

from spear_ray.cli import main
from spear_ray.config import config_to_yaml, load_config
from spear_ray.export import ExportError, export_checkpoint
from spear_ray.models import resolve_model_path

MODEL = "builtin:tiny-random"


def modified_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """tiny-random's weights plus noise (std 0.2: peaked logits, no near-ties when greedy)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(resolve_model_path(MODEL)))
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue  # tied to embed_tokens, as the learner's full state dict saves it once
        state[name] = (tensor + 0.2 * torch.randn(tensor.shape, generator=gen)).contiguous()
    return state


def write_checkpoint(run: Path, step: int, state, *, complete: bool = True) -> Path:
    """RUN/checkpoints/step_N the way Controller.save + LearnerRank.save_checkpoint lay it out."""
    from huggingface_hub import save_torch_state_dict
    from transformers import AutoConfig, GenerationConfig

    model_dir = resolve_model_path(MODEL)
    checkpoint = run / "checkpoints" / f"step_{step:06d}"
    policy = checkpoint / "learner" / "policy"
    policy.mkdir(parents=True)
    (checkpoint / "learner" / "deepspeed").mkdir()
    (checkpoint / "learner" / "deepspeed" / "latest").write_text(f"step_{step}")
    save_torch_state_dict(state, policy)
    AutoConfig.from_pretrained(str(model_dir)).save_pretrained(policy)
    GenerationConfig.from_pretrained(str(model_dir)).save_pretrained(policy)
    if complete:
        (checkpoint / "COMPLETE").write_text(json.dumps({"step": step}) + "\n")
    return checkpoint


def fake_run(root: Path, state, overrides=()) -> Path:
    run = root / "run"
    run.mkdir()
    config = load_config("demo", [f"model.path={MODEL}", *overrides])
    (run / "config.yaml").write_text(config_to_yaml(config))
    write_checkpoint(run, 0, {k: v * 0 for k, v in state.items()})  # an older complete one
    write_checkpoint(run, 1, state)
    return run


@pytest.fixture(scope="module")
def state():
    return modified_state()


@pytest.fixture(scope="module")
def run(tmp_path_factory, state):
    return fake_run(tmp_path_factory.mktemp("export"), state)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, run) -> Path:
    out = tmp_path_factory.mktemp("exported") / "model"
    lines: list[str] = []
    export_checkpoint(run, out, log=lines.append)  # the run dir: its latest complete checkpoint
    assert lines and "step_000001" in lines[0]
    return out


def test_transformers_loads_the_checkpoint_weights_and_tokenizer(exported, state):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = {p.name for p in exported.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors"} <= names
    model = AutoModelForCausalLM.from_pretrained(str(exported))
    loaded = model.state_dict()
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name
    assert torch.equal(loaded["lm_head.weight"], state["model.embed_tokens.weight"])  # tied
    tokenizer = AutoTokenizer.from_pretrained(str(exported))
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "go left"}], tokenize=False, add_generation_prompt=True
    )
    assert "go left" in text and text.endswith("assistant\n")


def test_checkpoint_dir_with_its_own_tokenizer(tmp_path, run):
    from transformers import AutoTokenizer

    checkpoint = run / "checkpoints" / "step_000000"
    policy = checkpoint / "learner" / "policy"
    AutoTokenizer.from_pretrained(str(resolve_model_path(MODEL))).save_pretrained(policy)
    out = export_checkpoint(checkpoint, tmp_path / "out")
    assert AutoTokenizer.from_pretrained(str(out)).chat_template


def test_partial_checkpoint_names_the_previous_complete_one(tmp_path, run, state, capsys):
    partial = write_checkpoint(run, 2, state, complete=False)
    try:
        with pytest.raises(ExportError, match="partial checkpoint") as err:
            export_checkpoint(partial, tmp_path / "out")
        assert str(run / "checkpoints" / "step_000001") in str(err.value)
        assert main(["export", str(partial), "--to", str(tmp_path / "out")]) == 2
        stderr = capsys.readouterr().err
        assert len(stderr.strip().splitlines()) == 1 and "step_000001" in stderr
        # the run dir still exports its latest complete checkpoint
        assert main(["export", str(run), "--to", str(tmp_path / "out2")]) == 0
    finally:
        import shutil

        shutil.rmtree(partial)
    assert not (tmp_path / "out").exists()


def test_refuses_a_non_empty_target(tmp_path, run, capsys):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    assert main(["export", str(run), "--to", str(target)]) == 2
    stderr = capsys.readouterr().err.strip()
    assert len(stderr.splitlines()) == 1 and "not empty" in stderr
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", str(run), "--to", str(empty)]) == 0  # an empty one is fine
    assert (empty / "model.safetensors").is_file()


def test_vllm_greedy_equals_transformers_on_the_export(exported):
    from spear_ray.engines.base import SamplingSpec
    from spear_ray.engines.hf_engine import HFEngine
    from spear_ray.engines.vllm_engine import VLLMEngine

    hf = HFEngine(exported)
    prompt = hf.tokenizer.apply_chat_template(
        [{"role": "user", "content": "You are at the start. Reach the goal."}],
        tokenize=True,
        add_generation_prompt=True,
        return_dict=False,
    )
    spec = SamplingSpec(max_tokens=24, temperature=0.0)
    vllm = VLLMEngine(exported, dtype="float32", max_model_len=512, cpu_kv_cache_gib=0.25)
    try:
        got = asyncio.run(vllm.generate(list(prompt), spec))
    finally:
        vllm.shutdown()
    ref = hf.generate_sync(list(prompt), spec)
    assert got.token_ids == ref.token_ids and len(got.token_ids) > 0
