"""Loss terms built from entropies (registry kind ``entropy_term``), cross-step entropy state, and the
covariance token selection of Clip-Cov / KL-Cov.

Shared signature: ``fn(entropy: Tensor[B, T], ctx: EntropyContext, args) -> (term, diagnostics)``;
``entropy`` is the full-vocabulary token entropy WITH gradient, ``term`` a scalar to add to the policy
loss, ``diagnostics`` detached scalar tensors (gatherable across processes before logging).
State objects (``EPOState``, ``DCPOState``) hold plain Python floats/ints, JSON-able, and follow the
``update`` / ``state_dict`` / ``load_state_dict`` protocol so the trainer checkpoints them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from posttrain.algos.registry import ENTROPY_TERMS

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
    "EPOState",
    "DCPOState",
    "ClipCovArgs",
    "KLCovArgs",
    "ppo_clipped",
    "covariance_scores",
    "clip_cov_mask",
    "kl_cov_mask",
    "kl_cov_penalty",
]


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


@ENTROPY_TERMS.register("none")
def no_entropy_term(entropy: Tensor, ctx: EntropyContext, args: object = None) -> tuple[Tensor, dict[str, Tensor]]:
    """No term: a zero that stays attached to the graph (so every parameter still gets a gradient)."""
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


@ENTROPY_TERMS.register("epo", args=EPOArgs)
def epo(entropy: Tensor, ctx: EntropyContext, args: EPOArgs) -> tuple[Tensor, dict[str, Tensor]]:
    """EPO through the registry: ``epo_loss_term`` with turns, Hbar, k and total steps from ``ctx``."""
    return epo_loss_term(entropy, ctx.mask, ctx.turn_ids, ctx.h_bar, ctx.step, ctx.total_steps, args)


class EPOState:
    """EPO's cross-step state: running sum and count of per-step mean entropies, and the step k.

    Per step: read ``h_bar`` (None before any update) and ``step``, compute the loss, then
    ``update(mean entropy of this step, gathered over processes)``. Non-finite entropies advance the
    step but stay out of the history.
    """

    def __init__(self) -> None:
        self.entropy_sum: float = 0.0
        self.entropy_count: int = 0
        self.step: int = 0

    def update(self, step_mean_entropy: float) -> None:
        value = float(step_mean_entropy)
        if math.isfinite(value):
            self.entropy_sum += value
            self.entropy_count += 1
        self.step += 1

    @property
    def h_bar(self) -> float | None:
        return self.entropy_sum / self.entropy_count if self.entropy_count else None

    def state_dict(self) -> dict[str, Any]:
        return {"entropy_sum": self.entropy_sum, "entropy_count": self.entropy_count, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.entropy_sum = float(state["entropy_sum"])
        self.entropy_count = int(state["entropy_count"])
        self.step = int(state["step"])


class DCPOState:
    """DCPO's cross-step state: H_prev, the previous step's entropy signal (starts at 0, so the first
    target temperature is T_high), and the number of updates. Non-finite signals keep the old value."""

    def __init__(self, h_prev: float = 0.0) -> None:
        self.h_prev: float = float(h_prev)
        self.step: int = 0

    def update(self, entropy_signal: float) -> None:
        value = float(entropy_signal)
        if math.isfinite(value):
            self.h_prev = value
        self.step += 1

    def state_dict(self) -> dict[str, Any]:
        return {"h_prev": self.h_prev, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.h_prev = float(state["h_prev"])
        self.step = int(state["step"])


# ------------------------------------------------------------------------------------ Clip-Cov/KL-Cov
@dataclass(frozen=True)
class ClipCovArgs:
    """Clip-Cov (reference defaults): drop ``max(int(clip_ratio * n_valid), 1)`` random tokens whose
    covariance lies in (cov_lb, cov_ub). ``epsilon_low/high``: the PPO clip range of the trainer, used
    to leave already-clipped tokens alone (set them from the trainer's own epsilons)."""

    clip_ratio: float = 2e-4
    cov_lb: float = 1.0
    cov_ub: float = 5.0
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2


@dataclass(frozen=True)
class KLCovArgs:
    """KL-Cov (reference defaults): KL-penalise the top ``max(int(kl_cov_ratio * n_valid), 1)``
    covariance tokens with ``coef * |log p - log p_old|``."""

    kl_cov_ratio: float = 2e-4
    coef: float = 1.0


def ppo_clipped(advantages: Tensor, ratio: Tensor, epsilon_low: float, epsilon_high: float) -> Tensor:
    """Tokens where PPO's clipped branch is active: -A clip(r, 1-eps_low, 1+eps_high) > -A r. ``[B, T]`` bool."""
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    return (-adv * ratio.clamp(1.0 - epsilon_low, 1.0 + epsilon_high)) > (-adv * ratio)


@torch.no_grad()
def covariance_scores(advantages: Tensor, logp: Tensor, mask: Tensor) -> Tensor:
    """Token covariance score (Cui et al. 2025, "The Entropy Mechanism of RL for Reasoning LMs"):
    (A - mean A)(log p - mean log p), means over the valid tokens of the batch; ``[B, T]``, padding 0.
    Its batch mean is Cov(log p, A), whose sign drives entropy down (positive) or up (negative)."""
    valid = mask.bool()
    adv = (advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages).expand_as(logp).to(logp.dtype)
    n = valid.sum().clamp(min=1)
    zero = torch.zeros_like(logp)
    mean_a = torch.where(valid, adv, zero).sum() / n
    mean_l = torch.where(valid, logp, zero).sum() / n
    return torch.where(valid, (adv - mean_a) * (logp - mean_l), zero)


@torch.no_grad()
def clip_cov_mask(
    advantages: Tensor,
    logp: Tensor,
    mask: Tensor,
    clip_ratio: float = 2e-4,
    cov_lb: float = 1.0,
    cov_ub: float = 5.0,
    exclude: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Clip-Cov keep-mask (Cui et al. 2025; PRIME-RL/Entropy-Mechanism-of-RL
    ``compute_policy_loss_clip_cov``): 1 = keep the token's loss, 0 = drop it (padding 0).

    ``advantages [B]`` or ``[B, T]``, ``logp [B, T]`` (current policy), ``mask [B, T]``; ``exclude [B, T]``:
    tokens never dropped (the reference passes those PPO already clips). Eligible: valid tokens with
    cov_lb < ``covariance_scores`` < cov_ub; ``max(int(clip_ratio * n_valid), 1)`` of them are drawn
    uniformly at random (not the top ones, as in the reference). Differs from ``kl_cov_mask``:
    random in a band, and the loss is removed, not penalised.
    """
    valid = mask.bool()
    cov = covariance_scores(advantages, logp, mask)
    eligible = valid & (cov > cov_lb) & (cov < cov_ub)
    if exclude is not None:
        eligible &= ~exclude.bool()
    keep = valid.to(logp.dtype).clone()
    candidates = eligible.flatten().nonzero().squeeze(1)
    if candidates.numel():
        clip_num = max(int(clip_ratio * int(valid.sum().item())), 1)
        device = generator.device if generator is not None else candidates.device
        order = torch.randperm(candidates.numel(), generator=generator, device=device).to(candidates.device)
        keep.view(-1)[candidates[order[:clip_num]]] = 0.0
    return keep


@torch.no_grad()
def kl_cov_mask(advantages: Tensor, logp: Tensor, mask: Tensor, kl_cov_ratio: float = 2e-4) -> Tensor:
    """KL-Cov selection (Cui et al. 2025; reference ``compute_policy_loss_kl_cov``): the
    ``max(int(kl_cov_ratio * n_valid), 1)`` valid tokens with the LARGEST covariance score, as a bool
    ``[B, T]`` (none when no token is valid). Differs from ``clip_cov_mask``: deterministic top-k, no band."""
    valid = mask.bool()
    selected = torch.zeros_like(valid)
    n_valid = int(valid.sum().item())
    if n_valid == 0:
        return selected
    cov = covariance_scores(advantages, logp, mask).masked_fill(~valid, -math.inf)
    k = max(int(kl_cov_ratio * n_valid), 1)
    selected.view(-1)[cov.flatten().topk(k).indices] = True
    return selected


def kl_cov_penalty(logp: Tensor, old_logp: Tensor, selected: Tensor, coef: float = 1.0) -> Tensor:
    """KL-Cov per-token penalty coef * |log p - log p_old| on the selected tokens, 0 elsewhere; ``[B, T]``,
    differentiable in ``logp``, to add to the per-token policy loss before aggregation (the reference
    also drops PPO clipping for KL-Cov)."""
    return coef * (logp - old_logp).abs() * selected.to(logp.dtype)
