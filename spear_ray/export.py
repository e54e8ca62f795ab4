"""`spear-ray export`: a checkpoint's policy as a standalone HF model directory.

    export_checkpoint("runs/demo", "exported/")                          # latest complete one
    export_checkpoint("runs/demo/checkpoints/step_000009", "exported/")  # that one

The output holds the model's safetensors (as the learner wrote them), config.json,
generation_config.json and the tokenizer with its chat template, so that
`transformers.AutoModelForCausalLM.from_pretrained` and vLLM load it as is. The tokenizer is the
checkpoint's own (learner/policy) when it has one, else the run's (`model.tokenizer_path` or
`model.path` of RUN/config.yaml).

Every user error is an `ExportError` (a `ConfigError`: the CLI prints one line, exit status 2).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from spear_ray.config import ConfigError
from spear_ray.run_dir import COMPLETE, RunDir

POLICY = Path("learner") / "policy"  # an HF model directory inside a checkpoint (rank 0 writes it)
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json")


class ExportError(ConfigError):
    """A checkpoint that cannot be exported or a target that must not be written (one line)."""


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint: its directory, its policy's HF directory and its run (if any)."""

    path: Path
    policy: Path
    run: Path | None

    @property
    def step(self) -> int | None:
        try:
            return int(self.path.name.removeprefix("step_"))
        except ValueError:
            return None


def _is_checkpoint_dir(path: Path) -> bool:
    return (
        path.name.startswith("step_") or (path / "learner").is_dir() or (path / COMPLETE).exists()
    )


def resolve_checkpoint(path: str | os.PathLike, log=None) -> Checkpoint:
    """A run directory (-> its newest usable checkpoint; newer partial or damaged ones are
    reported to `log`, one line each) or a checkpoint directory (which must have its COMPLETE
    marker) -> the checkpoint, whose policy files must match the manifest (checksums);
    ExportError (one line) otherwise."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path}: no such run or checkpoint directory")
    if (path / "config.yaml").is_file():
        run = RunDir(path)
        latest = run.latest_checkpoint(log=log)
        if latest is None:
            raise ExportError(f"{path}: the run has no usable checkpoint (checkpoints/step_*)")
        _check_policy_files(run, latest)
        return Checkpoint(latest, _policy_dir(latest), path)
    if not _is_checkpoint_dir(path):
        raise ExportError(
            f"{path} is neither a spear-ray run directory (config.yaml) nor a checkpoint "
            f"directory (RUN/checkpoints/step_N)"
        )
    run_path = path.parent.parent if path.parent.name == "checkpoints" else None
    if run_path is not None and not (run_path / "config.yaml").is_file():
        run_path = None
    if not (path / COMPLETE).is_file():
        earlier = []
        if run_path is not None:
            earlier = [p for p in RunDir(run_path).complete_checkpoints() if p.name < path.name]
        previous = (
            f"the previous complete one is {earlier[-1]}"
            if earlier
            else "there is no earlier complete checkpoint"
        )
        raise ExportError(
            f"{path} is a partial checkpoint (no {COMPLETE} marker: it was being written when "
            f"the run stopped); {previous}"
        )
    _check_policy_files(RunDir(run_path or path.parent.parent), path)
    return Checkpoint(path, _policy_dir(path), run_path)


def _check_policy_files(run: RunDir, checkpoint: Path) -> None:
    """ExportError if the checkpoint's files are not those it was saved with (sizes, and the
    policy's checksums), naming the file and the previous usable checkpoint."""
    problem = run.verify(checkpoint, checksums=False) or run.verify(
        checkpoint, checksums=True, under=POLICY.as_posix()
    )
    if problem is None:
        return
    earlier = [
        p
        for p in run.checkpoints_newest_first()
        if p.name < checkpoint.name and not run.verify(p, checksums=False)
    ]
    previous = f"the previous usable one is {earlier[0]}" if earlier else "there is no earlier one"
    raise ExportError(f"{checkpoint} is damaged ({problem.detail}); {previous}")


def _policy_dir(checkpoint: Path) -> Path:
    policy = checkpoint / POLICY
    if not (policy / "config.json").is_file() or not any(policy.glob("*.safetensors")):
        raise ExportError(
            f"{checkpoint}: no HF model under {POLICY} (config.json + *.safetensors); it was "
            f"written by rank 0 of the learners"
        )
    return policy


def has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


def run_tokenizer_path(run: Path | None) -> Path:
    """The tokenizer directory (or .gguf file) named by the run's config."""
    from spear_ray.models import ModelPathError, resolve_model_path

    if run is None:
        raise ExportError(
            "the checkpoint has no tokenizer and is not inside a run directory (RUN/config.yaml "
            "names the tokenizer)"
        )
    _, config = RunDir.open(run)
    source = config.model.tokenizer_path or config.model.path
    try:
        return resolve_model_path(source)
    except ModelPathError as err:
        raise ExportError(f"{run / 'config.yaml'}: tokenizer: {err}") from None


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    if path.is_file() and path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoTokenizer.from_pretrained(str(path))


def export_checkpoint(checkpoint: str | os.PathLike, to: str | os.PathLike, log=None) -> Path:
    """Write the checkpoint's policy (+ tokenizer) into the new or empty directory `to`."""
    target = Path(to)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ExportError(f"{target} exists and is not empty; export into a new directory")
    found = resolve_checkpoint(checkpoint, log=log)
    tokenizer_source = found.policy if has_tokenizer(found.policy) else None
    if tokenizer_source is None:
        tokenizer_source = run_tokenizer_path(found.run)
    tokenizer = load_tokenizer(tokenizer_source)

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        for item in sorted(found.policy.iterdir()):
            if item.is_file() and not item.name.startswith("."):
                shutil.copy2(item, tmp / item.name)
        if not (tmp / "generation_config.json").is_file():
            from transformers import AutoConfig, GenerationConfig

            config = AutoConfig.from_pretrained(str(tmp))
            GenerationConfig.from_model_config(config).save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        if target.exists():
            target.rmdir()  # empty (checked above)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if log is not None:
        what = (
            ""
            if getattr(tokenizer, "chat_template", None)
            else " (its tokenizer has no chat template)"
        )
        log(
            f"exported {found.path} to {target}: safetensors, config, generation config, "
            f"tokenizer from {tokenizer_source}{what}"
        )
    return target
