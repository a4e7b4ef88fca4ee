"""Per-group exploration signals of GRPO batches: how many groups carry no learning signal, and how
diverse each group's final answers are. Groups are contiguous blocks of `group_size` completions (TRL order).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import torch


def group_outcome_fractions(correct: torch.Tensor, group_size: int) -> dict[str, float]:
    """Fractions of groups whose completions are all correct / all wrong / mixed. correct [B] bool,
    B = groups * G. The training logs (`groups/frac_*`) and the evaluation harness both use this.

    All-correct and all-wrong groups give zero GRPO advantage, so together they are the share of wasted rollouts.
    """
    if correct.numel() % group_size:
        raise ValueError(f"batch of {correct.numel()} completions is not a multiple of group size {group_size}")
    grouped = correct.bool().view(-1, group_size)
    all_correct = grouped.all(dim=1).float().mean().item()
    all_wrong = (~grouped).all(dim=1).float().mean().item()
    return {"frac_all_correct": all_correct, "frac_all_wrong": all_wrong, "frac_mixed": 1.0 - all_correct - all_wrong}


def mean_unique_per_group(answers: Sequence[Hashable | None], group_size: int) -> float:
    """Mean number of distinct final answers per group; a missing answer (None) counts as one value."""
    if len(answers) % group_size:
        raise ValueError(f"{len(answers)} answers is not a multiple of group size {group_size}")
    groups = [answers[i : i + group_size] for i in range(0, len(answers), group_size)]
    return sum(len(set(g)) for g in groups) / max(len(groups), 1)


def correct_mask(rewards_per_func: torch.Tensor, names: Sequence[str], weights: torch.Tensor, reward: str,
                 threshold: float) -> torch.Tensor:
    """The one notion of "correct" every component and metric uses: the reward function named `reward` above
    `threshold`, or, when no function has that name, the weighted total reward above it. `rewards_per_func [B, K]`
    (NaN: not scored, never correct), `weights [K]` -> bool `[B]`. A wrong but well-formatted answer stays wrong
    as long as the accuracy reward is the one named."""
    if reward in names:
        score = rewards_per_func[:, list(names).index(reward)]
    else:
        score = (rewards_per_func * weights.to(rewards_per_func.device)).nansum(dim=1)
        score = torch.where(torch.isnan(rewards_per_func).all(dim=1), torch.full_like(score, math.nan), score)
    return torch.nan_to_num(score, nan=-math.inf) > threshold
