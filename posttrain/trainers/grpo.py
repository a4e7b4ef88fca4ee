"""GRPO trainers. `GRPOTrainer` is TRL's GRPOTrainer plus entropy-collapse tracking; the entropy-control
methods (STEER, EPO, DCPO, BNPO) subclass it.

What the base adds, each at the narrowest TRL hook and always through super():
- token-entropy statistics of every training micro-batch (`entropy/mean`, `entropy/p50`, `entropy/p95`,
  `entropy/top20_mean`), from the entropies TRL already computes in `_compute_loss` (no extra forward);
- group statistics of every generation batch (`groups/frac_all_correct`, `groups/frac_all_wrong`,
  `groups/unique_answers`), from the gathered rewards of `_calculate_rewards`;
- checkpointing of cross-step method state (`posttrain.trainers.state`).
All statistics are computed over the global batch (every process), so they do not depend on world size.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import trl
from accelerate.utils import gather_object
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from posttrain.algos.entropy import entropy_summary, masked_flatten
from posttrain.algos.groups import group_outcome_fractions, mean_unique_per_group
from posttrain.trainers.state import Stateful, load_states, save_states


@dataclass
class GRPOConfig(trl.GRPOConfig):
    """TRL's GRPOConfig plus what the entropy-tracking base needs."""

    correct_reward: str = field(
        default="accuracy",
        metadata={"help": "Name of the reward function whose value decides whether a completion is correct "
                  "(for the group statistics). If no reward function has this name, the weighted total is used."},
    )
    correct_threshold: float = field(
        default=0.5, metadata={"help": "A completion is correct when that reward is above this value."}
    )


def _completion_text(completion: Any) -> str:
    """TRL completions are strings, or (conversational) lists of messages."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content", "") or "" for m in completion if isinstance(m, dict))


class GRPOTrainer(trl.GRPOTrainer):
    """TRL's GRPOTrainer with entropy and group tracking and checkpointed method state.

    Extra argument: `answer_extractor(text) -> answer | None`, the task's final-answer extractor used for
    `groups/unique_answers` (default: posttrain.rewards.math.extract_answer).
    """

    def __init__(self, *args: Any, answer_extractor: Callable[[str], Any] | None = None, **kwargs: Any):
        if answer_extractor is None:
            from posttrain.rewards.math import extract_answer as answer_extractor
        self.answer_extractor = answer_extractor
        self.method_states: dict[str, Stateful] = {}
        self._entropy_stash: torch.Tensor | None = None
        super().__init__(*args, **kwargs)

    # --- entropy statistics -------------------------------------------------------------------------------
    def _get_per_token_logps_and_entropies(self, *args: Any, **kwargs: Any):
        logps, entropies, aux = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        # Only the loss forward asks for entropies; keep them for `_compute_loss` (no second forward).
        self._entropy_stash = entropies.detach() if entropies is not None else None
        return logps, entropies, aux

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        if self._entropy_stash is not None:
            mask = inputs["completion_mask"]
            if "tool_mask" in inputs:
                mask = mask * inputs["tool_mask"]
            self._log_entropy_stats(self._entropy_stash, mask)
            self._entropy_stash = None
        return loss

    def _log_entropy_stats(self, entropies: torch.Tensor, mask: torch.Tensor) -> None:
        local = masked_flatten(entropies, mask)
        # Variable-length per process: pad with NaN, gather, drop the padding.
        padded = self.accelerator.pad_across_processes(local, dim=0, pad_index=float("nan"))
        everything = self.accelerator.gather(padded)
        mode = "train" if self.model.training else "eval"
        for key, value in entropy_summary(everything).items():
            self._metrics[mode][f"entropy/{key}"].append(value)

    # --- group statistics ---------------------------------------------------------------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        mode = "train" if self.model.training else "eval"
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        if rewards_per_func.size(0) % group_size == 0:
            self._log_group_stats(rewards_per_func, completions, group_size, mode)
        return rewards_per_func

    def _log_group_stats(self, rewards_per_func: torch.Tensor, completions: list, group_size: int, mode: str) -> None:
        if self.args.correct_reward in self.reward_func_names:
            score = rewards_per_func[:, self.reward_func_names.index(self.args.correct_reward)]
        else:
            score = (rewards_per_func * self.reward_weights.to(rewards_per_func.device)).nansum(dim=1)
        correct = torch.nan_to_num(score, nan=0.0) > self.args.correct_threshold
        for key, value in group_outcome_fractions(correct, group_size).items():
            self._metrics[mode][f"groups/{key}"].append(value)
        texts = gather_object([_completion_text(c) for c in completions])
        answers = [self.answer_extractor(t) for t in texts]
        self._metrics[mode]["groups/unique_answers"].append(mean_unique_per_group(answers, group_size))

    # --- method state in checkpoints ----------------------------------------------------------------------
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.method_states and self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            save_states(self.method_states, folder)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and self.method_states:
            load_states(self.method_states, checkpoint)
