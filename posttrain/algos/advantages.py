"""Sequence-level advantages from rewards grouped by prompt (registry kind ``advantage``).

Shared signature: ``fn(rewards: Tensor[B], group_size: int, args) -> Tensor[B]``. ``B = P * G``:
``P`` prompts, ``G = group_size`` completions each, a group's rows contiguous (``rewards.view(P, G)``),
exactly as TRL's ``_generate_and_score_completions`` lays out the gathered rewards. A NaN reward marks
an unscorable completion (TRL's convention): it is left out of the group statistics and gets 0.
Every function here returns finite values for any input, including degenerate batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from posttrain.algos.registry import ADVANTAGES

__all__ = [
    "GRPOArgs",
    "BNPOArgs",
    "QAEArgs",
    "BetaFit",
    "nanstd",
    "grpo",
    "bnpo_beta_fit",
    "bnpo_inverse_pdf",
    "bnpo_advantages",
    "bnpo",
    "bnpo_range_problem",
    "decomposed_advantages",
    "qae",
]


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"B={rewards.numel()} is not a multiple of group_size={group_size}")
    return rewards.view(-1, group_size)


# ----------------------------------------------------------------------------------------------- GRPO
@dataclass(frozen=True)
class GRPOArgs:
    """``scale_rewards``: TRL 1.16's choice, ``"group"`` (True), ``"batch"`` or ``"none"`` (False)."""

    scale_rewards: str | bool = "group"
    eps: float = 1e-4

    def __post_init__(self) -> None:
        mode = {True: "group", False: "none"}.get(self.scale_rewards, self.scale_rewards)  # type: ignore[call-overload]
        if mode not in ("group", "batch", "none"):
            raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {self.scale_rewards!r}")
        object.__setattr__(self, "scale_rewards", mode)


def nanstd(x: Tensor, dim: int | None = None) -> Tensor:
    """Unbiased (Bessel-corrected) std ignoring NaNs; NaN where fewer than 2 values.

    The same operations in the same order as ``trl.trainer.utils.nanstd`` (TRL 1.16), so that ``grpo``
    reproduces TRL's advantages bit for bit; ``torch.std`` differs in the last ulp.
    """
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    variance = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = torch.sum(~torch.isnan(x), dim=dim, keepdim=True)
    correction = count / (count - 1)
    correction = torch.where(count > 1, correction, torch.full_like(correction, float("nan")))
    std = torch.sqrt(variance * correction)
    return std.squeeze() if dim is None else std.squeeze(dim)


@ADVANTAGES.register("grpo", args=GRPOArgs, config={"scale_rewards": "scale_rewards"})
def grpo(rewards: Tensor, group_size: int, args: GRPOArgs) -> Tensor:
    """GRPO advantage (DeepSeekMath, Shao et al. 2024): A_i = (R_i - mean_G R) / (std + eps).

    Shapes: ``rewards [B]`` -> ``[B]``. Reproduces TRL 1.16 ``_generate_and_score_completions``
    (``multi_objective_aggregation="sum_then_normalize"``) exactly: NaN-aware group mean; std unbiased
    (``nanstd``) over the group (``"group"``), over the whole batch (``"batch"``, PPO-Lite) or not used
    (``"none"``, Dr. GRPO); eps = 1e-4 added to the std, not under the root; a group of one (or a
    batch of one) has std 0; NaN advantages (unscorable rows, all-NaN groups) become 0.
    Differs from ``qae`` (quantile baseline, no std) and ``bnpo`` (Beta-density normaliser).
    """
    grouped = _grouped(rewards, group_size)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(group_size, dim=0)
    if args.scale_rewards == "batch":
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    elif group_size > 1:
        std = nanstd(grouped, dim=1).repeat_interleave(group_size, dim=0)
    else:
        std = torch.zeros_like(rewards)
    advantages = rewards - mean
    if args.scale_rewards != "none":
        advantages = advantages / (std + args.eps)
    return torch.nan_to_num(advantages, nan=0.0)


# ----------------------------------------------------------------------------------------------- BNPO
@dataclass(frozen=True)
class BNPOArgs:
    """Rewards are mapped to [0, 1] by ``(R - reward_min) / (reward_max - reward_min)`` (then clipped);
    ``max_inverse_pdf`` clamps 1/BetaPDF (the paper's 1e6). ``fixed_alpha`` / ``fixed_beta``: use these
    instead of the batch fit (e.g. 3/2 and 3/2: GRPO with population std, up to the constant pi/8).
    ``out_of_range``: what a batch with rewards outside [reward_min, reward_max] does (they are clipped):
    ``"warn"`` (once per run, with the observed range) or ``"raise"``."""

    reward_min: float = 0.0
    reward_max: float = 1.0
    max_inverse_pdf: float = 1e6
    fixed_alpha: float | None = None
    fixed_beta: float | None = None
    out_of_range: str = "warn"

    def __post_init__(self) -> None:
        if self.out_of_range not in ("warn", "raise"):
            raise ValueError(f"out_of_range must be 'warn' or 'raise', got {self.out_of_range!r}")
        for name in ("fixed_alpha", "fixed_beta"):
            value = getattr(self, name)
            if value is not None and not value >= 1.0:
                raise ValueError(f"{name} must be >= 1 (BNPO's alpha, beta = max(1 + a/3, 1)), got {value}")
        if not self.reward_max > self.reward_min:
            raise ValueError(f"reward_max ({self.reward_max}) must exceed reward_min ({self.reward_min})")
        if not self.max_inverse_pdf > 0:
            raise ValueError("max_inverse_pdf must be positive")


class BetaFit(NamedTuple):
    """Method-of-moments Beta(a, b) of the group means and BNPO's (alpha, beta) = max(1 + (a, b)/3, 1)."""

    a: float
    b: float
    alpha: float
    beta: float


def bnpo_beta_fit(group_means: Tensor) -> BetaFit:
    """BNPO's Beta fit (Xiao et al. 2025, "BNPO: Beta Normalization Policy Optimization").

    ``group_means [P]``: one mean reward in [0, 1] per prompt, ALREADY gathered over all processes
    (the trainer gathers; this function does no communication). Method of moments:
    m = mean, v = unbiased variance, c = m(1 - m)/v - 1, a = m c, b = (1 - m) c;
    alpha = max(1 + a/3, 1), beta = max(1 + b/3, 1).
    Degenerate (fewer than 2 finite means, v = 0 or non-finite): a = b = 0, alpha = beta = 1.
    Reference code differs: it divides by the std instead of the variance and takes moments over the
    per-completion (repeated) means; we follow the paper (variance over one value per prompt).
    """
    p = group_means.detach().double().flatten()
    p = p[torch.isfinite(p)]
    if p.numel() < 2:
        return BetaFit(0.0, 0.0, 1.0, 1.0)
    m, v = p.mean().item(), p.var(unbiased=True).item()
    if not (math.isfinite(v) and v > 0.0):
        return BetaFit(0.0, 0.0, 1.0, 1.0)
    c = m * (1.0 - m) / v - 1.0
    a, b = m * c, (1.0 - m) * c
    return BetaFit(a, b, max(1.0 + a / 3.0, 1.0), max(1.0 + b / 3.0, 1.0))


def bnpo_inverse_pdf(p: Tensor, alpha: float, beta: float, max_value: float = 1e6) -> Tensor:
    """1 / BetaPDF(p; alpha, beta) clamped to [0, max_value], finite at p = 0 and p = 1.

    ``p`` any shape in [0, 1]. Uses xlogy so that alpha = 1 (or beta = 1) at p = 0 (or 1) gives the
    exact density instead of 0 * log 0 = NaN; a zero density gives ``max_value``.
    """
    log_norm = math.lgamma(alpha) + math.lgamma(beta) - math.lgamma(alpha + beta)
    pd = p.double()
    log_pdf = torch.xlogy(alpha - 1.0, pd) + torch.xlogy(beta - 1.0, 1.0 - pd) - log_norm
    return torch.exp(-log_pdf).clamp(0.0, max_value).to(p.dtype)


def bnpo_advantages(rewards: Tensor, group_size: int, alpha: float, beta: float, args: BNPOArgs) -> Tensor:
    """BNPO advantage for given (alpha, beta): A = (R - p_q) / BetaPDF(p_q; alpha, beta).

    ``rewards [B]`` raw rewards -> ``[B]``. R is mapped to [0, 1] with ``args`` and clipped; p_q is the
    NaN-aware mean of the mapped rewards of prompt q's group. Use this when the fit was gathered across
    processes separately (``bnpo_beta_fit``); ``bnpo`` fits on the rewards it is given.
    alpha = beta = 1 is REINFORCE with a group-mean baseline (unlike ``grpo``, no std at all).
    """
    grouped = _grouped(rewards, group_size)
    scaled = ((grouped - args.reward_min) / (args.reward_max - args.reward_min)).clamp(0.0, 1.0)
    p = torch.nanmean(scaled, dim=1, keepdim=True)
    weight = bnpo_inverse_pdf(torch.nan_to_num(p, nan=0.5), alpha, beta, args.max_inverse_pdf)
    return torch.nan_to_num((scaled - p) * weight, nan=0.0).view(-1)


def bnpo_parameters(rewards: Tensor, group_size: int, args: BNPOArgs) -> tuple[float, float]:
    """(alpha, beta) that ``bnpo`` uses on this batch: the moment fit to the group means of the rewards mapped
    to [0, 1], unless fixed in ``args``."""
    grouped = _grouped(rewards, group_size)
    scaled = ((grouped - args.reward_min) / (args.reward_max - args.reward_min)).clamp(0.0, 1.0)
    fit = bnpo_beta_fit(torch.nanmean(scaled, dim=1))
    return (fit.alpha if args.fixed_alpha is None else args.fixed_alpha,
            fit.beta if args.fixed_beta is None else args.fixed_beta)


def bnpo_diagnostics(rewards: Tensor, group_size: int, args: BNPOArgs) -> dict[str, float]:
    """Logged by the trainers as ``bnpo/alpha`` and ``bnpo/beta``."""
    alpha, beta = bnpo_parameters(rewards, group_size, args)
    return {"alpha": float(alpha), "beta": float(beta)}


def bnpo_range_problem(rewards: Tensor, group_size: int, args: BNPOArgs) -> str | None:
    """A message when finite rewards fall outside [reward_min, reward_max] (BNPO clips them after mapping, which
    changes the advantages: e.g. accuracy + format rewards in [0, 2], or rewards of +-1); raises instead when
    ``args.out_of_range == "raise"``. None when every reward is in range."""
    finite = rewards[torch.isfinite(rewards)]
    if finite.numel() == 0:
        return None
    low, high = finite.min().item(), finite.max().item()
    if low >= args.reward_min and high <= args.reward_max:
        return None
    message = (f"BNPO maps rewards to [0, 1] from [reward_min, reward_max] = [{args.reward_min:g}, "
               f"{args.reward_max:g}] and clips the rest, but this batch has rewards in [{low:g}, {high:g}]; "
               "set bnpo_reward_min / bnpo_reward_max to the rewards' range")
    if args.out_of_range == "raise":
        raise ValueError(message)
    return message


@ADVANTAGES.register(
    "bnpo", args=BNPOArgs, diagnostics=bnpo_diagnostics, check=bnpo_range_problem,
    config={"reward_min": "bnpo_reward_min", "reward_max": "bnpo_reward_max", "fixed_alpha": "bnpo_fixed_alpha",
            "fixed_beta": "bnpo_fixed_beta", "out_of_range": "bnpo_out_of_range"},
)
def bnpo(rewards: Tensor, group_size: int, args: BNPOArgs) -> Tensor:
    """BNPO (Xiao et al. 2025): Beta-normalised advantage, the Beta re-fitted on this batch.

    ``rewards [B]`` -> ``[B]``: maps rewards to [0, 1], fits Beta by moments to the P group means
    (``bnpo_beta_fit``) and returns ``bnpo_advantages``. Pass the globally gathered rewards (TRL gathers
    them before computing advantages) so the fit is batch-wide. Zero-sum within each group; uniform
    groups get 0. Not TRL's ``loss_type="bnpo"``, which is a loss normaliser.
    """
    alpha, beta = bnpo_parameters(rewards, group_size, args)
    return bnpo_advantages(rewards, group_size, alpha, beta, args)


def decomposed_advantages(fn: Any, rewards_per_func: Tensor, group_size: int, args: Any,
                          weights: Tensor | None = None) -> Tensor:
    """Advantage decomposition for any registered advantage ``fn`` (BNPO's Sec. "advantage decomposition"): one
    advantage per reward function, then their weighted mean per completion, A_i = sum_j w_j m_ij A_ij /
    sum_j w_j m_ij, where m_ij = 0 when function j returned nothing (NaN) for completion i, so a function that
    did not score a row does not dilute its mean. ``rewards_per_func [B, K]``, ``weights [K]`` (default all 1:
    the paper's plain mean) -> ``[B]``; rows no function scored get 0."""
    if rewards_per_func.dim() != 2:
        raise ValueError(f"rewards_per_func must be [B, K], got {tuple(rewards_per_func.shape)}")
    k = rewards_per_func.shape[1]
    w = torch.ones(k, dtype=rewards_per_func.dtype, device=rewards_per_func.device) if weights is None else weights
    if w.numel() != k:
        raise ValueError(f"{w.numel()} weights for {k} reward functions")
    cols = torch.stack([fn(rewards_per_func[:, j].contiguous(), group_size, args) for j in range(k)], dim=1)
    present = (~torch.isnan(rewards_per_func)).to(cols.dtype) * w.to(cols.dtype).unsqueeze(0)
    total = present.sum(dim=1)
    out = (cols * present).sum(dim=1) / torch.where(total != 0, total, torch.ones_like(total))
    return torch.where(total != 0, out, torch.zeros_like(out))


# ------------------------------------------------------------------------------------------------ QAE
@dataclass(frozen=True)
class QAEArgs:
    """``quantile`` K (the reference scripts use 0.4). ``interpolation``: ``"inverted_cdf"`` (default,
    the empirical quantile of the paper's two-regime analysis) or ``"linear"`` (``torch.quantile``, as
    the reference code). ``scale_by_std``: divide by the group's unbiased std + ``eps`` as the
    reference's GRPO/DAPO path does (the paper's formula and our default: no scaling)."""

    quantile: float = 0.4
    interpolation: str = "inverted_cdf"
    scale_by_std: bool = False
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if not 0.0 <= self.quantile <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {self.quantile}")
        if self.interpolation not in ("inverted_cdf", "linear"):
            raise ValueError(f"interpolation must be 'inverted_cdf' or 'linear', got {self.interpolation!r}")


def _group_quantile(grouped: Tensor, q: float, interpolation: str) -> Tensor:
    if interpolation == "linear":
        return torch.nanquantile(grouped.double(), q, dim=1, keepdim=True).to(grouped.dtype)
    # Smallest order statistic whose empirical CDF reaches q; sort puts NaNs last.
    n = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
    idx = torch.ceil(q * n.double() - 1e-9).long() - 1  # 1e-9: 0.7 * 10 is 7.000000000000001
    idx = idx.clamp(min=0).minimum((n - 1).clamp(min=0))
    return torch.sort(grouped, dim=1).values.gather(1, idx)


@ADVANTAGES.register("qae", args=QAEArgs, config={"quantile": "qae_quantile"})
def qae(rewards: Tensor, group_size: int, args: QAEArgs) -> Tensor:
    """QAE (Wu et al. 2025, "Quantile Advantage Estimation for Entropy-Safe Reasoning"):
    A_i = R_i - Q_K(R_group) (optionally / (std_G + eps)).

    ``rewards [B]`` -> ``[B]``. Differs from ``grpo`` only in the baseline: the group K-quantile instead
    of the mean. With binary rewards and the inverted-CDF quantile the baseline is 0 when the success
    rate p <= 1 - K (only successes are pushed up) and 1 otherwise (only failures are pushed down).
    Uniform groups get 0; NaN rewards are left out of the quantile and get 0.
    """
    grouped = _grouped(rewards, group_size)
    advantages = grouped - _group_quantile(grouped, args.quantile, args.interpolation)
    if args.scale_by_std:
        std = nanstd(grouped, dim=1).unsqueeze(1) if group_size > 1 else torch.zeros_like(grouped[:, :1])
        advantages = advantages / (torch.nan_to_num(std, nan=0.0) + args.eps)
    return torch.nan_to_num(advantages, nan=0.0).view(-1)
