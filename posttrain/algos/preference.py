"""Preference losses: DPO-Shift and the schedules of its shift f (registry kind ``shift_schedule``).

DPO-Shift (Yang et al., ICML 2025, "DPO-Shift: Shifting the Distribution of Direct Preference Optimization")
scales the rejected response's log-ratio by f <= 1 inside DPO's sigmoid loss. DPO pushes the chosen and the
rejected log-probabilities apart but often lowers both (likelihood displacement); with f < 1 the rejected
term pulls less, so the chosen response stays likely, at the price of a slightly smaller reward margin.

Shared signature of the schedules: ``fn(step, total_steps, args: ShiftArgs) -> float``, with ``step`` the
optimizer steps done so far (0 at the first step, constant over the micro-batches of one step) and
``total_steps`` the planned number of optimizer steps. ``shift_schedule`` dispatches by name in one line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from posttrain.algos.registry import Registry

__all__ = ["SHIFT_SCHEDULES", "ShiftArgs", "dpo_shift_loss", "shift_schedule", "fixed", "linear_increase",
           "linear_decrease"]

ShiftScheduleFn = Callable[[int, int, "ShiftArgs"], float]
SHIFT_SCHEDULES: Registry[ShiftScheduleFn] = Registry("shift_schedule")


def dpo_shift_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    f: float,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO-Shift's per-pair loss and DPO's (unshifted) implicit rewards.

    Inputs are sequence log-probabilities ``[B]`` (summed over the completion tokens) of the chosen (w) and
    rejected (l) responses under the policy and the reference. With r = log pi(y|x) - log pi_ref(y|x) and
    z = beta (r_w - f r_l) (DPO-Shift, Eq. 4):

        loss = -(1 - eps) log sigmoid(z) - eps log sigmoid(-z) = -log sigmoid(z) + eps z,

    eps being conservative DPO's label smoothing (the form of TRL's sigmoid loss up to TRL 0.x and of the
    paper's code; the right-hand side is the same function, since log sigmoid(z) - log sigmoid(-z) = z).
    f = 1, eps = 0 is DPO's sigmoid loss, the same operations as TRL 1.16's ``loss_type="sigmoid"``, so the
    values and gradients are bit-identical. d loss / d log pi(y_l) = -f d loss / d log pi(y_w).

    Returns ``(losses [B], chosen_rewards [B], rejected_rewards [B])``; the rewards are beta r_w and beta r_l,
    detached and independent of f, exactly as DPO logs them, so that likelihood displacement stays visible.
    """
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    shapes = {tuple(t.shape) for t in logps}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"dpo_shift_loss: expected four [B] tensors of one shape, got shapes {sorted(shapes)}")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    logits = beta * (chosen_logratios - f * rejected_logratios)
    losses = -F.logsigmoid(logits) + label_smoothing * logits
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


# --------------------------------------------------------------------------------------- schedules of f
@dataclass(frozen=True)
class ShiftArgs:
    """``f`` for the fixed schedule; ``f_min`` and ``f_max`` bound the linear ones (defaults of the paper)."""

    f: float = 0.95
    f_min: float = 0.75
    f_max: float = 1.0

    def __post_init__(self) -> None:
        problems = self.problems(self.f, self.f_min, self.f_max)
        if problems:
            raise ValueError("DPO-Shift: " + "; ".join(f"{name}: {message}" for name, message in problems))

    @staticmethod
    def problems(f: float, f_min: float, f_max: float) -> list[tuple[str, str]]:
        """(field, message) for each bad value: each f in (0, 1], f_min <= f_max."""
        out = [(name, f"must be in (0, 1], got {value!r}")
               for name, value in (("f", f), ("f_min", f_min), ("f_max", f_max)) if not 0.0 < value <= 1.0]
        if f_min > f_max:
            out.append(("f_min", f"must be <= f_max ({f_max}), got {f_min!r}"))
        return out


@SHIFT_SCHEDULES.register("fixed", args=ShiftArgs)
def fixed(step: int, total_steps: int, args: ShiftArgs) -> float:
    """f at every step."""
    return args.f


@SHIFT_SCHEDULES.register("linear_increase", args=ShiftArgs)
def linear_increase(step: int, total_steps: int, args: ShiftArgs) -> float:
    """f = f_min + (f_max - f_min) t / T: starts at f_min, reaches f_max - (f_max - f_min) / T at the last step."""
    return args.f_min + (args.f_max - args.f_min) * step / total_steps


@SHIFT_SCHEDULES.register("linear_decrease", args=ShiftArgs)
def linear_decrease(step: int, total_steps: int, args: ShiftArgs) -> float:
    """f = f_max - (f_max - f_min) t / T: starts at f_max (DPO), moves towards f_min."""
    return args.f_max - (args.f_max - args.f_min) * step / total_steps


def shift_schedule(kind: str, step: int, total_steps: int, f: float = 0.95, f_min: float = 0.75,
                   f_max: float = 1.0) -> float:
    """DPO-Shift's f at optimizer step ``step`` (0-based) of ``total_steps``, for schedule ``kind``:
    ``fixed``, ``linear_increase`` or ``linear_decrease`` (``SHIFT_SCHEDULES``)."""
    if total_steps < 1 or not 0 <= step <= total_steps:
        raise ValueError(f"DPO-Shift schedule: need 0 <= step <= total_steps and total_steps >= 1, "
                         f"got step={step}, total_steps={total_steps}")
    return float(SHIFT_SCHEDULES.get(kind)(step, total_steps, ShiftArgs(f=f, f_min=f_min, f_max=f_max)))

