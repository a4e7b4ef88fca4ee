"""Shared-prefix helpers: run a prefix that several sequences share once and continue each from its cache.

The HF rollout engine uses them for the prompts' common prefix (a chat template's system prompt) and the reward
ensemble for a scoring batch's shared prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    """The number of leading tokens every sequence of `seqs` (at least one) has in common."""
    first, k = seqs[0], min(len(s) for s in seqs)
    for s in seqs[1:]:
        j = 0
        while j < k and s[j] == first[j]:
            j += 1
        k = j
    return k


def repeat_cache(cache: Any, rows: int, into: Any = None) -> Any:
    """`rows` copies of the one-row `cache` in a new cache (`into`, an empty layered cache; default a
    DynamicCache). The copies are later grown in place, so they share no storage with `cache` or each other."""
    from transformers import DynamicCache

    into = DynamicCache() if into is None else into
    for i, layer in enumerate(cache.layers):
        into.update(layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1), i)
    return into
