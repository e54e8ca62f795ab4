"""Token-in-token-out chat formatting for multi-turn episodes.

The chat template is applied once, to the first observation. Every later turn is *appended*
as token ids: the tokens that close the model's turn (e.g. `<|im_end|>\\n`), then the next user
message and the generation prompt (`<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n`).
What the model generated is never decoded and re-encoded, so the ids trained on are exactly the
ids sampled.

The pieces are cut out of the tokenizer's own chat template by rendering a probe conversation,
so any template with a fixed per-message structure works (ChatML/Qwen, Llama 3, SmolLM2, ...).
"""

from __future__ import annotations

from typing import Any

_USER = "\x00SPEAR_PROBE_USER\x00"
_ASSISTANT = "\x00SPEAR_PROBE_ASSISTANT\x00"
_OBSERVATION = "\x00SPEAR_PROBE_OBSERVATION\x00"


class ChatTemplateError(ValueError):
    """The tokenizer cannot format multi-turn chats (no template, or an unusable one)."""


def _ids(encoded: Any) -> list[int]:
    # transformers 4 returns a list; 5 may return a BatchEncoding.
    if hasattr(encoded, "keys") and "input_ids" in encoded:
        encoded = encoded["input_ids"]
    return list(encoded)


class ChatFormat:
    """Builds the prompt ids and the ids appended between turns for one tokenizer."""

    def __init__(self, tokenizer: Any, system_prompt: str | None = None, name: str = "tokenizer"):
        if not getattr(tokenizer, "chat_template", None):
            raise ChatTemplateError(
                f"{name} has no chat template; multi-turn training needs one: use an instruct "
                "model's tokenizer or set `chat_template` in its tokenizer_config.json"
            )
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        probe = [*self._system(), {"role": "user", "content": _USER}]
        probe.append({"role": "assistant", "content": _ASSISTANT})
        base = tokenizer.apply_chat_template(probe, tokenize=False)
        full = tokenizer.apply_chat_template(
            [*probe, {"role": "user", "content": _OBSERVATION}],
            tokenize=False,
            add_generation_prompt=True,
        )
        if not full.startswith(base) or _ASSISTANT not in base:
            raise ChatTemplateError(
                f"{name}'s chat template re-renders earlier messages when a turn is added; "
                "token-in-token-out multi-turn episodes need a template that only appends"
            )
        self._close_text = base[base.index(_ASSISTANT) + len(_ASSISTANT) :]
        self._turn_text = full[len(base) :]
        self.close_ids = self._encode(self._close_text)
        self.eos_token_id: int | None = tokenizer.eos_token_id

    def _system(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def prompt_ids(self, first_observation: str) -> list[int]:
        """The whole prompt: template applied to the first observation, ending ready to generate."""
        messages = [*self._system(), {"role": "user", "content": first_observation}]
        return _ids(
            self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        )

    def turn_close_ids(self, generated: list[int]) -> list[int]:
        """Ids that close the model's turn, minus the part it already generated itself (a turn
        that stopped on the end-of-turn token has it; one cut by a stop string has none)."""
        close = self.close_ids
        for k in range(min(len(close), len(generated)), 0, -1):
            if generated[-k:] == close[:k]:
                return close[k:]
        return list(close)

    def observation_ids(self, observation: str) -> list[int]:
        """The next user message plus the generation prompt, as ids."""
        return self._encode(self._turn_text.replace(_OBSERVATION, observation))

    def stop_token_ids(self) -> tuple[int, ...]:
        """Tokens that end a turn: the end-of-turn token of the template and eos."""
        special = set(getattr(self.tokenizer, "all_special_ids", ()))
        ids = {self.close_ids[0]} if self.close_ids and self.close_ids[0] in special else set()
        if self.eos_token_id is not None:
            ids.add(self.eos_token_id)
        return tuple(sorted(ids))
