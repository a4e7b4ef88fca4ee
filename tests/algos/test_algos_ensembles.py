"""Reward-model ensemble maths: aggregates on hand values and their invariants (ALGORITHMS.md), KL(BoN),
the one-pass best-of-n estimator against brute-force enumeration of subsets, and the Gao et al. fits."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from posttrain.algos import AGGREGATES
from posttrain.algos.ensembles import (
    UWOArgs,
    aggregate,
    best_of_n_expected,
    best_of_n_kl,
    best_of_n_weights,
    gao_fit,
    member_statistics,
)

# 3 members x 4 samples
SCORES = torch.tensor([[1.0, 0.0, 2.0, -1.0],
                       [3.0, 0.0, 2.0, 1.0],
                       [2.0, 3.0, 2.0, 0.0]])


def test_registered_names():
    assert {"mean", "wco", "uwo"} <= set(AGGREGATES.names())
    assert AGGREGATES.args_class("uwo") is UWOArgs and AGGREGATES.args_class("mean") is None


def test_hand_values():
    assert torch.equal(aggregate(SCORES, "mean"), torch.tensor([2.0, 1.0, 2.0, 0.0]))
    assert torch.equal(aggregate(SCORES, "wco"), torch.tensor([1.0, 0.0, 2.0, -1.0]))
    # population variances: [2/3, 2, 0, 2/3]
    expected = torch.tensor([2.0 - 0.5 * 2 / 3, 1.0 - 0.5 * 2.0, 2.0, 0.0 - 0.5 * 2 / 3])
    assert torch.allclose(aggregate(SCORES, "uwo"), expected)
    assert torch.allclose(aggregate(SCORES, "uwo", uwo_lambda=0.1), torch.tensor([2 - 0.2 / 3, 0.8, 2.0, -0.2 / 3]))


@pytest.mark.parametrize("how", AGGREGATES.names())
def test_every_aggregate_shape_and_k1(how):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(5, 7, generator=g)
    out = aggregate(scores, how)
    assert out.shape == (7,) and torch.isfinite(out).all()
    one = scores[:1]
    assert torch.equal(aggregate(one, how), one[0])  # K = 1: every aggregate is the member's score
    perm = scores[torch.tensor([3, 0, 4, 2, 1])]
    assert torch.allclose(aggregate(perm, how), out, atol=1e-6)  # member order does not matter
    with pytest.raises(ValueError, match=r"\[K, N\]"):
        aggregate(scores[0], how)


def test_conservative_aggregates_are_below_the_mean_and_lambda_zero_is_the_mean():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(5, 1000, generator=g) * 3
    m = aggregate(scores, "mean")
    assert (aggregate(scores, "wco") <= m + 1e-6).all()
    assert (aggregate(scores, "uwo", uwo_lambda=0.5) <= m + 1e-6).all()
    assert torch.allclose(aggregate(scores, "uwo", uwo_lambda=0.0), m)
    with pytest.raises(ValueError, match="uwo_lambda"):
        aggregate(scores, "uwo", uwo_lambda=-0.1)
    with pytest.raises(KeyError, match="did you mean 'wco'"):
        aggregate(scores, "wcoo")


def test_member_statistics():
    stats = member_statistics(SCORES)
    assert stats["mean"] == pytest.approx(5.0 / 4)
    assert stats["min"] == pytest.approx(0.5) and stats["max"] == pytest.approx(9.0 / 4)
    pop_std = [math.sqrt(2 / 3), math.sqrt(2.0), 0.0, math.sqrt(2 / 3)]
    assert stats["std"] == pytest.approx(sum(pop_std) / 4)


def test_best_of_n_kl():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_n_kl(64) == pytest.approx(math.log(64) - 63 / 64)
    ks = [best_of_n_kl(n) for n in range(1, 70)]
    assert all(b > a for a, b in zip(ks, ks[1:]))
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError):
            best_of_n_kl(bad)


@pytest.mark.parametrize("N", [1, 5, 9, 200])
def test_weights_sum_to_one_and_the_ends(N):
    for n in sorted({1, min(2, N), N // 2 or 1, N}):
        w = best_of_n_weights(N, n)
        assert w.sum().item() == pytest.approx(1.0, abs=1e-9)
        assert (w[: n - 1] == 0).all() and (w >= 0).all()
    assert torch.allclose(best_of_n_weights(N, 1), torch.full((N,), 1.0 / N, dtype=torch.float64))
    top = best_of_n_weights(N, N)
    assert top[-1].item() == pytest.approx(1.0) and top[:-1].abs().sum().item() == pytest.approx(0.0)
    with pytest.raises(ValueError):
        best_of_n_weights(N, N + 1)


def _brute_force(proxy: torch.Tensor, gold: torch.Tensor, n: int) -> torch.Tensor:
    """Average, over every n-subset of the N samples, of the gold score of the subset's top-proxy sample (ties:
    the later index wins, as in the estimator)."""
    out = []
    for p, g in zip(proxy.tolist(), gold.tolist()):
        picks = [g[max(sub, key=lambda i: (p[i], i))] for sub in itertools.combinations(range(len(p)), n)]
        out.append(sum(picks) / len(picks))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("ties", [False, True])
def test_best_of_n_expected_matches_brute_force(ties):
    g = torch.Generator().manual_seed(2)
    proxy = torch.randn(4, 8, generator=g, dtype=torch.float64)
    if ties:
        proxy = proxy.round()  # many equal proxy scores
    gold = torch.randn(4, 8, generator=g, dtype=torch.float64)
    for n in range(1, 9):
        assert torch.allclose(best_of_n_expected(proxy, gold, n), _brute_force(proxy, gold, n), atol=1e-10), n


def test_best_of_n_expected_ends_and_monotone_in_n():
    g = torch.Generator().manual_seed(3)
    proxy, gold = torch.randn(6, 64, generator=g), torch.randn(6, 64, generator=g)
    assert torch.allclose(best_of_n_expected(proxy, gold, 1), gold.mean(dim=1), atol=1e-6)  # n = 1: mean gold
    top = proxy.argmax(dim=1)
    assert torch.allclose(best_of_n_expected(proxy, gold, 64), gold[torch.arange(6), top])  # n = N: top's gold
    curve = torch.stack([best_of_n_expected(proxy, proxy, n) for n in range(1, 65)], dim=1)
    assert (curve[:, 1:] >= curve[:, :-1] - 1e-6).all()  # proxy = gold: non-decreasing in n
    assert best_of_n_expected(proxy, gold, 3).dtype == torch.float32
    with pytest.raises(ValueError):
        best_of_n_expected(proxy, gold[:, :5], 2)


@pytest.mark.parametrize("form, a, b", [("bon", 1.5, 0.7), ("rl", 0.8, 0.3)])
def test_gao_fit_recovers_the_coefficients(form, a, b):
    d = torch.linspace(0.0, 2.0, 20, dtype=torch.float64)
    f, g = (d, d * d) if form == "bon" else (d, torch.xlogy(d, d))
    fit = gao_fit(d, a * f - b * g, form)
    assert fit.a == pytest.approx(a, abs=1e-9) and fit.b == pytest.approx(b, abs=1e-9) and fit.r2 == pytest.approx(1)
    assert torch.allclose(fit(d), a * f - b * g)
    peak = a / (2 * b) if form == "bon" else math.exp(a / b - 1)
    assert fit.peak == pytest.approx(peak)
    with pytest.raises(KeyError):
        gao_fit(d, d, "ppo")
