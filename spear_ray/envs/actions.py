"""How an environment finds the action in the model's free-text turn.

Every env uses the same rule, configured by two option fields:

- `action_tag` (default "action"): the action is the content of the LAST `<action>...</action>`
  in the turn. An opening tag that is never closed counts up to the end of the text, because an
  engine that stops on the closing tag as a stop string usually drops it from the output.
- `action_fallback` (default "none"): what to do when the turn has no such tag.
  "none": the turn is an invalid action; "last_line": the last non-empty line is the action;
  "whole_text": the whole turn (stripped) is the action.

An env then checks the extracted text against its own action vocabulary; anything that does
not parse is an invalid action (flagged in `EnvInfo.invalid_action`, penalised by the caller; the
episode goes on and the turn counts). The grid envs (frozenlake, sokoban) share one vocabulary,
`GRID_MOVES`, read by `parse_grid_move`; every env with an action tag stops generation at its
closing tag (`StopAtActionTag`).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ActionFallback = Literal["none", "last_line", "whole_text"]

TAG_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.:-]*$"


@lru_cache(maxsize=64)
def _tag_regex(tag: str) -> re.Pattern[str]:
    t = re.escape(tag)
    return re.compile(rf"<{t}>(.*?)(?:</{t}>|\Z)", re.DOTALL)


def find_tagged(text: str, tag: str) -> list[str]:
    """Contents of every `<tag>...</tag>` in order (a final unclosed tag runs to the end)."""
    return [m.group(1) for m in _tag_regex(tag).finditer(text)]


def extract_action(text: str, tag: str = "action", fallback: ActionFallback = "none") -> str | None:
    """The action string of a turn, stripped, or None when the turn has none."""
    found = find_tagged(text, tag)
    if found:
        action = found[-1].strip()
        return action or None
    if fallback == "last_line":
        lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
        return lines[-1] if lines else None
    if fallback == "whole_text":
        return text.strip() or None
    return None


SHOWN_ACTION_CHARS = 80


def shown_action(action: str | None, limit: int = SHOWN_ACTION_CHARS) -> str:
    """An invalid action as the next observation quotes it: repr(), cut to `limit` characters
    (a 100 kB reply must not become a 100 kB observation)."""
    if action is None or len(action) <= limit:
        return repr(action)
    return f"{action[:limit]!r}... ({len(action)} characters)"


def format_hint(tag: str) -> str:
    """One sentence that tells the model how to write its action."""
    return f"Write your action inside <{tag}></{tag}> tags, e.g. <{tag}>ACTION</{tag}>."


class TurnOptions(BaseModel):
    """Option fields every text env shares (subclassed by each env's options model)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_turns: int = Field(
        30, ge=1, description="Episode ends (truncated, no success) after this many model turns."
    )
    action_tag: str = Field(
        "action",
        pattern=TAG_PATTERN,
        description="The action is the content of the last <action_tag>...</action_tag> in a turn.",
    )
    action_fallback: ActionFallback = Field(
        "none",
        description="When a turn has no action tag: none = invalid action, last_line = the last"
        " non-empty line, whole_text = the whole turn.",
    )
    include_instructions: bool = Field(
        True, description="Start the first observation with the task rules and the action format."
    )


class StopAtActionTag:
    """Base of the envs whose turn is complete at the closing action tag."""

    options: TurnOptions

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """Generation stops right after the closing action tag (the turn is complete)."""
        return (f"</{self.options.action_tag}>",)


GRID_MOVES: dict[str, tuple[int, int]] = {
    "up": (-1, 0),
    "down": (1, 0),
    "left": (0, -1),
    "right": (0, 1),
}
_GRID_ALIASES = {"u": "up", "d": "down", "l": "left", "r": "right"}


def parse_grid_move(word: str | None) -> str | None:
    """'Up', 'U' or 'up.' -> 'up' (case and surrounding periods ignored); None if not a move."""
    if not word:
        return None
    word = word.strip().strip(".").lower()
    word = _GRID_ALIASES.get(word, word)
    return word if word in GRID_MOVES else None
