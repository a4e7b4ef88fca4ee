"""DPO trainers. `method: dpo` is `DPOTrainer` with posttrain's `DPOConfig`: TRL 1.16's DPOTrainer (the baseline),
changed in one respect only: on the CPU its fused LM head scores only the response positions, as TRL does on CUDA
(`posttrain.trainers.fused_head.compact_lm_head_on_cpu`; the same log-probs, less time). `method: dpo_shift` is
`DPOShiftTrainer` / `DPOShiftConfig`, a subclass of it (maths in `posttrain/algos/preference.py`).

Where DPO-Shift plugs into TRL 1.16, without copying a TRL method body:
TRL 1.16 has no `dpo_loss` hook: `DPOTrainer._compute_loss` runs the policy forward (and the reference one),
builds the loss and logs every metric in one method. `DPOShiftTrainer._compute_loss` runs it unchanged
through `super()`, while a forward hook keeps the outputs of the policy (and reference) forwards that TRL
makes inside it. TRL's metrics (`rewards/*`, `logps/*`, ...) are therefore DPO's own, unshifted; the loss TRL
returns is replaced by DPO-Shift's, computed with `dpo_shift_loss` from the same forward's per-token
log-probabilities, summed exactly as TRL sums them, so the gradient flows through the one forward. TRL's own
[B]-sized loss arithmetic is computed and discarded (negligible). On its first call the trainer checks that
the sequence log-probs, rewards and (at f = 1) loss it recomputes equal what TRL logged and returned, and stops
with an error if a future TRL computes them differently (tests/trainers/test_dpo_shift.py checks the same).

f follows `dpo_shift_schedule` over optimizer steps: it is a function of `state.global_step` and
`state.max_steps`, which TRL checkpoints, so a resumed run continues with the same f (no extra state).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import trl
from accelerate.utils import is_peft_model

from posttrain.algos.preference import SHIFT_SCHEDULES, ShiftArgs, dpo_shift_loss, shift_schedule
from posttrain.trainers.fused_head import compact_lm_head_on_cpu

__all__ = ["DPOConfig", "DPOShiftConfig", "DPOShiftTrainer", "DPOTrainer", "config_defaults"]

# TRL 1.16 reads label_smoothing in these loss types only; its "sigmoid" loss ignores it.
_SMOOTHED_LOSSES = {"robust", "exo_pair", "aot", "aot_unpaired"}


def _loss_types(values: Mapping[str, Any]) -> list[str]:
    loss_type = values.get("loss_type", ["sigmoid"])
    return [loss_type] if isinstance(loss_type, str) else list(loss_type)


def config_defaults(config_class: type) -> dict[str, Any]:
    """The default of every init field of a config dataclass (without building one: no device set-up)."""
    out = {}
    for f in dataclasses.fields(config_class):
        if f.init and f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.init and f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


@dataclass
class DPOConfig(trl.DPOConfig):
    """TRL's DPOConfig, refusing a setting TRL 1.16 would silently ignore: label smoothing with its sigmoid loss
    (TRL reads `label_smoothing` only in the robust, EXO and AOT losses)."""

    @classmethod
    def option_problems(cls, values: Mapping[str, Any], prefix: str = "") -> list[str]:
        """Problems of the options `values` (config field -> value, defaults filled in), each naming
        `prefix + field`. Recipe validation calls this with prefix "trainer." before any model loads."""
        if values.get("label_smoothing", 0.0) and not set(_loss_types(values)) & _SMOOTHED_LOSSES:
            return [f"{prefix}label_smoothing: TRL 1.16's sigmoid loss ignores it (only {sorted(_SMOOTHED_LOSSES)} "
                    "read it); for conservative DPO use method dpo_shift with dpo_shift_f: 1.0, or loss_type robust"]
        return []

    def __post_init__(self) -> None:
        super().__post_init__()
        problems = self.option_problems(vars(self))
        if problems:
            raise ValueError(f"{type(self).__name__}: " + "; ".join(problems))


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class DPOShiftConfig(DPOConfig):
    """TRL's DPOConfig plus DPO-Shift's f and its schedule (defaults of the paper: fixed f = 0.95;
    f_min 0.75 and f_max 1.0 for the linear schedules). Every TRL option keeps working except those under which
    the shift is undefined (see `option_problems`)."""

    dpo_shift_schedule: str = field(
        default="fixed",
        metadata=_help("Schedule of f over optimizer steps: fixed (f = dpo_shift_f), linear_increase "
                       "(dpo_shift_f_min -> dpo_shift_f_max) or linear_decrease (dpo_shift_f_max -> dpo_shift_f_min)."))
    dpo_shift_f: float = field(default=0.95, metadata=_help("f of the fixed schedule, in (0, 1]; 1 is DPO."))
    dpo_shift_f_min: float = field(default=0.75, metadata=_help("Lower end of the linear schedules, in (0, 1]."))
    dpo_shift_f_max: float = field(default=1.0, metadata=_help("Upper end of the linear schedules, in (0, 1]."))

    @classmethod
    def option_problems(cls, values: Mapping[str, Any], prefix: str = "") -> list[str]:
        """DPO-Shift is DPO's sigmoid loss with the rejected log-ratio scaled by f: options that change what the
        log-ratios or the loss are (other loss types, f-divergences, LD-DPO, WPO weights) leave it undefined."""
        p = prefix
        problems = []
        loss_types = _loss_types(values)
        if loss_types != ["sigmoid"]:
            problems.append(f"{p}loss_type: DPO-Shift scales the rejected log-ratio inside DPO's sigmoid loss and is "
                            f"defined for loss_type 'sigmoid' only (label_smoothing gives conservative DPO), "
                            f"got {loss_types}")
        if values.get("loss_weights") not in (None, [1.0], [1]):
            problems.append(f"{p}loss_weights: DPO-Shift has one loss; leave loss_weights unset")
        if values.get("f_divergence_type", "reverse_kl") != "reverse_kl":
            problems.append(f"{p}f_divergence_type: DPO-Shift is defined on DPO's log-ratios (reverse_kl), "
                            f"got {values['f_divergence_type']!r}")
        if values.get("ld_alpha") is not None:
            problems.append(f"{p}ld_alpha: LD-DPO's length-weighted log-probs are not supported by dpo_shift")
        if values.get("use_weighting"):
            problems.append(f"{p}use_weighting: WPO weights are not supported by dpo_shift")
        if values.get("use_liger_kernel"):
            problems.append(f"{p}use_liger_kernel: not supported by dpo_shift: Liger's fused DPO loss computes the "
                            "loss outside the one DPO-Shift replaces (and TRL 1.16 deprecates the option)")
        smoothing = values.get("label_smoothing", 0.0)
        if not 0.0 <= smoothing < 0.5:
            problems.append(f"{p}label_smoothing: must be in [0, 0.5), got {smoothing!r}")
        schedule = values.get("dpo_shift_schedule", "fixed")
        if schedule not in SHIFT_SCHEDULES:
            problems.append(f"{p}dpo_shift_schedule: unknown schedule {schedule!r} "
                            f"(known: {', '.join(SHIFT_SCHEDULES.names())})")
        shift = [values.get(f"dpo_shift_{k}", d) for k, d in (("f", 0.95), ("f_min", 0.75), ("f_max", 1.0))]
        problems += [f"{p}dpo_shift_{name}: {message}" for name, message in ShiftArgs.problems(*shift)]
        return problems


class _Outputs:
    """Keeps the outputs of every forward of `module` while active (a forward hook, removed on exit)."""

    def __init__(self) -> None:
        self.outputs: list[Any] = []

    @contextlib.contextmanager
    def on(self, module: torch.nn.Module | None) -> Iterator[_Outputs]:
        self.outputs.clear()
        handle = None if module is None else module.register_forward_hook(lambda m, a, out: self.outputs.append(out))
        try:
            yield self
        finally:
            if handle is not None:
                handle.remove()


def _sequence_logps(output: Any, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) sequence log-probs [B] from a fused-LM-head output, summed as TRL 1.16 sums them
    (`log_probs` is 0 off the completion; the batch is [chosen; rejected])."""
    return output.log_probs[:, -seq_len:].sum(dim=1).chunk(2, dim=0)


class DPOTrainer(trl.DPOTrainer):
    """TRL's DPOTrainer, whose fused LM head scores only the response positions on the CPU as well (TRL scores every
    prompt and padding position there): the two methods that run the model's fused forward, the loss and the
    reference log-probs (precomputed or not), run under `compact_lm_head_on_cpu`. On GPUs nothing changes."""

    def _compute_loss(self, model, inputs, return_outputs):
        with compact_lm_head_on_cpu(self.accelerator.device):
            return super()._compute_loss(model, inputs, return_outputs)

    def compute_ref_log_probs(self, model, inputs):
        with compact_lm_head_on_cpu(self.accelerator.device):
            return super().compute_ref_log_probs(model, inputs)


class DPOShiftTrainer(DPOTrainer):
    """TRL's DPOTrainer whose loss is DPO-Shift's (see the module docstring); logs `dpo_shift/f` every step."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, DPOShiftConfig):
            raise TypeError(f"DPOShiftTrainer needs a DPOShiftConfig, got {type(self.args).__name__}")
        self._policy_outputs, self._ref_outputs = _Outputs(), _Outputs()
        self._checked_against_trl = False

    def current_f(self) -> float:
        """f at the current optimizer step (constant over the micro-batches of a step)."""
        a = self.args
        total = max(self.state.max_steps, 1)  # 0 before train() (e.g. evaluate() first): the schedule's start
        return shift_schedule(a.dpo_shift_schedule, min(self.state.global_step, total), total, a.dpo_shift_f,
                              a.dpo_shift_f_min, a.dpo_shift_f_max)

    def _compute_loss(self, model, inputs, return_outputs):
        with self._policy_outputs.on(self.model) as policy, self._ref_outputs.on(self.ref_model) as ref:
            result = super()._compute_loss(model, inputs, return_outputs)
        trl_loss, extra = (result[0], result[1:]) if return_outputs else (result, ())
        logps = self._logps(policy.outputs, ref.outputs, inputs, return_outputs)
        f = self.current_f()
        losses, chosen_rewards, rejected_rewards = dpo_shift_loss(*logps, self.beta, f, self.label_smoothing)
        loss = losses.mean()
        if self.aux_loss_enabled:  # the MoE load-balancing term TRL adds to its loss
            loss = loss + self.router_aux_loss_coef * policy.outputs[0].aux_loss
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["dpo_shift/f"].append(f)
        if not self._checked_against_trl:
            self._check_against_trl(mode, trl_loss, logps, policy.outputs[0], chosen_rewards, rejected_rewards)
        return (loss, *extra) if return_outputs else loss

    def _logps(self, policy: list[Any], ref: list[Any], inputs: dict[str, Any],
               return_outputs: bool) -> tuple[torch.Tensor, ...]:
        """(policy chosen, policy rejected, reference chosen, reference rejected) sequence log-probs [B] from the
        forwards TRL 1.16's `_compute_loss` makes: the policy; with a PEFT reference, the policy again with the
        adapter disabled; with `return_outputs`, one more for the logits; the reference model (if any) once."""
        peft_ref = not self.precompute_ref_logps and self.ref_model is None and is_peft_model(self.model)
        want_policy, want_ref = 1 + peft_ref + bool(return_outputs), int(self.ref_model is not None
                                                                        and not self.precompute_ref_logps)
        if (len(policy), len(ref)) != (want_policy, want_ref):
            raise RuntimeError(
                f"DPOShiftTrainer: TRL's DPOTrainer._compute_loss made {len(policy)} policy and {len(ref)} reference "
                f"forwards, not the {want_policy} and {want_ref} that TRL 1.16 makes; DPO-Shift cannot find its "
                "log-probs. Use trl==1.16.0 or update posttrain/trainers/dpo.py.")
        seq_len = inputs["completion_mask"].size(1) - 1
        chosen, rejected = _sequence_logps(policy[0], seq_len)
        if self.precompute_ref_logps:
            return chosen, rejected, inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        return chosen, rejected, *_sequence_logps(policy[1] if peft_ref else ref[0], seq_len)

    def _check_against_trl(self, mode: str, trl_loss: torch.Tensor, logps: tuple[torch.Tensor, ...], output: Any,
                           chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> None:
        """Once per run: what this trainer recomputed from TRL's forwards equals what TRL logged and (for
        DPO, f = 1) returned, bit for bit. Any difference means TRL changed how it computes DPO."""
        metrics = self._metrics[mode]
        gather = self.accelerator.gather
        ours = {"logps/chosen": gather(logps[0].detach()).mean().item(),
                "logps/rejected": gather(logps[1].detach()).mean().item(),
                "rewards/chosen": gather(chosen_rewards).mean().item(),
                "rewards/rejected": gather(rejected_rewards).mean().item()}
        dpo = dpo_shift_loss(*logps, self.beta, 1.0)[0].mean()
        if self.aux_loss_enabled:
            dpo = dpo + self.router_aux_loss_coef * output.aux_loss
        ours["loss (f = 1)"], theirs = dpo.item(), {"loss (f = 1)": trl_loss.item()}
        theirs.update({k: metrics[k][-1] for k in ours if k in metrics})
        different = {k: (ours[k], theirs.get(k)) for k in ours if ours[k] != theirs.get(k)}
        if different:
            raise RuntimeError(
                "DPOShiftTrainer: TRL's DPOTrainer no longer computes DPO as TRL 1.16 did (posttrain's value, "
                f"TRL's): {different}. DPO-Shift at f = 1 would not be DPO. Use trl==1.16.0 or update "
                "posttrain/trainers/dpo.py.")
        self._checked_against_trl = True
