"""Supervised fine-tuning trainers: TRL's SFTTrainer through our stack (`method: sft`), and the stage trainer of a
continual task sequence (`method: continual`): EMA-balanced LoRA (LCIA) and the parts its baselines need.

`SFTTrainer` is TRL's SFTTrainer with checkpointed method state, scoring only the completion positions with TRL's
fused LM head on the CPU too (`posttrain.trainers.fused_head`). `ContinualTrainer` adds, each at the narrowest
hook and always through super():
- the EMA theta* of the trainable (adapter) tensors, `AdapterEMA`, updated by `EMACallback.on_optimizer_step`:
  once per optimizer step, after the step and before the gradients are zeroed, so gradient accumulation and the
  DDP average are done and the step's gradient g is there (asserted: setups where it is not, DeepSpeed ZeRO or
  FSDP, are refused). The per-tensor weight comes from `posttrain.algos.ema.EMA_WEIGHTS` (`dynamic`, `fixed`).
  At the stage's end (`ema_output: replace`, LCIA) the live weights are replaced by theta*; with
  `ema_output: slow` (I-LoRA) theta* is a slow learner kept across stages, the stage's output, while training
  goes on from the live (fast) weights;
- a reservoir replay buffer (`ReplayBuffer`) whose rows join every micro-batch (`get_batch_samples`);
- I-LoRA's consistency loss between the fast and slow weights' hidden states on the replayed rows
  (`compute_loss`);
- cross-step state in checkpoints (EMA buffers, previous gradients, replay buffer, codebook, evaluation
  history: `self.method_states`, `posttrain.trainers.state`).
Which of these a run uses is the recipe's `trainer:` choice (`ContinualConfig`), so a baseline is a recipe change.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import trl
from transformers import TrainerCallback

from posttrain.algos.ema import EMA_WEIGHTS, DynamicEMAArgs, FixedEMAArgs, ema_update, hidden_consistency
from posttrain.trainers.fused_head import compact_lm_head_on_cpu
from posttrain.trainers.state import MethodStateMixin, Stateful

__all__ = ["AdapterEMA", "ContinualConfig", "ContinualEvalCallback", "ContinualTrainer", "EMACallback",
           "EvalHistory", "LiveWeights", "ReplayBuffer", "SFTConfig", "SFTTrainer", "refuse_unreal_gradients"]


@dataclass
class SFTConfig(trl.SFTConfig):
    """TRL's SFTConfig (every TRL option works in a recipe's `trainer:`)."""


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class ContinualConfig(SFTConfig):
    """SFTConfig plus the continual options. Defaults are LCIA's: dynamic EMA replaced into the adapter at each
    stage's end, retrain-or-expand at tau = 0.9; the baselines change a few of these (see recipes/continual/)."""

    ema: Literal["dynamic", "fixed", "none"] = field(
        default="dynamic", metadata=_help("EMA weight of the adapter (posttrain.algos.ema.EMA_WEIGHTS): dynamic "
                                          "(LCIA), fixed (constant ema_weight), none (no EMA)."))
    ema_scale: float = field(default=2.0, metadata=_help("s in w = s (1 + |g|) / (|theta - theta*| |g - g_prev|)."))
    ema_fallback: float = field(default=0.01, metadata=_help("w when the dynamic weight is outside (0, 1)."))
    ema_weight: float = field(default=0.01, metadata=_help("The constant w of `ema: fixed` (I-LoRA: 1 - lambda)."))
    ema_apply_to: Literal["new", "old"] = field(
        default="new", metadata=_help("new: theta* <- (1 - w) theta* + w theta (reference code); old: the paper's "
                                      "reading, theta* <- w theta* + (1 - w) theta."))
    ema_output: Literal["replace", "slow"] = field(
        default="replace", metadata=_help("replace: at each stage's end the adapter becomes its EMA, which restarts "
                                          "with the next stage (LCIA); slow: the EMA is a slow learner kept across "
                                          "stages and is each stage's output, training continues from the live "
                                          "weights (I-LoRA)."))
    replay_size: int = field(default=0, metadata=_help("Reservoir replay buffer size in rows (0: no replay)."))
    replay_batch_size: int | None = field(
        default=None, metadata=_help("Replayed rows added to each micro-batch from the second stage on "
                                     "(default: per_device_train_batch_size)."))
    consistency_weight: float = field(
        default=0.0, metadata=_help("I-LoRA's gamma: weight of the hidden-state MSE between the live and the EMA "
                                    "weights on replayed rows (needs replay_size and an EMA)."))
    expand_threshold: float | None = field(
        default=0.9, metadata=_help("tau of retrain-or-expand: a task whose instructions match a group's with TF-IDF "
                                    "similarity >= tau retrains it, else a new adapter opens; null: one adapter for "
                                    "the whole sequence (the sequential baselines)."))
    similarity: Literal["mean_pairs", "best_match"] = field(
        default="mean_pairs", metadata=_help("Instruction-set similarity: mean over all pairs (LCIA) or mean best "
                                             "match."))

    def __post_init__(self) -> None:
        super().__post_init__()
        problems = []
        for name, low, high in (("ema_fallback", 0.0, 1.0), ("ema_weight", 0.0, 1.0)):
            if not low < getattr(self, name) <= high:
                problems.append(f"{name} must be in (0, 1], got {getattr(self, name)!r}")
        if self.ema_scale <= 0:
            problems.append(f"ema_scale must be > 0, got {self.ema_scale!r}")
        if self.replay_size < 0 or (self.replay_batch_size is not None and self.replay_batch_size < 1):
            problems.append("replay_size must be >= 0 and replay_batch_size >= 1")
        if self.consistency_weight < 0:
            problems.append(f"consistency_weight must be >= 0, got {self.consistency_weight!r}")
        if self.expand_threshold is not None and not 0 <= self.expand_threshold <= 1:
            problems.append(f"expand_threshold must be in [0, 1] or null, got {self.expand_threshold!r}")
        if problems:
            raise ValueError("ContinualConfig: " + "; ".join(problems))

    def ema_args(self) -> DynamicEMAArgs | FixedEMAArgs | None:
        if self.ema == "none":
            return None
        if self.ema == "dynamic":
            return DynamicEMAArgs(scale=self.ema_scale, fallback=self.ema_fallback)
        return FixedEMAArgs(weight=self.ema_weight)


# --- cross-step state -----------------------------------------------------------------------------------------


def _check_grad(name: str, param: torch.Tensor) -> None:
    grad = param.grad
    if grad is None or grad.shape != param.shape or param.numel() == 0:
        what = "no gradient" if grad is None else f"a gradient of shape {tuple(grad.shape)}"
        raise RuntimeError(
            f"EMA hook: trainable tensor {name} (shape {tuple(param.shape)}) has {what} after the optimizer step. "
            "The dynamic EMA weight needs each step's full gradient of every tensor it follows; under DeepSpeed ZeRO "
            "or FSDP the gradients live in sharded buffers, and a tensor the loss does not reach has none. Train "
            "with DDP (or one process), or use `trainer.ema: fixed`, which needs no gradient.")


class AdapterEMA:
    """The EMA theta* of the trainable tensors (and, for the dynamic weight, each tensor's previous gradient).

    `update(named_params)` is one optimizer step: a tensor seen for the first time is copied (theta* = theta,
    nothing moves); afterwards w = EMA_WEIGHTS[weight](theta, theta*, g, g_prev, args) and
    theta* <- ema_update(theta*, theta, w, apply_to). `swapped(model)` puts theta* into the model for a while,
    `copy_to(model)` replaces the live weights by theta*. Tensors are kept in the parameters' dtype and device.
    """

    def __init__(self, weight: str = "dynamic", args: Any = None, apply_to: Literal["new", "old"] = "new"):
        self.weight, self.fn = weight, EMA_WEIGHTS.get(weight)
        self.args = args if args is not None else EMA_WEIGHTS.args_class(weight)()
        self.apply_to = apply_to
        self.ema: dict[str, torch.Tensor] = {}
        self.prev_grad: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.last_weights: dict[str, float] = {}

    @property
    def needs_grad(self) -> bool:
        return bool(getattr(self.args, "needs_grad", False))

    def reset(self) -> None:
        self.ema.clear()
        self.prev_grad.clear()
        self.steps, self.last_weights = 0, {}

    @torch.no_grad()
    def update(self, named_params: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = list(named_params)
        if not params:
            raise RuntimeError("EMA hook: the model has no trainable tensor to follow")
        if self.needs_grad:
            for name, p in params:
                _check_grad(name, p)
        weights = {}
        for name, p in params:
            theta = p.detach()
            if name not in self.ema:
                self.ema[name] = theta.clone()  # the first step initialises theta* and moves nothing
            else:
                ema = self.ema[name]
                prev = self.prev_grad.get(name)
                w = self.fn(theta, ema, p.grad, prev, self.args)
                ema.copy_(ema_update(ema, theta, w, self.apply_to))
                weights[name] = w
            if self.needs_grad:
                if name in self.prev_grad:
                    self.prev_grad[name].copy_(p.grad)
                else:
                    self.prev_grad[name] = p.grad.detach().clone()
        self.last_weights = weights
        self.steps += 1

    def stats(self) -> dict[str, float]:
        """Mean weight of the last step and the fraction of tensors that took the fallback (dynamic only)."""
        if not self.last_weights:
            return {}
        values = list(self.last_weights.values())
        out = {"ema/weight_mean": sum(values) / len(values)}
        fallback = getattr(self.args, "fallback", None)
        if fallback is not None:
            out["ema/fallback_frac"] = sum(v == fallback for v in values) / len(values)
        return out

    def _pairs(self, model: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
        params = dict(model.named_parameters())
        missing = sorted(set(self.ema) - set(params))
        if missing:
            raise KeyError(f"the EMA follows tensors the model does not have: {missing[:3]} ...")
        return [(params[name], ema) for name, ema in self.ema.items()]

    @torch.no_grad()
    def copy_to(self, model: Any) -> None:
        """Replace the live weights by theta* (the end of a stage)."""
        for param, ema in self._pairs(model):
            param.copy_(ema)

    @contextmanager
    def swapped(self, model: Any) -> Iterator[None]:
        """Inside the block the model holds theta* (for evaluation or saving); its own weights come back after.
        Not for use between a forward and its backward (the weights change in place)."""
        pairs = self._pairs(model)
        with torch.no_grad():
            saved = [param.detach().clone() for param, _ in pairs]
            for param, ema in pairs:
                param.copy_(ema)
        try:
            yield
        finally:
            with torch.no_grad():
                for (param, _), value in zip(pairs, saved, strict=True):
                    param.copy_(value)

    def functional(self) -> dict[str, torch.Tensor]:
        """theta* by parameter name, for `torch.func.functional_call` (a forward with the EMA weights that leaves
        the model, and any autograd graph through it, untouched)."""
        return dict(self.ema)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.ema.values(), *self.prev_grad.values()))

    def state_dict(self) -> dict[str, Any]:
        return {"weight": self.weight, "apply_to": self.apply_to, "steps": self.steps, "ema": dict(self.ema),
                "prev_grad": dict(self.prev_grad), "last_weights": dict(self.last_weights)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["weight"] != self.weight or state["apply_to"] != self.apply_to:
            raise ValueError(f"checkpoint EMA is {state['weight']}/{state['apply_to']}, this run uses "
                             f"{self.weight}/{self.apply_to}")
        self.steps, self.last_weights = int(state["steps"]), dict(state["last_weights"])
        self.ema = {k: v.clone() for k, v in state["ema"].items()}
        self.prev_grad = {k: v.clone() for k, v in state["prev_grad"].items()}

    def to(self, device: torch.device | str) -> AdapterEMA:
        self.ema = {k: v.to(device) for k, v in self.ema.items()}
        self.prev_grad = {k: v.to(device) for k, v in self.prev_grad.items()}
        return self


class ReplayBuffer:
    """A reservoir of training rows (Vitter's algorithm R, as the I-LoRA and ER reference code keep theirs): after
    n rows seen, each is in the buffer with probability capacity / n. Rows are token lists
    (`{"input_ids", "labels"}`), the random state is part of the state, so a resumed run replays the same rows."""

    def __init__(self, capacity: int, seed: int = 0):
        if capacity < 1:
            raise ValueError(f"replay capacity must be >= 1, got {capacity}")
        self.capacity, self.seen = capacity, 0
        self.items: list[dict[str, list[int]]] = []
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.items)

    def add(self, row: dict[str, list[int]]) -> None:
        if self.seen < self.capacity:
            self.items.append(row)
        else:
            j = self.rng.randint(0, self.seen)  # uniform on 0..seen, as np.random.randint(0, seen + 1)
            if j < self.capacity:
                self.items[j] = row
        self.seen += 1

    def sample(self, k: int) -> list[dict[str, list[int]]]:
        return self.rng.sample(self.items, min(k, len(self.items))) if self.items else []

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self.rng.getstate()
        return {"capacity": self.capacity, "seen": self.seen, "items": self.items,
                "rng": [version, list(internal), gauss]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.capacity, self.seen, self.items = int(state["capacity"]), int(state["seen"]), list(state["items"])
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))


class EvalHistory:
    """Evaluations made during training (the stability gap): one record per evaluation, checkpointed."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def state_dict(self) -> dict[str, Any]:
        return {"records": self.records}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.records = list(state["records"])


class LiveWeights:
    """Named tensors of a model as a state (I-LoRA's fast weights, which a stage does not output but the next
    stage trains on): `state_dict` reads them from the model, `load_state_dict` writes them back by name."""

    def __init__(self, model: Any, names: list[str] | None = None):
        self.model, self.names = model, names

    def state_dict(self) -> dict[str, Any]:
        params = dict(self.model.named_parameters())
        return {"tensors": {n: params[n].detach().clone() for n in self.names or []}}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        params = dict(self.model.named_parameters())
        for name, value in state["tensors"].items():
            params[name].copy_(value)
        self.names = list(state["tensors"])


# --- callbacks ------------------------------------------------------------------------------------------------


def refuse_unreal_gradients(trainer: Any, why: str) -> None:
    """Raise when the trainer's parallelism hides the parameters' full gradients or weights from a hook."""
    if getattr(trainer, "is_deepspeed_enabled", False):
        raise ValueError(f"{why} needs each tensor's full gradient at the optimizer step, which DeepSpeed ZeRO keeps "
                         "in partitioned buffers (p.grad is None). Launch with DDP (accelerate's multi-GPU config or "
                         "torchrun) instead of a DeepSpeed config.")
    if getattr(trainer, "is_fsdp_enabled", False):
        raise ValueError(f"{why} needs each tensor's full weights and gradient, which FSDP shards across ranks. "
                         "Launch with DDP instead of an FSDP config.")


class EMACallback(TrainerCallback):
    """One EMA update per optimizer step; the end-of-stage replacement (`output="replace"`)."""

    def __init__(self, ema: AdapterEMA, output: Literal["replace", "slow"] = "replace"):
        self.ema, self.output = ema, output

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any):
        self.ema.update((n, p) for n, p in model.named_parameters() if p.requires_grad)

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any):
        if self.output == "replace" and self.ema.ema:
            self.ema.copy_to(model)


class ContinualEvalCallback(TrainerCallback):
    """Continual evaluation within a stage: every `every_n_steps` optimizer steps (not at the last, which the
    end-of-stage evaluation covers) `evaluate(model, step) -> {task: accuracy}` runs on the main process (the other
    ranks wait for it: posttrain.distributed.main_process_only) and its result joins `history` (the stability gap's
    data)."""

    def __init__(self, every_n_steps: int, evaluate: Callable[[Any, int], dict[str, float]], history: EvalHistory,
                 stage: int):
        self.every_n_steps, self.evaluate, self.history, self.stage = every_n_steps, evaluate, history, stage

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any):
        step = state.global_step
        if step % self.every_n_steps or step >= state.max_steps:
            return control
        from posttrain.distributed import main_process_only

        def run() -> None:
            accuracy = self.evaluate(model, step)
            self.history.records.append({"stage": self.stage, "step": step, "accuracy": accuracy})

        main_process_only(run, what="continual_eval")  # the other ranks wait on the store, past the PG timeout
        return control


# --- trainers -------------------------------------------------------------------------------------------------


class SFTTrainer(MethodStateMixin, trl.SFTTrainer):
    """TRL's SFTTrainer with checkpointed method state (`self.method_states`), whose fused LM head scores only the
    labelled (completion) positions on the CPU as well, as TRL does on CUDA (`compact_lm_head_on_cpu`: the same
    loss to float rounding; TRL scores every prompt and padding position there)."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.method_states: dict[str, Stateful] = {}
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with compact_lm_head_on_cpu(self.accelerator.device):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)


class ContinualTrainer(SFTTrainer):
    """One stage of a continual sequence; see the module docstring.

    ema: the run's `AdapterEMA` (None when `args.ema == "none"`); replay: its `ReplayBuffer` (None without
    replay); replay_active: whether replayed rows join the batches (from the second stage on; rows are added to
    the buffer in every stage); states: more checkpointed states by name (codebook, evaluation history).
    """

    def __init__(self, *args: Any, ema: AdapterEMA | None = None, replay: ReplayBuffer | None = None,
                 replay_active: bool = False, states: dict[str, Stateful] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        cfg: ContinualConfig = self.args
        if cfg.ema != "none" and ema is None:
            raise ValueError(f"trainer.ema is {cfg.ema!r}: pass the run's AdapterEMA")
        if cfg.consistency_weight > 0 and (ema is None or replay is None):
            raise ValueError("trainer.consistency_weight needs an EMA (the slow weights) and a replay buffer")
        if replay is not None and self.padding_free:
            raise ValueError("replay mixes rows into padded batches; it does not work with padding_free or packing")
        self.ema, self.replay, self.replay_active = ema, replay, replay_active
        if ema is not None:
            refuse_unreal_gradients(self, f"trainer.ema: {cfg.ema}")
            self.method_states["ema"] = ema
            self.add_callback(EMACallback(ema, cfg.ema_output))
        if replay is not None:
            self.method_states["replay"] = replay
        self.method_states.update(states or {})

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.ema is not None and "loss" in logs:
            logs.update(self.ema.stats())  # the last step's mean EMA weight and fallback fraction
        super().log(logs, start_time)

    # --- replay: rows of the buffer join each micro-batch ---------------------------------------------------
    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device):
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.replay is None or not batches:
            return batches, num_items
        k = self.args.replay_batch_size or self.args.per_device_train_batch_size
        mixed = []
        for batch in batches:
            rows = _rows(batch)
            replayed = self.replay.sample(k) if self.replay_active else []
            for row in rows:  # sampled first: a step replays only rows of earlier steps
                self.replay.add(row)
            if replayed:
                batch = self.data_collator(rows + replayed)
                batch["replay_mask"] = torch.arange(len(rows) + len(replayed)) >= len(rows)
            mixed.append(batch)
        if any("replay_mask" in b for b in mixed):
            num_items = self._get_num_items_in_batch(mixed, device)  # the loss normaliser counts replayed tokens
        return mixed, num_items

    # --- I-LoRA: consistency of the fast and slow weights on replayed rows ----------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        replay_mask = inputs.pop("replay_mask", None)
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        weight = self.args.consistency_weight
        if not weight or replay_mask is None or not replay_mask.any() or not self.ema.ema or not model.training:
            return out
        loss, outputs = out if return_outputs else (out, None)
        replay_mask = replay_mask.to(inputs["input_ids"].device)
        ids, mask = inputs["input_ids"][replay_mask], inputs["attention_mask"][replay_mask]
        # the backbone alone (no LM head, no logits); the slow weights enter through functional_call, so the fast
        # forward's autograd graph keeps the live weights it saw
        backbone, names = self._backbone()
        slow_weights = {names[k]: v for k, v in self.ema.functional().items() if k in names}
        kwargs = {"input_ids": ids, "attention_mask": mask, "output_hidden_states": True, "use_cache": False}
        fast = backbone(**kwargs).hidden_states
        with torch.no_grad():
            slow = torch.func.functional_call(backbone, slow_weights, (), kwargs, strict=False).hidden_states
        term = hidden_consistency(fast, slow, mask)
        self._metrics["train"]["consistency"].append(self.accelerator.gather_for_metrics(term.detach()).mean().item())
        # a per-micro-batch mean: over an accumulation window the terms add up to their mean, like TRL's aux loss
        steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
        loss = loss + weight * term / steps
        return (loss, outputs) if return_outputs else loss


    def _backbone(self) -> tuple[torch.nn.Module, dict[str, str]]:
        """The transformer backbone under the (PEFT) model, and the trainer model's parameter names -> its own."""
        module = self.accelerator.unwrap_model(self.model)
        base = module.get_base_model() if hasattr(module, "get_base_model") else module
        backbone = base.base_model
        inner = {id(p): n for n, p in backbone.named_parameters()}
        return backbone, {n: inner[id(p)] for n, p in module.named_parameters() if id(p) in inner}


def _rows(batch: dict[str, torch.Tensor]) -> list[dict[str, list[int]]]:
    """The unpadded rows of a collated (right-padded) language-modeling batch: input ids and labels."""
    out = []
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
        keep = mask.bool()
        out.append({"input_ids": ids[keep].tolist(), "labels": labels[keep].tolist()})
    return out
