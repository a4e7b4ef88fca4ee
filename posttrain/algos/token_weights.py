"""Per-token reweighting / reshaping of advantages (registry kind ``token_weight``).

Shared signature: ``fn(advantages: Tensor[B] | Tensor[B, T], ctx: TokenContext, args) -> Tensor[B, T]``,
the per-token advantages to feed TRL's clipped loss (TRL accepts ``[B, T]`` advantages). Outputs are
detached and 0 on padding. A non-negative per-token weight w can be applied this way because the
clipped loss is positively homogeneous in A: w * l(A) = l(w * A) for w >= 0.

Also here: DCPO's controller arithmetic and the tempered sampled-token log-probabilities it needs, and the
covariance token selection of Clip-Cov / KL-Cov. Each registration declares what the trainer must provide
(``needs``), how its arguments are read from a trainer config, its diagnostics and its state
(``posttrain.algos.registry``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from posttrain.algos.context import TokenContext
from posttrain.algos.registry import TOKEN_WEIGHTS
from posttrain.algos.state import DCPOState

__all__ = [
    "TokenContext",
    "STEERArgs",
    "DCPOArgs",
    "ClipCovArgs",
    "KLCovArgs",
    "broadcast_advantages",
    "weight_diagnostics",
    "steer_omega",
    "steer_weights",
    "steer",
    "sampled_token_logprobs",
    "dcpo_entropy_signal",
    "dcpo_temperature",
    "dcpo_alpha",
    "dcpo_rho",
    "dcpo_advantages",
    "dcpo",
    "clip_cov",
    "no_token_weight",
    "ppo_clipped",
    "covariance_scores",
    "clip_cov_mask",
    "kl_cov_mask",
    "kl_cov_penalty",
]


def broadcast_advantages(advantages: Tensor, mask: Tensor) -> Tensor:
    """Sequence advantages ``[B]`` (or already per-token ``[B, T]``) as ``[B, T]``, 0 on padding, detached."""
    adv = advantages.detach()
    adv = adv.unsqueeze(-1) if adv.dim() == 1 else adv
    return adv.expand_as(mask).to(torch.result_type(adv, 1.0)) * mask.to(adv.dtype)


def weight_diagnostics(advantages: Tensor, out: Tensor, ctx: TokenContext, args: Any = None) -> dict[str, Tensor]:
    """``weight_mean`` and ``weight_min`` of a reweighting: out / A over the valid tokens where A != 0 (1 when
    there is none). Logged by the trainer as ``<component>/weight_mean`` (mean over processes) and
    ``<component>/weight_min`` (min over processes)."""
    base = broadcast_advantages(advantages, ctx.mask)
    has = ctx.mask.bool() & (base != 0)
    w = out[has] / base[has]
    one = torch.ones((), device=out.device, dtype=out.dtype)
    return {"weight_mean": w.mean() if w.numel() else one, "weight_min": w.min() if w.numel() else one}


@TOKEN_WEIGHTS.register("none", noop=True)
def no_token_weight(advantages: Tensor, ctx: TokenContext, args: object = None) -> Tensor:
    """Identity: the base GRPO token loss (advantage broadcast to tokens, padding 0). ``[B]`` -> ``[B, T]``."""
    return broadcast_advantages(advantages, ctx.mask)


# ---------------------------------------------------------------------------------------------- STEER
@dataclass(frozen=True)
class STEERArgs:
    """STEER weights. ``form``: ``"exponential"`` (paper) or ``"linear"``. ``max_scope``:
    ``"micro_batch"`` (reference) or ``"global"`` (max |Omega| over all processes, through
    ``TokenContext.reduce_max``). lambda_min = 0.8 follows the reference scripts (the paper reports 0.7)."""

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


@TOKEN_WEIGHTS.register(
    "steer", args=STEERArgs, needs={"entropy_old"}, diagnostics=weight_diagnostics,
    config={"lambda_min": "steer_lambda_min", "form": "steer_form", "max_scope": "steer_max_scope"},
)
def steer(advantages: Tensor, ctx: TokenContext, args: STEERArgs) -> Tensor:
    """STEER: per-token advantages lambda_{i,t} * A_i (``[B]`` -> ``[B, T]``); equal to the paper's
    token-mean of lambda * l because lambda > 0. Needs ``ratio``, ``logp``, ``entropy_old`` (the sampling
    policy's entropies, H_old of the paper); ``reduce_max`` when ``args.max_scope == "global"``.
    Differs from ``dcpo``: it shrinks, never adds."""
    ratio, logp, entropy_old = ctx.need("steer", "ratio", "logp", "entropy_old")
    omega = steer_omega(advantages.detach(), ratio.detach(), logp.detach(), entropy_old.detach(), ctx.mask)
    global_max = None
    if args.max_scope == "global":
        (reduce_max,) = ctx.need("steer", "reduce_max")
        global_max = reduce_max(omega.abs().amax()).item()
    weights = steer_weights(omega, ctx.mask, args, global_max=global_max)
    return broadcast_advantages(advantages, ctx.mask) * weights


# ----------------------------------------------------------------------------------------------- DCPO
@dataclass(frozen=True)
class DCPOArgs:
    """DCPO controller. h0 = 0.25 is the paper's best (the reference script ships 0.5).
    ``entropy_signal``: what H_prev measures, ``"nll"`` (reference: mean sampled-token NLL during the
    update) or ``"entropy"`` (true full-vocabulary token entropy); see ``dcpo_entropy_signal``. Which
    completions count as correct (y) is the trainer's one notion of correct (``TokenContext.correct``), not a
    threshold of DCPO's own."""

    h0: float = 0.25
    t_high: float = 1.2
    t_low: float = 0.8
    cap: float = 0.1
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


def dcpo_temperatures(args: DCPOArgs) -> tuple[float, ...]:
    """The temperature factors whose sampling-policy log-probs DCPO reads: 1 and both targets (which one a step
    uses is known only at its loss, after the controller has moved)."""
    return (1.0, args.t_high, args.t_low)


def _dcpo_step(ctx: TokenContext, args: DCPOArgs) -> tuple[float, float, float]:
    """(h_prev, p_hat, temperature) of this step; h_prev defaults to 0 (the initial state), p_hat to the local
    mean of y (pass the global one in multi-process runs)."""
    (correct,) = ctx.need("dcpo", "correct")
    h_prev = ctx.h_prev if ctx.h_prev is not None else 0.0
    p_hat = ctx.p_hat if ctx.p_hat is not None else (correct.float().mean().item() if correct.numel() else 0.0)
    return h_prev, p_hat, dcpo_temperature(h_prev, args)


def dcpo_diagnostics(advantages: Tensor, out: Tensor, ctx: TokenContext, args: DCPOArgs) -> dict[str, float]:
    """Logged as ``dcpo/temperature``, ``dcpo/alpha``, ``dcpo/h_prev`` and ``dcpo/p_hat``."""
    h_prev, p_hat, temperature = _dcpo_step(ctx, args)
    return {"temperature": temperature, "alpha": dcpo_alpha(h_prev, p_hat, args), "h_prev": h_prev, "p_hat": p_hat}


def dcpo_state_signal(ctx: TokenContext, args: DCPOArgs) -> tuple[Tensor, Tensor]:
    """H_prev of the next step, as (sum, count) of this micro-batch during the update (``dcpo_entropy_signal``)."""
    (logp,) = ctx.need("dcpo", "logp")
    return dcpo_entropy_signal(logp, ctx.mask, args, ctx.entropy)


@TOKEN_WEIGHTS.register(
    "dcpo", args=DCPOArgs, needs={"tempered_old_logps", "correct"}, temperatures=dcpo_temperatures,
    state=DCPOState, state_signal=dcpo_state_signal, diagnostics=dcpo_diagnostics,
    config={"h0": "dcpo_h0", "t_high": "dcpo_t_high", "t_low": "dcpo_t_low", "cap": "dcpo_cap",
            "entropy_signal": "dcpo_entropy_signal"},
)
def dcpo(advantages: Tensor, ctx: TokenContext, args: DCPOArgs) -> Tensor:
    """DCPO per-token advantages from a ``TokenContext``. Needs ``tempered_old_logps`` (the sampling policy's
    sampled-token log-probs at factors 1 and ``dcpo_temperature(h_prev)``) and ``correct`` (y); rho is
    taken between the two, so it is exactly 1 at T = 1 and never mixes the current policy in."""
    (tempered,) = ctx.need("dcpo", "tempered_old_logps")
    h_prev, p_hat, temperature = _dcpo_step(ctx, args)
    missing = [t for t in (1.0, temperature) if t not in tempered]
    if missing:
        raise ValueError(f"token_weight 'dcpo' needs tempered_old_logps at {missing}; got {sorted(tempered)}")
    alpha = dcpo_alpha(h_prev, p_hat, args)
    rho = dcpo_rho(tempered[temperature].detach(), tempered[1.0].detach(), ctx.mask)
    y = ctx.correct.detach().to(rho.dtype)
    return dcpo_advantages(advantages.detach(), y, rho, alpha, ctx.mask)


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


@TOKEN_WEIGHTS.register(
    "clip_cov", args=ClipCovArgs, diagnostics=weight_diagnostics,
    config={"clip_ratio": "clip_cov_ratio", "cov_lb": "clip_cov_lb", "cov_ub": "clip_cov_ub",
            "epsilon_low": "epsilon",
            "epsilon_high": lambda c: c.epsilon_high if c.epsilon_high is not None else c.epsilon},
)
def clip_cov(advantages: Tensor, ctx: TokenContext, args: ClipCovArgs) -> Tensor:
    """Clip-Cov (Cui et al. 2025, "The Entropy Mechanism of RL for Reasoning LMs") as per-token
    advantages: A * keep, where ``clip_cov_mask`` drops a few high-covariance tokens not already
    clipped by PPO (0 * l = l(0 * A)). Needs ``logp`` and ``ratio``. Random: seed torch's global RNG."""
    logp, ratio = ctx.need("clip_cov", "logp", "ratio")
    adv = broadcast_advantages(advantages, ctx.mask)
    clipped = ppo_clipped(adv, ratio.detach(), args.epsilon_low, args.epsilon_high)
    keep = clip_cov_mask(adv, logp.detach(), ctx.mask, args.clip_ratio, args.cov_lb, args.cov_ub, exclude=clipped)
    return adv * keep
