"""Locally built models: a BPE tokenizer trained on our envs' text, tiny Llama models, and the
SFT warm start on oracle demonstrations. Heavy imports (torch, transformers) happen on use.

    resolve_model_path("builtin:tiny-llama") -> Path of an HF model directory
"""

from spear_ray.models.tiny import (
    BUILTINS,
    PRESETS,
    ModelPathError,
    build_model,
    builtin_dir,
    cache_root,
    resolve_model_path,
)

__all__ = [
    "BUILTINS",
    "PRESETS",
    "ModelPathError",
    "build_model",
    "builtin_dir",
    "cache_root",
    "resolve_model_path",
]
