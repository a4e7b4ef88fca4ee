"""Reward-model trainers: TRL's RewardTrainer (Bradley-Terry loss -log sigmoid(r_chosen - r_rejected) on preference
pairs) for one reward model, the member of an ensemble, in one of three forms (`RewardConfig.form`):
- `full`: the whole sequence-classification model is trained;
- `lora`: a LoRA adapter plus its own copy of the reward head on a frozen base (pass `peft_config`);
- `heads`: only the linear reward head, on the frozen base's last hidden state; saved as `head.safetensors` alone.

`RewardEnsembleConfig` adds the ensemble's size and member seeds (Coste et al. 2024: members differ only in seed,
which sets the head initialisation and the data order). The ensemble's members are trained one after another by
the `reward` pipeline (posttrain.pipelines.reward), each with this trainer and its own seed.

What `RewardTrainer` changes in TRL, at the narrowest hooks: in the `heads` form it freezes everything but the head
before TRL builds the optimizer, and `_save` / `_load_from_checkpoint` write and read only the head.

Heads on cached features (`cache_features`, the default of the `heads` form): the frozen base is deterministic, so
its pooled last hidden state of every response is computed once (`head_features`) and every member's head trains on
that table (`FeatureHeadModel`) instead of running the base K x epochs times. The trainer then sees each response as
one "token": the index of its row in the table. Same loss, same data order and head initialisation per seed, the same
head as training with the base in the loop (up to float rounding); K members cost one forward pass over the data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import trl
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from posttrain.rewards.ensemble import (
    FORMS,
    HEAD_FILE,
    load_head,
    pooled_outputs,
    reward_head,
    save_head,
    sequence_scores,
)

__all__ = ["FeatureHeadModel", "RewardConfig", "RewardEnsembleConfig", "RewardTrainer", "head_features",
           "init_reward_head"]


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class RewardConfig(trl.RewardConfig):
    """TRL's RewardConfig plus the member form."""

    form: Literal["full", "lora", "heads"] = field(
        default="full",
        metadata=_help("full: train the whole model; lora: a LoRA adapter and its head on a frozen base (model.peft); "
                       "heads: only the linear reward head on the frozen base."),
    )

    cache_features: bool = field(
        default=True,
        metadata=_help("heads form: run the frozen base once over the pairs and train every head on its features "
                       "(exact; needs disable_dropout, the default). false: the base runs in every training step."),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.form not in FORMS:
            raise ValueError(f"form must be one of {', '.join(FORMS)}, got {self.form!r}")

    @property
    def uses_feature_cache(self) -> bool:
        return self.form == "heads" and self.cache_features and self.disable_dropout


@dataclass
class RewardEnsembleConfig(RewardConfig):
    """RewardConfig plus the ensemble: `num_members` members with seeds `member_seeds` (default seed, seed+1, ...)."""

    num_members: int = field(default=5, metadata=_help("K, the number of reward models (Coste et al.: 5)."))
    member_seeds: list[int] | None = field(
        default=None, metadata=_help("One seed per member (head initialisation and data order); default seed + k."))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_members < 1:
            raise ValueError(f"num_members must be >= 1, got {self.num_members}")
        seeds = self.seeds()
        if len(seeds) != self.num_members or len(set(seeds)) != len(seeds):
            raise ValueError(f"member_seeds must hold {self.num_members} distinct seeds, got {self.member_seeds}")

    def seeds(self) -> list[int]:
        return list(self.member_seeds) if self.member_seeds is not None else [self.seed + k
                                                                              for k in range(self.num_members)]


def init_reward_head(model: Any, seed: int) -> None:
    """Re-initialise the reward head from `seed`: normal(0, initializer_range) weights, zero bias (transformers'
    initialisation of a new head), so that a member's head depends on its seed only. Under ZeRO-3 (a model loaded
    partitioned) the head is gathered for it: every rank calls this."""
    from posttrain.distributed import gathered_for_update

    _, head = reward_head(model)
    std = getattr(model.config.get_text_config(), "initializer_range", 0.02)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    bias = getattr(head, "bias", None)
    with gathered_for_update([head.weight] if bias is None else [head.weight, bias]), torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * std)
        if bias is not None:
            bias.zero_()


def head_features(model: Any, ids: Sequence[Sequence[int]], pad_token_id: int, batch_size: int = 16) -> torch.Tensor:
    """[N, H] float32: the sequence-classification `model`'s pooled last hidden state of each token sequence, i.e. the
    input of its reward head at the token the head scores (the last non-pad token)."""
    name, head = reward_head(model)
    setattr(model, name, torch.nn.Identity())  # the model then pools the hidden states instead of the scores
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        return pooled_outputs(partial(sequence_scores, model), ids, pad_token_id, device, batch_size)
    finally:
        setattr(model, name, head)
        model.train(was_training)


class FeatureHeadModel(PreTrainedModel):
    """A linear reward head over a fixed feature table: `input_ids [B, 1]` are row indices into `features [N, H]`
    (what a RewardTrainer data collator gives for one-id "sequences"), logits = score(features[ids]) `[B, 1]`."""

    config_class = PretrainedConfig
    base_model_prefix = "feature_head"

    def __init__(self, config: PretrainedConfig, features: torch.Tensor):
        super().__init__(config)
        self.register_buffer("features", features, persistent=False)
        self.score = torch.nn.Linear(features.shape[1], 1, bias=False)
        self.post_init()

    @classmethod
    def on(cls, features: torch.Tensor, base_config: Any) -> FeatureHeadModel:
        """A head model over `features` with the base's head initialisation scale."""
        text = base_config.get_text_config()
        config = PretrainedConfig(num_labels=1, hidden_size=features.shape[1],
                                  initializer_range=getattr(text, "initializer_range", 0.02))
        return cls(config, features)

    def gradient_checkpointing_enable(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to checkpoint: the base ran once, before training."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs: Any) -> SequenceClassifierOutput:
        return SequenceClassifierOutput(logits=self.score(self.features[input_ids[:, 0]]))


class RewardTrainer(trl.RewardTrainer):
    """TRL's RewardTrainer for one reward model (or ensemble member) in the form `args.form`."""

    def __init__(self, model: Any, args: RewardConfig, *posargs: Any, **kwargs: Any):
        if not isinstance(args, RewardConfig):
            raise TypeError(f"{type(self).__name__} needs a posttrain RewardConfig, got {type(args).__name__}")
        if args.form == "lora" and kwargs.get("peft_config") is None and not hasattr(model, "peft_config"):
            raise ValueError("form 'lora' needs a peft_config (or a PeftModel)")
        if args.form != "lora" and kwargs.get("peft_config") is not None:
            raise ValueError(f"form {args.form!r} trains no adapter: drop peft_config or use form 'lora'")
        if args.form == "heads":
            _, head = reward_head(model)
            model.requires_grad_(False)  # before TRL and transformers build the optimizer from trainable params
            head.requires_grad_(True)
        super().__init__(model, args, *posargs, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if self.args.form != "heads":
            return super()._save(output_dir, state_dict)
        folder = Path(output_dir or self.args.output_dir)
        if self.args.should_save:
            save_head(self.accelerator.unwrap_model(self.model), folder, self.args.seed)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(folder)
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if self.args.form != "heads":
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        _, head = reward_head(self.accelerator.unwrap_model(model or self.model))
        tensors = load_head(Path(resume_from_checkpoint) / HEAD_FILE, head.in_features)
        head.load_state_dict({k: v.to(head.weight.device) for k, v in tensors.items()})
        return None
