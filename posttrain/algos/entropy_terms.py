"""Loss terms built from entropies (registry kind ``entropy_term``) and the turn bookkeeping of multi-turn
rollouts.

Shared signature: ``fn(entropy: Tensor[B, T], ctx: EntropyContext, args) -> (term, diagnostics)``;
``entropy`` is the full-vocabulary token entropy WITH gradient, ``term`` a scalar to add to the policy
loss, ``diagnostics`` detached scalar tensors (gatherable across processes before logging; keys with a
``/`` vary between processes and are not logged as they are). EPO's cross-step state is
``posttrain.algos.state.EPOState``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from posttrain.algos.context import EntropyContext
from posttrain.algos.registry import ENTROPY_TERMS
from posttrain.algos.state import EPOState

__all__ = [
    "EntropyContext",
    "EPOArgs",
    "epo_beta",
    "epo_band_penalty",
    "epo_loss_term",
    "epo",
    "no_entropy_term",
    "turn_ids_from_env_mask",
    "per_turn_sums",
]


@ENTROPY_TERMS.register("none", noop=True)
def no_entropy_term(entropy: Tensor, ctx: EntropyContext, args: object = None) -> tuple[Tensor, dict[str, Tensor]]:
    """No term (a zero attached to the graph). Registered as a no-op: trainers skip it, so no entropy gradient
    is computed for it."""
    return (entropy * 0.0).sum(), {}


# ------------------------------------------------------------------------------------------------ EPO
@dataclass(frozen=True)
class EPOArgs:
    """EPO. ``lam`` lambda, corridor [kappa_l Hbar, kappa_r Hbar], ``alpha`` smoothing weight, ``gamma``
    decay of beta_k. ``penalty_level``: P applied to each turn's token-mean entropy (``"turn"``, our
    reading of the paper, whose timesteps are turns) or to each token's entropy (``"token"``)."""

    lam: float = 0.001
    kappa_l: float = 0.0
    kappa_r: float = 2.0
    alpha: float = 0.05
    gamma: float = 3.0
    penalty_level: str = "turn"

    def __post_init__(self) -> None:
        if self.penalty_level not in ("turn", "token"):
            raise ValueError(f"penalty_level must be 'turn' or 'token', got {self.penalty_level!r}")
        if self.kappa_l > self.kappa_r:
            raise ValueError("kappa_l must not exceed kappa_r")


def epo_beta(k: int, total_steps: int, gamma: float) -> float:
    """EPO ("EPO: Entropy-regularized Policy Optimization for LLM Agents RL") phase weight
    beta_k = 1 + exp(-gamma * k / k_mid), k_mid = floor(total_steps / 2) (at least 1, so a one-step run
    is defined). beta_0 = 2, strictly decreasing in k for gamma > 0, tending to 1."""
    if k < 0:
        raise ValueError(f"step must be non-negative, got {k}")
    k_mid = max(total_steps // 2, 1)
    return 1.0 + math.exp(-gamma * k / k_mid)


def epo_band_penalty(entropy: Tensor, h_bar: float | None, args: EPOArgs) -> Tensor:
    """EPO's entropy corridor P(H) = relu(kappa_l * Hbar - H) + relu(H - kappa_r * Hbar), elementwise.

    Any shape, differentiable in H, zero gradient strictly inside [kappa_l Hbar, kappa_r Hbar]; zero
    when ``h_bar`` is None (no earlier step). The paper's form; the released code uses a constant
    tensor here (no gradient), which trains as a plain entropy bonus.
    """
    if h_bar is None:
        return torch.zeros_like(entropy)
    return torch.relu(args.kappa_l * h_bar - entropy) + torch.relu(entropy - args.kappa_r * h_bar)


def _turn_means(x: Tensor, mask: Tensor, turn_ids: Tensor | None) -> tuple[Tensor, Tensor]:
    """Token-mean of ``x [B, T]`` within each (trajectory, turn): ``means [B, J]``, ``present [B, J]``."""
    valid = mask.bool()
    ids = torch.zeros_like(valid, dtype=torch.long) if turn_ids is None else turn_ids.long().masked_fill(~valid, 0)
    if bool((ids < 0).any()):
        raise ValueError("turn_ids must be non-negative")
    n_turns = int(ids.max().item()) + 1 if ids.numel() else 1
    values = torch.where(valid, x, torch.zeros_like(x))
    sums = values.new_zeros(x.shape[0], n_turns).scatter_add(1, ids, values)
    counts = values.new_zeros(x.shape[0], n_turns).scatter_add(1, ids, valid.to(values.dtype))
    return sums / counts.clamp(min=1.0), counts > 0


def _trajectory_mean(means: Tensor, present: Tensor) -> Tensor:
    """Mean over trajectories (with >= 1 valid token) of the mean over their turns; 0 when none."""
    weights = present.to(means.dtype)
    per_traj = (means * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    has = present.any(1).to(means.dtype)
    return (per_traj * has).sum() / has.sum().clamp(min=1.0)


def epo_loss_term(
    token_entropy: Tensor,
    mask: Tensor,
    turn_ids: Tensor | None,
    h_bar: float | None,
    k: int,
    total_steps: int,
    args: EPOArgs,
) -> tuple[Tensor, dict[str, Tensor]]:
    """EPO's term added to the policy loss: - lambda * [H_traj - beta_k * L_smooth].

    ``token_entropy [B, T]`` (with gradient), ``mask [B, T]``, ``turn_ids [B, T]`` or None (single turn).
    H_traj = mean over trajectories of the mean over turns of the token-mean entropy; L_smooth = the same
    averaging of alpha * P(H) (``epo_band_penalty``; P of the turn means, or of token entropies with
    ``penalty_level="token"``). lambda = 0 -> 0; alpha = 0 -> the plain entropy bonus -lambda * H_traj.
    Diagnostics: ``entropy_traj`` (feed the gathered mean to ``EPOState.update``), ``smooth_penalty``,
    ``corridor_fraction`` (share of turn means inside the corridor; 1 when ``h_bar`` is None),
    ``beta``, ``h_bar`` and ``turn_entropy/{j}`` (mean over trajectories of turn j) when turns are given.
    """
    means, present = _turn_means(token_entropy, mask, turn_ids)
    h_traj = _trajectory_mean(means, present)
    if args.penalty_level == "turn":
        penalty_means = epo_band_penalty(means, h_bar, args)
    else:
        penalty_means, _ = _turn_means(epo_band_penalty(token_entropy, h_bar, args), mask, turn_ids)
    smooth = args.alpha * _trajectory_mean(penalty_means, present)
    beta = epo_beta(k, total_steps, args.gamma)
    term = -args.lam * (h_traj - beta * smooth)
    with torch.no_grad():  # share of (trajectory, turn) means inside [kappa_l Hbar, kappa_r Hbar]
        inside = present if h_bar is None else present & (epo_band_penalty(means, h_bar, args) == 0)
        corridor = inside.sum().to(means.dtype) / present.sum().clamp(min=1).to(means.dtype)
    diagnostics = {
        "entropy_traj": h_traj.detach(),
        "smooth_penalty": smooth.detach(),
        "corridor_fraction": corridor,
        "beta": torch.tensor(beta, dtype=h_traj.dtype, device=h_traj.device),
    }
    if h_bar is not None:
        diagnostics["h_bar"] = torch.tensor(h_bar, dtype=h_traj.dtype, device=h_traj.device)
    if turn_ids is not None:
        count = present.sum(0)
        per_turn = (means.detach() * present).sum(0) / count.clamp(min=1)
        diagnostics.update({f"turn_entropy/{j}": per_turn[j] for j in range(per_turn.numel()) if count[j] > 0})
    return term, diagnostics


def turn_ids_from_env_mask(env_mask: Tensor) -> Tensor:
    """0-based turn index of every completion token from a multi-turn env mask ``[B, T]`` (1: model token,
    0: environment token, TRL's ``tool_mask``): a new turn starts at each 0 -> 1 transition. ``[B, T]`` long."""
    m = env_mask.long()
    starts = (m[:, 1:] == 1) & (m[:, :-1] == 0)
    return torch.cat([torch.zeros_like(m[:, :1]), starts.long().cumsum(1)], dim=1)


@torch.no_grad()
def per_turn_sums(values: Tensor, mask: Tensor, turn_ids: Tensor, n_turns: int) -> tuple[Tensor, Tensor]:
    """Per-turn sums of the trajectories' turn token-means and how many trajectories have that turn:
    ``(sums [n_turns], counts [n_turns])``, turns >= ``n_turns`` dropped. Sum both over processes, then
    sums / counts is the mean over trajectories of turn j's token-mean (per-turn entropy to log)."""
    means, present = _turn_means(values.detach(), mask, turn_ids)
    sums, counts = values.new_zeros(n_turns), values.new_zeros(n_turns)
    j = min(n_turns, means.shape[1])
    sums[:j] = (means * present)[:, :j].sum(0)
    counts[:j] = present[:, :j].sum(0).to(values.dtype)
    return sums, counts


def epo_state_signal(diagnostics: dict[str, Tensor], ctx: EntropyContext, args: EPOArgs) -> tuple[Tensor, Tensor]:
    """EPO's history takes one value per optimizer step: the mean over the step's micro-batches (and processes) of
    H_traj, as (sum, count) of one micro-batch."""
    h = diagnostics["entropy_traj"]
    return h.float(), torch.ones((), device=h.device)


@ENTROPY_TERMS.register(
    "epo", args=EPOArgs, state=EPOState, state_signal=epo_state_signal,
    config={"lam": "epo_lambda", "kappa_l": "epo_kappa_l", "kappa_r": "epo_kappa_r", "alpha": "epo_alpha",
            "gamma": "epo_gamma", "penalty_level": "epo_penalty_level"},
)
def epo(entropy: Tensor, ctx: EntropyContext, args: EPOArgs) -> tuple[Tensor, dict[str, Tensor]]:
    """EPO through the registry: ``epo_loss_term`` with turns, Hbar, k and total steps from ``ctx``."""
    return epo_loss_term(entropy, ctx.mask, ctx.turn_ids, ctx.h_bar, ctx.step, ctx.total_steps, args)
