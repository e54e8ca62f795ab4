"""Locally built models: a byte-level BPE tokenizer trained on our envs' text, tiny Llama models,
and their SFT warm start on noisy oracle demonstrations. torch and transformers are imported only
when something is built or loaded, so `import spear_ray.models` stays fast.

    resolve_model_path("builtin:tiny-llama") -> Path of a cached HF model directory (built once)
    resolve_model_path("/models/Qwen2.5-1.5B") -> that Path (ModelPathError if it is missing)
    load_tokenizer(ensure_tokenizer()) -> the project tokenizer (ChatML, eos <|im_end|>)

Modules: tokenizer.py (the tokenizer), tiny.py (presets, builtins, cache), demos.py (oracle
demonstrations), sft.py (tokenising chats with a loss mask, training, a sampling evaluation),
smollm2.py (builtin:smollm2-135m: SmolLM2-135M-Instruct converted from a GGUF).
"""

from spear_ray.models.tiny import (
    BUILTINS,
    PRESETS,
    PRETRAINED,
    ModelPathError,
    build_model,
    builtin_dir,
    cache_root,
    ensure_builtin,
    ensure_tokenizer,
    load_tokenizer,
    resolve_model_path,
)

__all__ = [
    "BUILTINS",
    "PRESETS",
    "PRETRAINED",
    "ModelPathError",
    "build_model",
    "builtin_dir",
    "cache_root",
    "ensure_builtin",
    "ensure_tokenizer",
    "load_tokenizer",
    "resolve_model_path",
]
