"""A transformers engine with the `Engine` interface: the numerical reference in tests only.

It is deliberately plain (one full forward pass per sampled token, no KV cache, one request at a
time) so that it is obviously right; it is not a fallback for rollouts, which always use vLLM.
It follows the same rules as `VLLMEngine`: stop after a stop token id, a stop string (the token
that completes it is the last one) or the model's EOS token(s), the stop token included, and
log-probs = those of the sampled token under the distribution it was drawn from: log_softmax of
logits / T (renormalised over the top-p nucleus when top_p < 1; raw logits when greedy).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import torch

from spear_ray.engines.base import Generation, SamplingSpec

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFEngine:
    """transformers' model sampled token by token; same contract as `VLLMEngine`."""

    def __init__(
        self,
        model_path: str | os.PathLike,
        tokenizer_path: str | os.PathLike | None = None,
        *,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        seed: int = 0,
        device: str = "cpu",
        initial_version: int = 0,
    ) -> None:
        model_path = Path(model_path)
        if not model_path.exists():
            raise FileNotFoundError(f"HFEngine: model path {model_path} does not exist")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=_DTYPES[dtype])
        self.model.to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or model_path)
        self.device = device
        self.weight_version = initial_version
        self._generator = torch.Generator().manual_seed(seed)
        self.eos_token_ids = _eos_ids(self.tokenizer.eos_token_id, self.model.generation_config)

    async def generate(self, prompt_ids: list[int], spec: SamplingSpec) -> Generation:
        return self.generate_sync(prompt_ids, spec)

    @torch.no_grad()
    def generate_sync(self, prompt_ids: list[int], spec: SamplingSpec) -> Generation:
        generator = (
            torch.Generator().manual_seed(spec.seed) if spec.seed is not None else self._generator
        )
        stop_ids = set(spec.stop_token_ids) | self.eos_token_ids
        ids = list(prompt_ids)
        out_ids: list[int] = []
        logprobs: list[float] = []
        finish: Literal["stop", "length"] = "length"
        while len(out_ids) < spec.max_tokens:
            inputs = torch.tensor([ids], device=self.device)
            logits = self.model(input_ids=inputs).logits[0, -1].float().cpu()
            token, logp = _sample(logits, spec.temperature, spec.top_p, generator)
            out_ids.append(token)
            logprobs.append(logp)
            ids.append(token)
            if token in stop_ids or self._hit_stop_string(out_ids, spec.stop_strings):
                finish = "stop"
                break
        return Generation(out_ids, logprobs, finish, self.weight_version)

    async def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> None:
        state = dict(named_tensors)
        result = self.model.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if self.model.config.tie_word_embeddings else set()
        missing = set(result.missing_keys) - tied
        if missing or result.unexpected_keys:
            raise ValueError(
                f"HFEngine.update_weights: missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(result.unexpected_keys)[:3]}"
            )
        self.weight_version = version

    def shutdown(self) -> None:
        pass

    def decode(self, token_ids: list[int]) -> str:
        """The text stop strings are searched in (special tokens skipped, as vLLM does)."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _hit_stop_string(self, out_ids: list[int], stop_strings: tuple[str, ...]) -> bool:
        return bool(stop_strings) and any(s in self.decode(out_ids) for s in stop_strings)


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator) -> tuple[int, float]:
    """(token, its log-prob under the distribution it was drawn from)."""
    if temperature == 0:
        token = int(torch.argmax(logits))
        return token, torch.log_softmax(logits, dim=-1)[token].item()
    tempered = logits / temperature
    probs = torch.softmax(tempered, dim=-1)
    logp = torch.log_softmax(tempered, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        logp = logp - torch.log(probs.sum())  # renormalised over the nucleus
    token = int(torch.multinomial(probs, 1, generator=generator))
    return token, logp[token].item()


def _eos_ids(tokenizer_eos: int | None, generation_config) -> set[int]:
    ids = {tokenizer_eos} if tokenizer_eos is not None else set()
    extra = getattr(generation_config, "eos_token_id", None)
    if isinstance(extra, int):
        ids.add(extra)
    elif extra:
        ids.update(extra)
    return ids
