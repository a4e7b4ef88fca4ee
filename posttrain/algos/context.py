"""What a component reads besides its main input: the per-token context of ``token_weight`` functions and the
context of ``entropy_term`` functions. Plain dataclasses of tensors and floats; the trainer fills them (only the
costly fields a component declares in its registry ``needs``), the functions read them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

__all__ = ["TokenContext", "EntropyContext"]


@dataclass
class TokenContext:
    """Per-token inputs a ``token_weight`` function may read; a function raises if one it needs is None.

    Shapes ``[B, T]`` unless noted. ``mask``: 1 on completion tokens, 0 on padding (and environment tokens).
    ``logp``: log p of the sampled token under the current policy at the sampling temperature (as TRL computes
    it); ``ratio``: p / p_old against the sampling ("old") policy; ``entropy``: the current policy's token
    entropy; ``entropy_old``: the sampling policy's (declared need ``entropy_old``); ``tempered_old_logps``:
    ``{T: [B, T]}`` sampled-token log-probs of the sampling policy at the sampling temperature times T, with
    T = 1 among the keys (need ``tempered_old_logps``); ``rewards [B]``: weighted total reward (NaN:
    unscorable); ``correct [B]``: 1.0 where the completion counts as correct (the trainer's one notion of
    correct, need ``correct``); ``p_hat``: the fraction correct over the GLOBAL batch; ``h_prev``: DCPO's
    state; ``reduce_max``: maximum of a scalar tensor over all processes (identity in one process).
    """

    mask: Tensor
    logp: Tensor | None = None
    ratio: Tensor | None = None
    entropy: Tensor | None = None
    entropy_old: Tensor | None = None
    tempered_old_logps: dict[float, Tensor] | None = None
    rewards: Tensor | None = None
    correct: Tensor | None = None
    p_hat: float | None = None
    h_prev: float | None = None
    reduce_max: Callable[[Tensor], Tensor] | None = None

    def need(self, method: str, *names: str) -> list[Any]:
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ValueError(f"token_weight {method!r} needs TokenContext fields: {', '.join(missing)}")
        return [getattr(self, n) for n in names]


@dataclass
class EntropyContext:
    """Inputs of an ``entropy_term`` besides the entropies. ``mask [B, T]``; ``turn_ids [B, T]``: the
    0-based turn index of each token (None: one turn per trajectory); ``h_bar``: mean of the earlier
    steps' mean entropies (None at the first step); ``step``: optimizer step k; ``total_steps``."""

    mask: Tensor
    turn_ids: Tensor | None = None
    h_bar: float | None = None
    step: int = 0
    total_steps: int = 1
