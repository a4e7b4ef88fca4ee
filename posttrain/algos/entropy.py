"""Token-entropy statistics, the signal every entropy-control method watches.

Entropy of the policy at position t: H_t = logsumexp(z/T) - sum softmax(z/T) * z/T over the full vocabulary
(ALGORITHMS.md, "Evaluation metrics"). These functions summarise many H_t values; they do not decide anything.
"""

from __future__ import annotations

import math

import torch

TOP_FRACTION = 0.2


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Full-vocabulary entropy per position. logits [..., V] -> [...] (float32 math)."""
    z = logits.float() / temperature
    logp = torch.log_softmax(z, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def masked_flatten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The valid entries of values [B, T] under mask [B, T] (0/1 or bool) as a 1-D tensor."""
    return values[mask.bool()].detach().float()


def entropy_summary(entropies: torch.Tensor, top_fraction: float = TOP_FRACTION) -> dict[str, float]:
    """Mean, p50, p80, p95 and top-20% mean of a tensor of token entropies (any shape, flattened).

    top20_mean is the mean over the ceil(0.2 n) highest-entropy tokens: the "forking" tokens whose entropy
    collapses last and matters most for exploration (Wang et al., "Beyond the 80/20 rule"). NaN entries are
    ignored; an empty input gives NaN for every statistic (TRL's logger skips NaN).

    Exact at any size: one sort, then the percentiles by linear interpolation between order statistics
    (`sorted_quantiles`, the same values as `torch.quantile`, which refuses more than 2^24 elements; an
    evaluation of MATH-500 x 64 samples has tens of millions of tokens).
    """
    x = entropies.detach().flatten()
    x = x[~torch.isnan(x)].double()
    if x.numel() == 0:
        return {"mean": math.nan, "p50": math.nan, "p80": math.nan, "p95": math.nan, "top20_mean": math.nan}
    # ceil(n * fraction) in integers for the default 1/5, so float rounding can never add a token
    k = -(-x.numel() // 5) if top_fraction == TOP_FRACTION else max(1, math.ceil(top_fraction * x.numel()))
    ordered = torch.sort(x).values
    p50, p80, p95 = sorted_quantiles(ordered, (0.5, 0.8, 0.95))
    return {
        "mean": x.mean().item(),
        "p50": p50,
        "p80": p80,
        "p95": p95,
        "top20_mean": ordered[-k:].mean().item(),
    }


def sorted_quantiles(ordered: torch.Tensor, qs: tuple[float, ...]) -> list[float]:
    """Quantiles of an ascending 1-D tensor by linear interpolation between the order statistics at positions
    q (n - 1): `torch.quantile`'s default ("linear"), without its 2^24-element limit."""
    n = ordered.numel()
    out = []
    for q in qs:
        pos = q * (n - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, n - 1)
        a, b = ordered[lo].item(), ordered[hi].item()
        out.append(a + (b - a) * (pos - lo))
    return out
