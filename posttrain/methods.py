"""Registry of training methods: recipe `method:` name -> trainer and config classes.

Classes are named by import path and loaded lazily, so reading and validating a recipe does not
import the trainers of every other method. A method's `kind` picks its pipeline (posttrain.pipelines): the
recipe sections it reads and its data flow; the runner dispatches on it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class MethodSpec:
    name: str
    trainer: str  # "module:Class"
    config: str  # "module:Class", a dataclass extending the TRL config of that trainer
    kind: str  # "grpo", "dpo", ...: the pipeline that runs it (posttrain.pipelines.PIPELINES)

    @staticmethod
    def _load(path: str) -> type:
        module, _, attr = path.partition(":")
        return getattr(importlib.import_module(module), attr)

    def trainer_class(self) -> type:
        return self._load(self.trainer)

    def config_class(self) -> type:
        return self._load(self.config)


METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, trainer: str, config: str, kind: str) -> None:
    METHODS[name] = MethodSpec(name=name, trainer=trainer, config=config, kind=kind)


register_method("grpo", "posttrain.trainers.grpo:GRPOTrainer", "posttrain.trainers.grpo:GRPOConfig", "grpo")
for _name, _cls in (("steer", "STEER"), ("epo", "EPO"), ("dcpo", "DCPO"), ("bnpo", "BNPO")):
    register_method(_name, f"posttrain.trainers.grpo:{_cls}Trainer", f"posttrain.trainers.grpo:{_cls}Config", "grpo")
# Any composition of registry components (advantage, token_weight, entropy_term) with GRPO's defaults, e.g.
# QAE advantages or Clip-Cov token weights: `method: entropy_control` + `trainer: {advantage: qae}`.
register_method("entropy_control", "posttrain.trainers.grpo:EntropyControlTrainer",
                "posttrain.trainers.grpo:EntropyControlConfig", "grpo")
# Preference pairs: TRL's DPOTrainer (the baseline; on the CPU it scores only the response positions), and DPO-Shift.
register_method("dpo", "posttrain.trainers.dpo:DPOTrainer", "posttrain.trainers.dpo:DPOConfig", "dpo")
register_method("dpo_shift", "posttrain.trainers.dpo:DPOShiftTrainer", "posttrain.trainers.dpo:DPOShiftConfig", "dpo")
# Reward models on preference pairs, and ensembles of them (kind `reward`, posttrain.pipelines.reward).
register_method("reward", "posttrain.trainers.reward:RewardTrainer", "posttrain.trainers.reward:RewardConfig", "reward")
register_method("reward_ensemble", "posttrain.trainers.reward:RewardTrainer",
                "posttrain.trainers.reward:RewardEnsembleConfig", "reward")
# Supervised fine-tuning: a task sequence stage by stage (EMA-balanced LoRA and its baselines), and plain SFT, its
# one-stage case (LoRA or full; several tasks at once: the multi-task upper bound).
register_method("continual", "posttrain.trainers.continual:ContinualTrainer",
                "posttrain.trainers.continual:ContinualConfig", "continual")
register_method("sft", "posttrain.trainers.continual:SFTTrainer", "posttrain.trainers.continual:SFTConfig", "continual")


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        import difflib

        close = difflib.get_close_matches(name, METHODS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise KeyError(f"unknown method '{name}'; known methods: {', '.join(sorted(METHODS))}.{hint}")
    return METHODS[name]
