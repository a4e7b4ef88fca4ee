"""Reward-model ensembles: aggregates of K member scores (registry kind ``ensemble_aggregate``), best-of-n from
one sampling pass, and the overoptimisation scaling-law fits.

Papers: Coste et al., "Reward Model Ensembles Help Mitigate Overoptimization" (ICLR 2024) for the aggregates;
Gao et al., "Scaling Laws for Reward Model Overoptimization" (ICML 2023) for KL(BoN), the one-pass best-of-n
estimator (after Nakano et al. 2021, WebGPT) and the functional forms of gold reward against d = sqrt(KL).

Shared signature of the aggregates: ``fn(scores: Tensor[K, N], args) -> Tensor[N]``, K members (rows) scoring
N samples (columns). Member order never matters. With K = 1 every aggregate is the member's score.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from posttrain.algos.registry import AGGREGATES

__all__ = [
    "UWOArgs",
    "GaoFit",
    "GAO_FORMS",
    "aggregate",
    "mean",
    "wco",
    "uwo",
    "member_statistics",
    "best_of_n_kl",
    "best_of_n_weights",
    "best_of_n_expected",
    "gao_fit",
]


def _members(scores: Tensor) -> Tensor:
    if scores.dim() != 2 or scores.shape[0] < 1:
        raise ValueError(f"scores must be [K, N] with K >= 1 members, got shape {tuple(scores.shape)}")
    return scores


# ----------------------------------------------------------------------------------------------- aggregates
@dataclass(frozen=True)
class UWOArgs:
    """``uwo_lambda``: weight of the members' variance (Coste et al.: 0.5 for best-of-n, 0.1 for RL)."""

    uwo_lambda: float = 0.5

    def __post_init__(self) -> None:
        if not self.uwo_lambda >= 0:
            raise ValueError(f"uwo_lambda must be >= 0, got {self.uwo_lambda!r}")


@AGGREGATES.register("mean")
def mean(scores: Tensor, args: None = None) -> Tensor:
    """Mean objective (Coste et al. eq. 2): R(x) = (1/K) sum_k R_k(x). ``[K, N] -> [N]``."""
    return _members(scores).mean(dim=0)


@AGGREGATES.register("wco")
def wco(scores: Tensor, args: None = None) -> Tensor:
    """Worst-case optimisation (Coste et al. eq. 3): R(x) = min_k R_k(x). ``[K, N] -> [N]``; <= mean."""
    return _members(scores).amin(dim=0)


@AGGREGATES.register("uwo", args=UWOArgs)
def uwo(scores: Tensor, args: UWOArgs) -> Tensor:
    """Uncertainty-weighted optimisation (Coste et al. eq. 4): R(x) = mean_k R_k(x) - lambda Var_k R_k(x), the
    population variance (ddof 0, as in the paper's (1/K) sum_k (R_k - mean)^2). ``[K, N] -> [N]``; <= mean,
    and lambda = 0 is the mean objective."""
    s = _members(scores)
    return s.mean(dim=0) - args.uwo_lambda * s.var(dim=0, correction=0)


def aggregate(scores: Tensor, how: str, uwo_lambda: float = 0.5) -> Tensor:
    """The aggregate ``how`` (``mean``, ``wco``, ``uwo`` or any registered name) of ``scores [K, N]`` -> ``[N]``.

    ``uwo_lambda`` is the argument of the aggregates that take one (``uwo``); the others ignore it."""
    args_class = AGGREGATES.args_class(how)
    return AGGREGATES.get(how)(scores, None if args_class is None else args_class(uwo_lambda=uwo_lambda))


def member_statistics(scores: Tensor) -> dict[str, float]:
    """Batch means of the per-sample member mean, min, max and population std of ``scores [K, N]``: what a
    trainer logs as ``rm_ensemble/*``. A std that rises while the policy trains says the policy is moving to
    where the members disagree, i.e. off the data they agree on: the overoptimisation alarm."""
    s = _members(scores).float()
    return {"mean": s.mean(0).mean().item(), "min": s.amin(0).mean().item(), "max": s.amax(0).mean().item(),
            "std": s.std(dim=0, correction=0).mean().item()}


# ---------------------------------------------------------------------------------------------- best-of-n
def best_of_n_kl(n: int) -> float:
    """KL(pi_BoN || pi) = log n - (n - 1) / n (Stiennon et al. 2020; Gao et al. 2023, sec. 2.2): the analytic KL
    of best-of-n from the sampling policy; 0 at n = 1."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    return math.log(n) - (n - 1) / n


def best_of_n_weights(num_samples: int, n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """``[N]``: w_i = C(i - 1, n - 1) / C(N, n) for i = 1..N, the chance that the i-th smallest of N scores is the
    largest of a uniformly drawn n-subset (0 for i < n). Computed in log space with lgamma, so N can be large;
    the weights sum to 1, n = 1 gives 1/N each, n = N puts all the weight on the top sample."""
    if not 1 <= n <= num_samples:
        raise ValueError(f"need 1 <= n <= N, got n={n}, N={num_samples}")
    i = torch.arange(1, num_samples + 1, dtype=torch.float64)
    valid = i >= n
    iv = i[valid]
    log_c_total = math.lgamma(num_samples + 1) - math.lgamma(n + 1) - math.lgamma(num_samples - n + 1)
    log_w = torch.lgamma(iv) - math.lgamma(n) - torch.lgamma(iv - n + 1) - log_c_total
    weights = torch.zeros(num_samples, dtype=torch.float64)
    weights[valid] = torch.exp(log_w)
    return weights.to(dtype)


def best_of_n_expected(proxy: Tensor, gold: Tensor, n: int) -> Tensor:
    """Expected gold score of best-of-n picked by the proxy, per prompt, from one pass of N >= n samples.

    ``proxy [M, N]``, ``gold [M, N]`` -> ``[M]``: samples sorted by proxy ascending, E = sum_i w_i gold_(i) with
    ``best_of_n_weights(N, n)`` (the unbiased estimator of Nakano et al. 2021 / Gao et al. 2023 over all
    C(N, n) subsets, not one random subset). Ties in the proxy are broken by sample index (a stable sort: the
    later sample ranks higher), the same way every time. ``best_of_n_expected(proxy, proxy, n)`` is the
    expected proxy score of the pick, which never decreases in n."""
    if proxy.dim() != 2 or proxy.shape != gold.shape:
        raise ValueError(f"proxy and gold must both be [M, N], got {tuple(proxy.shape)} and {tuple(gold.shape)}")
    order = torch.sort(proxy, dim=1, stable=True).indices
    sorted_gold = gold.gather(1, order).to(torch.float64)
    weights = best_of_n_weights(proxy.shape[1], n).to(sorted_gold.device)
    out = (sorted_gold * weights).sum(dim=1)
    return out.to(gold.dtype) if gold.is_floating_point() else out


# ---------------------------------------------------------------------------------------- scaling-law fits
GAO_FORMS: dict[str, Callable[[Tensor], tuple[Tensor, Tensor]]] = {
    # gold(d) = a * f(d) - b * g(d); returns (f, g)
    "bon": lambda d: (d, d * d),  # best-of-n: d (a - b d)
    "rl": lambda d: (d, torch.xlogy(d, d)),  # RL: d (a - b log d), 0 at d = 0
}


@dataclass(frozen=True)
class GaoFit:
    """A fitted Gao et al. curve gold(d) = d (a - b d) (``bon``) or d (a - b log d) (``rl``), d = sqrt(KL); ``r2``
    is the share of the variance of the fitted points it explains."""

    form: str
    a: float
    b: float
    r2: float

    def __call__(self, d: Tensor) -> Tensor:
        f, g = GAO_FORMS[self.form](d.to(torch.float64))
        return self.a * f - self.b * g

    @property
    def peak(self) -> float | None:
        """d at the fitted maximum (None when the curve has none, b <= 0): a / (2b) for bon, exp(a/b - 1) for rl."""
        if self.b <= 0:
            return None
        return self.a / (2 * self.b) if self.form == "bon" else math.exp(self.a / self.b - 1)


def gao_fit(d: Tensor, gold: Tensor, form: str = "bon") -> GaoFit:
    """Least-squares fit (no intercept) of Gao et al.'s form to ``gold [P]`` at ``d [P]`` = sqrt(KL). Gold must be
    measured relative to the initial policy (gold(0) = 0), as in the paper's plots."""
    if form not in GAO_FORMS:
        raise KeyError(f"unknown Gao form {form!r} (known: {', '.join(GAO_FORMS)})")
    d, y = d.to(torch.float64).reshape(-1), gold.to(torch.float64).reshape(-1)
    if d.numel() != y.numel() or d.numel() < 2:
        raise ValueError(f"need at least 2 matching points, got d {d.numel()} and gold {y.numel()}")
    f, g = GAO_FORMS[form](d)
    design = torch.stack([f, -g], dim=1)
    coef = torch.linalg.lstsq(design, y.unsqueeze(1)).solution.squeeze(1)
    residual = y - design @ coef
    total = ((y - y.mean()) ** 2).sum()
    r2 = 1.0 - (residual**2).sum().item() / total.item() if total > 0 else float("nan")
    return GaoFit(form=form, a=coef[0].item(), b=coef[1].item(), r2=r2)
