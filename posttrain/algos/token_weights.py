"""Per-token reweighting / reshaping of advantages (registry kind ``token_weight``).

Shared signature: ``fn(advantages: Tensor[B] | Tensor[B, T], ctx: TokenContext, args) -> Tensor[B, T]``,
the per-token advantages to feed TRL's clipped loss (TRL accepts ``[B, T]`` advantages). Outputs are
detached and 0 on padding. A non-negative per-token weight w can be applied this way because the
clipped loss is positively homogeneous in A: w * l(A) = l(w * A) for w >= 0.

Also here: DCPO's controller arithmetic and the tempered sampled-token log-probabilities it needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from posttrain.algos.entropy_terms import ClipCovArgs, clip_cov_mask, ppo_clipped
from posttrain.algos.registry import TOKEN_WEIGHTS

__all__ = [
    "TokenContext",
    "STEERArgs",
    "DCPOArgs",
    "broadcast_advantages",
    "steer_omega",
    "steer_weights",
    "steer",
    "sampled_token_logprobs",
    "dcpo_entropy_signal",
    "dcpo_temperature",
    "dcpo_correct",
    "dcpo_alpha",
    "dcpo_rho",
    "dcpo_advantages",
    "dcpo",
    "clip_cov",
    "no_token_weight",
]


@dataclass
class TokenContext:
    """Per-token inputs a ``token_weight`` function may read; a function raises if one it needs is None.

    Shapes: ``[B, T]`` unless noted. ``mask``: 1 on completion tokens, 0 on padding. ``logp``: log p of
    the sampled token under the current policy (at the sampling temperature, as TRL computes it);
    ``ratio``: p / p_old; ``old_logp`` / ``old_logp_tempered``: old-policy log-prob of the sampled token
    at temperature 1 / at DCPO's temperature T (``sampled_token_logprobs``); ``entropy_old``: full-vocab
    entropy of the old policy; ``rewards [B]``; ``p_hat``: fraction correct over the GLOBAL batch;
    ``h_prev``: DCPO's previous-step entropy signal; ``omega_max``: STEER's max |Omega| taken globally.
    """

    mask: Tensor
    logp: Tensor | None = None
    ratio: Tensor | None = None
    old_logp: Tensor | None = None
    old_logp_tempered: Tensor | None = None
    entropy_old: Tensor | None = None
    rewards: Tensor | None = None
    p_hat: float | None = None
    h_prev: float | None = None
    omega_max: float | None = None

    def need(self, method: str, *names: str) -> list[Any]:
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ValueError(f"token_weight {method!r} needs TokenContext fields: {', '.join(missing)}")
        return [getattr(self, n) for n in names]


def broadcast_advantages(advantages: Tensor, mask: Tensor) -> Tensor:
    """Sequence advantages ``[B]`` (or already per-token ``[B, T]``) as ``[B, T]``, 0 on padding, detached."""
    adv = advantages.detach()
    adv = adv.unsqueeze(-1) if adv.dim() == 1 else adv
    return adv.expand_as(mask).to(torch.result_type(adv, 1.0)) * mask.to(adv.dtype)


@TOKEN_WEIGHTS.register("none")
def no_token_weight(advantages: Tensor, ctx: TokenContext, args: object = None) -> Tensor:
    """Identity: the base GRPO token loss (advantage broadcast to tokens, padding 0). ``[B]`` -> ``[B, T]``."""
    return broadcast_advantages(advantages, ctx.mask)


# ---------------------------------------------------------------------------------------------- STEER
@dataclass(frozen=True)
class STEERArgs:
    """STEER weights. ``form``: ``"exponential"`` (paper) or ``"linear"``. ``max_scope``:
    ``"micro_batch"`` (reference) or ``"global"`` (the trainer gathers max |Omega| into
    ``TokenContext.omega_max``). lambda_min = 0.8 follows the reference scripts (the paper reports 0.7)."""

    lambda_min: float = 0.8
    form: str = "exponential"
    lambda_max: float = 1.0
    min_scale: float = 0.02
    max_scope: str = "micro_batch"

    def __post_init__(self) -> None:
        if not 0.0 < self.lambda_min <= self.lambda_max <= 1.0:
            raise ValueError(f"need 0 < lambda_min <= lambda_max <= 1, got {self.lambda_min}, {self.lambda_max}")
        if self.form not in ("exponential", "linear"):
            raise ValueError(f"form must be 'exponential' or 'linear', got {self.form!r}")
        if self.max_scope not in ("micro_batch", "global"):
            raise ValueError(f"max_scope must be 'micro_batch' or 'global', got {self.max_scope!r}")
        if not self.min_scale > 0.0:
            raise ValueError("min_scale must be positive")


@torch.no_grad()
def steer_omega(advantages: Tensor, ratio: Tensor, logp: Tensor, entropy_old: Tensor, mask: Tensor) -> Tensor:
    """STEER's per-token entropy-change estimate ("Rethinking Entropy Interventions in RLVR: An
    Entropy Change Perspective"): Omega = A * r * (1 - p) * (log p + H_old).

    ``advantages [B]`` or ``[B, T]``; ``ratio``, ``logp`` (current policy, sampled token), ``entropy_old``,
    ``mask``: ``[B, T]`` -> ``[B, T]``, no gradient. p = exp(logp) clamped to [1e-8, 1 - 1e-8];
    non-finite values and padding -> 0. The token's first-order entropy change has sign -sign(Omega)
    (exact for a 2-token softmax). Differs from Clip-Cov's centred covariance score: per token, signed,
    and it weights rather than drops.
    """
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    p = logp.exp().clamp(1e-8, 1.0 - 1e-8)
    omega = adv * ratio * (1.0 - p) * (p.log() + entropy_old)
    return torch.where(torch.isfinite(omega) & mask.bool(), omega, torch.zeros_like(omega))


@torch.no_grad()
def steer_weights(omega: Tensor, mask: Tensor, args: STEERArgs, global_max: float | None = None) -> Tensor:
    """STEER token weights lambda from Omega (``[B, T]`` -> ``[B, T]``, detached, padding 0).

    Exponential (paper): M = max |Omega| over valid tokens (or ``global_max``),
    k = -ln(lambda_min) / max(M, min_scale), lambda = clip(exp(-k |Omega|), lambda_min, 1); the
    token(s) with |Omega| = M >= min_scale get exactly lambda_min.
    Linear: lambda = clip(lambda_max - (|Omega| - m)(lambda_max - lambda_min)/(M - m), lambda_min,
    lambda_max), m = min |Omega|; all equal -> (lambda_min + lambda_max)/2. Weights never increase with
    |Omega|; lambda_min = 1 gives all ones (the base loss).
    """
    valid = mask.bool()
    mag = omega.abs().masked_fill(~valid, 0.0)
    big = mag.amax() if global_max is None else torch.as_tensor(global_max, dtype=mag.dtype, device=mag.device)
    lmin, lmax = args.lambda_min, args.lambda_max
    if args.form == "exponential":
        scale = big.clamp(min=args.min_scale)
        w = torch.exp(mag * (math.log(lmin) / scale)).clamp(lmin, 1.0)
        w = torch.where(mag >= scale, torch.full_like(w, lmin), w)  # exact lambda_min at the max
    else:
        small = omega.abs().masked_fill(~valid, math.inf).amin()
        small = torch.where(torch.isfinite(small), small, torch.zeros_like(small))
        span = big - small
        frac = (mag - small) / torch.where(span > 0, span, torch.ones_like(span))
        w = (lmax - frac * (lmax - lmin)).clamp(lmin, lmax)
        w = torch.where(span > 0, w, torch.full_like(w, (lmin + lmax) / 2.0))
    return w.masked_fill(~valid, 0.0)


@TOKEN_WEIGHTS.register("steer", args=STEERArgs)
def steer(advantages: Tensor, ctx: TokenContext, args: STEERArgs) -> Tensor:
    """STEER: per-token advantages lambda_{i,t} * A_i (``[B]`` -> ``[B, T]``); equal to the paper's
    token-mean of lambda * l because lambda > 0. Needs ``ratio``, ``logp``, ``entropy_old``;
    ``omega_max`` when ``args.max_scope == "global"``. Differs from ``dcpo``: it shrinks, never adds."""
    ratio, logp, entropy_old = ctx.need("steer", "ratio", "logp", "entropy_old")
    if args.max_scope == "global":
        ctx.need("steer", "omega_max")
    omega = steer_omega(advantages.detach(), ratio.detach(), logp.detach(), entropy_old.detach(), ctx.mask)
    weights = steer_weights(omega, ctx.mask, args, global_max=ctx.omega_max if args.max_scope == "global" else None)
    return broadcast_advantages(advantages, ctx.mask) * weights


# ----------------------------------------------------------------------------------------------- DCPO
@dataclass(frozen=True)
class DCPOArgs:
    """DCPO controller. h0 = 0.25 is the paper's best (the reference script ships 0.5).
    ``entropy_signal``: what H_prev measures, ``"nll"`` (reference: mean sampled-token NLL during the
    update) or ``"entropy"`` (true full-vocabulary token entropy); see ``dcpo_entropy_signal``."""

    h0: float = 0.25
    t_high: float = 1.2
    t_low: float = 0.8
    cap: float = 0.1
    threshold: float = 0.05
    entropy_signal: str = "nll"

    def __post_init__(self) -> None:
        if not (self.t_high > 0 and self.t_low > 0):
            raise ValueError("temperatures must be positive")
        if self.cap < 0:
            raise ValueError("cap must be non-negative")
        if self.entropy_signal not in ("nll", "entropy"):
            raise ValueError(f"entropy_signal must be 'nll' or 'entropy', got {self.entropy_signal!r}")


def sampled_token_logprobs(
    logits: Tensor, token_ids: Tensor, temperature: float = 1.0, chunk_rows: int = 1024
) -> Tensor:
    """log softmax(logits / T)[sampled token]: ``logits [B, T, V]``, ``token_ids [B, T]`` -> ``[B, T]``.

    Works on ``chunk_rows`` positions at a time (in float32 for half/bf16 inputs) so that no full
    ``[B, T, V]`` log-softmax is held; differentiable. T = 1 divides by exactly 1.0, so the T = 1 and
    plain log-probs agree bit for bit (DCPO's rho = 1 at T = 1). Like TRL's ``selective_log_softmax``
    plus a temperature.
    """
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    vocab = logits.shape[-1]
    flat_logits, flat_ids = logits.reshape(-1, vocab), token_ids.reshape(-1, 1)
    compute = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
    out = []
    for start in range(0, flat_logits.shape[0], max(1, chunk_rows)):
        z = flat_logits[start : start + chunk_rows].to(compute) / temperature
        chosen = z.gather(-1, flat_ids[start : start + chunk_rows]).squeeze(-1)
        out.append(chosen - torch.logsumexp(z, dim=-1))
    if not out:
        return logits.new_zeros(token_ids.shape, dtype=compute)
    return torch.cat(out).view(token_ids.shape)


@torch.no_grad()
def dcpo_entropy_signal(
    logp: Tensor, mask: Tensor, args: DCPOArgs, entropy: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """DCPO's entropy signal of one micro-batch as (sum, token count); H_prev = total sum / total count
    after summing over micro-batches and processes (then ``DCPOState.update``).

    ``logp [B, T]`` sampled-token log-probs during the update; ``entropy [B, T]`` needed for
    ``args.entropy_signal == "entropy"``. "nll" sums -log p (the reference), "entropy" sums H.
    """
    if args.entropy_signal == "entropy" and entropy is None:
        raise ValueError("entropy_signal='entropy' needs the token entropies")
    values = -logp if args.entropy_signal == "nll" else entropy
    valid = mask.bool()
    total = torch.where(valid, values, torch.zeros_like(values)).sum()
    return total, valid.sum().to(total.dtype)


def dcpo_temperature(h_prev: float, args: DCPOArgs) -> float:
    """DCPO ("Distribution-Centric Policy Optimization Dominates Exploration-Exploitation Trade-off")
    target temperature: T_high if H_prev <= H0 (entropy too low: flatten) else T_low (sharpen)."""
    return args.t_high if h_prev <= args.h0 else args.t_low


def dcpo_correct(rewards: Tensor, args: DCPOArgs) -> Tensor:
    """DCPO correctness y_i = 1[R_i > threshold] as float, ``[B]`` -> ``[B]`` (NaN reward -> 0)."""
    return (torch.nan_to_num(rewards.detach(), nan=-math.inf) > args.threshold).to(torch.result_type(rewards, 1.0))


def dcpo_alpha(h_prev: float, p_hat: float, args: DCPOArgs) -> float:
    """DCPO mixing weight: alpha~ = min(|H0 - H_prev|, cap) / p_hat, alpha = alpha~ / (1 + alpha~).

    ``p_hat``: fraction of correct completions over the GLOBAL batch (gathered by the trainer).
    p_hat <= 0 (no correct sample) -> 0; H_prev = H0 -> 0 (plain GRPO); always in [0, 1).
    """
    if not (p_hat > 0.0 and math.isfinite(p_hat) and math.isfinite(h_prev)):
        return 0.0
    tilde = min(abs(args.h0 - h_prev), args.cap) / p_hat
    return tilde / (1.0 + tilde)


@torch.no_grad()
def dcpo_rho(logp_tempered: Tensor, logp: Tensor, mask: Tensor | None = None) -> Tensor:
    """DCPO ratio rho = pi_old^T(o) / pi_old(o) = exp(logp_T - logp_1), ``[B, T]``, no gradient.

    Both log-probs from the same old-policy logits (``sampled_token_logprobs`` at T and at 1).
    Non-finite -> 1 (no reshaping); padding -> 0. For T > 1 the argmax token has rho <= 1.
    """
    rho = torch.exp(logp_tempered - logp)
    rho = torch.where(torch.isfinite(rho), rho, torch.ones_like(rho))
    return rho if mask is None else rho * mask.to(rho.dtype)


@torch.no_grad()
def dcpo_advantages(
    advantages: Tensor, correct: Tensor, rho: Tensor, alpha: float, mask: Tensor | None = None
) -> Tensor:
    """DCPO per-token advantage A'_{i,t} = (1 - alpha) * A_i + alpha * y_i * rho_{i,t}.

    ``advantages [B]``, ``correct [B]`` (y), ``rho [B, T]`` -> ``[B, T]`` (padding 0 when ``mask`` given).
    Differs from ``steer``: it adds a REINFORCE term on correct samples that pulls pi towards pi^T
    instead of shrinking existing terms; alpha = 0 is GRPO.
    """
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    out = (1.0 - alpha) * adv + alpha * correct.unsqueeze(-1) * rho
    return out if mask is None else out * mask.to(out.dtype)


@TOKEN_WEIGHTS.register("dcpo", args=DCPOArgs)
def dcpo(advantages: Tensor, ctx: TokenContext, args: DCPOArgs) -> Tensor:
    """DCPO per-token advantages from a ``TokenContext``. Needs ``old_logp``, ``old_logp_tempered``
    (at ``dcpo_temperature(h_prev)``), ``rewards``; ``h_prev`` defaults to 0 (the initial state) and
    ``p_hat`` to the local mean of y (pass the global one in multi-process runs)."""
    old_logp, old_logp_t, rewards = ctx.need("dcpo", "old_logp", "old_logp_tempered", "rewards")
    y = dcpo_correct(rewards, args)
    p_hat = ctx.p_hat if ctx.p_hat is not None else (y.mean().item() if y.numel() else 0.0)
    alpha = dcpo_alpha(ctx.h_prev if ctx.h_prev is not None else 0.0, p_hat, args)
    rho = dcpo_rho(old_logp_t.detach(), old_logp.detach(), ctx.mask)
    return dcpo_advantages(advantages.detach(), y, rho, alpha, ctx.mask)


# ------------------------------------------------------------------------------------------- Clip-Cov
@TOKEN_WEIGHTS.register("clip_cov", args=ClipCovArgs)
def clip_cov(advantages: Tensor, ctx: TokenContext, args: ClipCovArgs) -> Tensor:
    """Clip-Cov (Cui et al. 2025, "The Entropy Mechanism of RL for Reasoning LMs") as per-token
    advantages: A * keep, where ``clip_cov_mask`` drops a few high-covariance tokens not already
    clipped by PPO (0 * l = l(0 * A)). Needs ``logp`` and ``ratio``. Random: seed torch's global RNG."""
    logp, ratio = ctx.need("clip_cov", "logp", "ratio")
    adv = broadcast_advantages(advantages, ctx.mask)
    clipped = ppo_clipped(adv, ratio.detach(), args.epsilon_low, args.epsilon_high)
    keep = clip_cov_mask(adv, logp.detach(), ctx.mask, args.clip_ratio, args.cov_lb, args.cov_ub, exclude=clipped)
    return adv * keep
