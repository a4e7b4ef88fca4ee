"""Format rewards: does the completion follow the requested answer format?"""

from __future__ import annotations

from typing import Any

from posttrain.rewards.math import extract_boxed

__all__ = ["has_boxed_answer", "boxed_format_reward"]


def has_boxed_answer(text: str) -> bool:
    """Whether `text` holds a complete, non-empty \\boxed{...} (or \\fbox{...}) answer."""
    return bool(extract_boxed(text))


def boxed_format_reward(
    prompts: list[Any] | None, completions: list[Any], completion_ids: list[list[int]] | None = None, **kwargs: Any
) -> list[float | None]:
    """TRL reward function: 1.0 per completion with a non-empty \\boxed{...} answer, else 0.0.

    `completions` may be strings or conversational message lists.
    """
    from posttrain.rewards import completion_text  # the package imports this module

    return [1.0 if has_boxed_answer(completion_text(c)) else 0.0 for c in completions]
