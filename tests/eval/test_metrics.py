"""Tests for posttrain.eval.metrics: brute-force pass@k, hand-computed golden values."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from itertools import combinations

import numpy as np
import pytest

from posttrain.eval.metrics import (
    avg_at_n,
    continual_metrics,
    entropy_stats,
    fit_entropy_law,
    group_outcome_fractions,
    kl_from_logprobs,
    maj_at_k,
    mean_stderr,
    pass_at_k,
    pass_at_k_all,
    unique_answers,
)

# ------------------------------------------------------------------------------------------------
# pass@k
# ------------------------------------------------------------------------------------------------


def _brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    samples = [True] * c + [False] * (n - c)
    subsets = list(combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_enumeration_of_all_k_subsets() -> None:
    checked = 0
    for n in range(1, 9):
        for c in range(0, n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(_brute_force_pass_at_k(n, c, k), abs=1e-12), (n, c, k)
                checked += 1
    assert checked == sum(n * (n + 1) for n in range(1, 9))


def test_pass_at_k_edge_values() -> None:
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(5, 3, 3) == 1.0  # n - c = 2 < k = 3: every 3-subset holds a correct one
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)


@pytest.mark.parametrize(
    "n, c, k",
    [(0, 0, 1), (5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6), (5, 2, -1), (5.0, 2, 1), (5, 2, True)],
)
def test_pass_at_k_rejects_invalid_arguments(n, c, k) -> None:
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_pass_at_k_is_stable_and_exact_for_large_n() -> None:
    n = 200
    for c in range(0, n + 1, 7):
        previous = -1.0
        for k in range(1, n + 1):
            value = pass_at_k(n, c, k)
            assert 0.0 <= value <= 1.0 and math.isfinite(value)
            assert value >= previous - 1e-12  # non-decreasing in k
            previous = value
    # C(200, 100) ~ 9e58 would lose all precision as a float ratio; compare to exact rationals.
    for c, k in [(1, 1), (3, 50), (10, 100), (100, 100), (150, 40), (199, 1)]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12, abs=1e-15)
    assert 0.0 < pass_at_k(5000, 1, 2500) <= 1.0


def test_pass_at_k_all_means_stderrs_and_unequal_n() -> None:
    result = pass_at_k_all([[True, False, False, False], [True, True, False, False]])
    assert sorted(result) == [1, 2, 3, 4]
    # k = 1: per prompt 1/4 and 2/4 -> mean 0.375; sample std = 0.25 / sqrt(2) -> stderr 0.125
    assert result[1][0] == pytest.approx(0.375)
    assert result[1][1] == pytest.approx(0.125)
    # k = 2: 1 - C(3,2)/C(4,2) = 0.5 and 1 - C(2,2)/C(4,2) = 5/6
    assert result[2][0] == pytest.approx((0.5 + 5 / 6) / 2)
    assert result[4] == pytest.approx((1.0, 0.0))

    # Different n per prompt: k runs to n_min = 2, each prompt uses its own n.
    uneven = pass_at_k_all([[True, False], [False, False, True]])
    assert sorted(uneven) == [1, 2]
    assert uneven[1][0] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert uneven[2][0] == pytest.approx((1.0 + 2 / 3) / 2)

    with pytest.raises(ValueError):
        pass_at_k_all([])
    with pytest.raises(ValueError):
        pass_at_k_all([[True], []])


def test_avg_at_n_equals_pass_at_1() -> None:
    correct = [[True, False, False, False], [True, True, True, False]]
    assert avg_at_n(correct) == pytest.approx(0.5)
    assert avg_at_n(correct) == pytest.approx(pass_at_k_all(correct)[1][0])
    with pytest.raises(ValueError):
        avg_at_n([])


def test_mean_stderr() -> None:
    mean, stderr = mean_stderr([1.0, 2.0, 3.0, 4.0])
    assert mean == pytest.approx(2.5)
    assert stderr == pytest.approx(math.sqrt(5 / 3) / 2)  # s^2 = 5/3 (ddof = 1), n = 4
    assert mean_stderr([0.7]) == (0.7, 0.0)
    with pytest.raises(ValueError):
        mean_stderr([])


# ------------------------------------------------------------------------------------------------
# maj@k and exploration signals
# ------------------------------------------------------------------------------------------------


def test_maj_at_k_majority_and_first_occurrence_ties() -> None:
    answers = [["1", "2", "2", "1", "3"]]
    correct = [[False, True, True, False, False]]
    assert maj_at_k(answers, correct, k=1) == 0.0  # only "1"
    assert maj_at_k(answers, correct, k=3) == 1.0  # "2" twice
    assert maj_at_k(answers, correct, k=4) == 0.0  # "1" and "2" twice each: "1" came first
    assert maj_at_k(answers, correct, k=5) == 0.0
    # The tie rule decides the outcome in both orders.
    assert maj_at_k([["a", "b"]], [[False, True]], k=2) == 0.0
    assert maj_at_k([["b", "a"]], [[True, False]], k=2) == 1.0


def test_maj_at_k_none_answers() -> None:
    # None is the most frequent, but never beats a real answer.
    assert maj_at_k([[None, None, "5"]], [[False, False, True]], k=3) == 1.0
    assert maj_at_k([[None, "4", None, "5", "5"]], [[False, False, False, True, True]], k=5) == 1.0
    # All None: the prompt scores 0.
    assert maj_at_k([[None, None]], [[True, True]], k=2) == 0.0


def test_maj_at_k_averages_prompts_and_validates() -> None:
    answers = [["x", "x", "y"], ["p", "q", "q"], [None, None, None]]
    correct = [[True, True, False], [True, False, False], [False, False, False]]
    assert maj_at_k(answers, correct, k=3) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        maj_at_k(answers, correct, k=4)
    with pytest.raises(ValueError):
        maj_at_k(answers, correct, k=0)
    with pytest.raises(ValueError):
        maj_at_k([["x", "y"]], [[True]], k=1)
    with pytest.raises(ValueError):
        maj_at_k(answers, correct[:2], k=1)


def test_unique_answers_and_group_outcomes() -> None:
    assert unique_answers([["1", "1", None], ["a", "b", "c"], [None]]) == [1, 3, 0]
    fractions = group_outcome_fractions([[True, True], [False, False], [True, False], [False, False]])
    assert fractions == pytest.approx({"frac_all_correct": 0.25, "frac_all_wrong": 0.5, "frac_mixed": 0.25})


# ------------------------------------------------------------------------------------------------
# Entropy statistics and the entropy-performance law
# ------------------------------------------------------------------------------------------------


def test_entropy_stats_hand_computed() -> None:
    stats = entropy_stats([3.0, 9.0, 0.0, 7.0, 1.0, 8.0, 2.0, 6.0, 4.0, 5.0])
    assert stats["count"] == 10
    assert stats["mean"] == pytest.approx(4.5)
    # numpy linear percentiles of 0..9: position q/100 * 9
    assert stats["p50"] == pytest.approx(4.5)
    assert stats["p80"] == pytest.approx(7.2)
    assert stats["p95"] == pytest.approx(8.55)
    assert stats["top20_mean"] == pytest.approx((9.0 + 8.0) / 2)  # ceil(0.2 * 10) = 2 tokens


@pytest.mark.parametrize(
    "n, expected_top",
    [(1, 1), (4, 1), (5, 1), (6, 2), (11, 3), (15, 3), (16, 4)],  # ceil(n / 5)
)
def test_entropy_stats_top20_uses_ceil_of_a_fifth(n: int, expected_top: int) -> None:
    values = np.arange(1, n + 1, dtype=np.float64)[::-1]  # descending, so order must not matter
    expected = values[:expected_top].mean()
    assert entropy_stats(values)["top20_mean"] == pytest.approx(expected)


def test_entropy_stats_empty_multidim_and_invalid() -> None:
    empty = entropy_stats([])
    assert empty == {"mean": None, "p50": None, "p80": None, "p95": None, "top20_mean": None, "count": 0}
    json.dumps(empty, allow_nan=False)
    grid = entropy_stats(np.array([[0.0, 1.0], [2.0, 3.0]]))
    assert grid["count"] == 4 and grid["mean"] == pytest.approx(1.5)
    # NaN marks padding and is dropped (as in algos.entropy.entropy_summary); inf is an error
    with_nan = entropy_stats([0.0, float("nan"), 2.0])
    assert with_nan["count"] == 2 and with_nan["mean"] == pytest.approx(1.0)
    assert entropy_stats([float("nan")])["count"] == 0
    with pytest.raises(ValueError):
        entropy_stats([0.1, float("inf")])


def test_fit_entropy_law_recovers_exact_parameters() -> None:
    a, b = 0.3, 0.9
    entropy = np.linspace(0.05, 1.5, 12)
    reward = -a * np.exp(entropy) + b
    fit = fit_entropy_law(entropy.tolist(), reward.tolist())
    assert fit["a"] == pytest.approx(a, rel=1e-9)
    assert fit["b"] == pytest.approx(b, rel=1e-9)
    assert fit["r2"] == pytest.approx(1.0, abs=1e-12)
    assert fit["ceiling"] == pytest.approx(b - a, rel=1e-9)
    assert fit["n"] == 12


def test_fit_entropy_law_noisy_and_constant_reward() -> None:
    rng = np.random.default_rng(0)
    entropy = np.linspace(0.1, 1.2, 50)
    reward = -0.2 * np.exp(entropy) + 0.8 + rng.normal(0, 0.02, size=50)
    fit = fit_entropy_law(entropy, reward)
    assert 0.5 < fit["r2"] < 1.0
    assert fit["a"] == pytest.approx(0.2, abs=0.03)
    flat = fit_entropy_law([0.1, 0.5, 0.9], [0.4, 0.4, 0.4])
    assert flat["a"] == pytest.approx(0.0, abs=1e-12) and flat["b"] == pytest.approx(0.4)
    assert flat["r2"] == 1.0


@pytest.mark.parametrize(
    "entropy, reward",
    [([0.5], [0.3]), ([0.5, 0.5, 0.5], [0.1, 0.2, 0.3]), ([], []), ([0.1, 0.2], [0.3]), ([0.1, np.nan], [0.1, 0.2])],
)
def test_fit_entropy_law_rejects_degenerate_input(entropy, reward) -> None:
    with pytest.raises(ValueError):
        fit_entropy_law(entropy, reward)


# ------------------------------------------------------------------------------------------------
# KL from log-probs
# ------------------------------------------------------------------------------------------------


def test_kl_from_logprobs_hand_computed() -> None:
    logp = np.log([[0.5, 0.25]])
    ref = np.log([[0.25, 0.5]])
    # log_r = ref - logp = [-ln 2, ln 2]
    # k1 = -log_r = [ln 2, -ln 2] -> mean 0
    # k3 = exp(log_r) - 1 - log_r = [0.5 - 1 + ln 2, 2 - 1 - ln 2] -> mean (0.5 + 2 - 2) / 2 = 0.25
    assert kl_from_logprobs(logp, ref, estimator="k1") == pytest.approx(0.0, abs=1e-12)
    assert kl_from_logprobs(logp, ref, estimator="k3") == pytest.approx(0.25)
    assert kl_from_logprobs(logp, logp) == 0.0


def test_kl_from_logprobs_mask_ignores_padding() -> None:
    logp = np.log([[0.5, 0.25, 0.9], [0.4, 0.3, 0.2]])
    ref = np.log([[0.25, 0.5, 0.1], [0.4, 0.3, 0.2]])
    ref[0, 2] = -np.inf  # padding garbage must not leak into the mean
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    # valid tokens: k3 = [0.5 - 1 + ln 2, 2 - 1 - ln 2, 0] -> sum 0.5, over 3 tokens
    assert kl_from_logprobs(logp, ref, mask) == pytest.approx(0.5 / 3)
    assert kl_from_logprobs(logp, ref, mask, estimator="k1") == pytest.approx(0.0, abs=1e-12)


def test_kl_estimators_are_unbiased_for_samples_from_the_model() -> None:
    rng = np.random.default_rng(1)
    pi = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
    pi_ref = np.array([0.2, 0.2, 0.2, 0.2, 0.2])
    exact = float(np.sum(pi * np.log(pi / pi_ref)))
    tokens = rng.choice(5, size=200_000, p=pi)
    logp, ref = np.log(pi[tokens]), np.log(pi_ref[tokens])
    assert kl_from_logprobs(logp, ref, estimator="k1") == pytest.approx(exact, rel=0.02)
    assert kl_from_logprobs(logp, ref, estimator="k3") == pytest.approx(exact, rel=0.02)


def test_kl_from_logprobs_accepts_torch_and_validates() -> None:
    torch = pytest.importorskip("torch")
    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    ref = torch.log(torch.tensor([[0.25, 0.5]]))
    assert kl_from_logprobs(logp, ref, torch.ones(1, 2)) == pytest.approx(0.25, rel=1e-6)
    with pytest.raises(ValueError):
        kl_from_logprobs(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError):
        kl_from_logprobs(np.zeros((2, 3)), np.zeros((2, 3)), mask=np.zeros((2, 3)))
    with pytest.raises(ValueError):
        kl_from_logprobs(np.zeros((2, 3)), np.zeros((2, 3)), mask=np.ones((2, 2)))
    with pytest.raises(ValueError):
        kl_from_logprobs(np.zeros(3), np.zeros(3), estimator="k2")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# Continual-learning metrics
# ------------------------------------------------------------------------------------------------

BASE = [0.3, 0.2, 0.25]


def test_continual_metrics_hand_computed_3x3() -> None:
    matrix = [
        [0.80, 0.10, 0.20],  # after task 0
        [0.85, 0.90, 0.30],  # after task 1
        [0.50, 0.70, 0.95],  # after task 2 (final)
    ]
    # ACC = (0.50 + 0.70 + 0.95) / 3 = 2.15 / 3
    # BWT = ((0.50 - 0.80) + (0.70 - 0.90)) / 2 = (-0.30 - 0.20) / 2 = -0.25
    # FWT = ((a[0][1] - base1) + (a[1][2] - base2)) / 2 = ((0.10 - 0.20) + (0.30 - 0.25)) / 2 = -0.025
    # forgetting_0 = max(0.80, 0.85) - 0.50 = 0.35   (the max is at stage 1, not at the diagonal)
    # forgetting_1 = max(0.10, 0.90) - 0.70 = 0.20   -> mean 0.275
    result = continual_metrics(matrix, base=BASE)
    assert result["acc"] == pytest.approx(2.15 / 3)
    assert result["bwt"] == pytest.approx(-0.25)
    assert result["fwt"] == pytest.approx(-0.025)
    assert result["forgetting"] == pytest.approx([0.35, 0.20])
    assert result["forgetting_mean"] == pytest.approx(0.275)
    assert result["n_tasks"] == 3
    assert continual_metrics(matrix)["fwt"] is None  # no base, no FWT


def test_forgetting_max_includes_stages_before_the_task_was_trained() -> None:
    # ALGORITHMS.md: forgetting_j = max_{i < N} a[i][j] - a[N][j] (1-based), over every earlier
    # stage. Here task 1 scored 0.95 zero-shot after stage 0, above its 0.90 after its own stage 1:
    # forgetting_1 = max(0.95, 0.90) - 0.70 = 0.25 (a max restricted to i >= j would give 0.20).
    matrix = [[0.5, 0.95, 0.2], [0.6, 0.90, 0.3], [0.4, 0.70, 0.8]]
    result = continual_metrics(matrix)
    assert result["forgetting"] == pytest.approx([0.2, 0.25])  # 0.6 - 0.4, 0.95 - 0.70


def test_continual_metrics_skips_missing_entries() -> None:
    matrix = [
        [0.80, None, None],
        [None, 0.90, None],
        [0.50, None, 0.95],
    ]
    # ACC = (0.50 + 0.95) / 2 = 0.725 (a[2][1] missing)
    # BWT: j=0 -> 0.50 - 0.80 = -0.30; j=1 skipped (a[2][1] missing) -> -0.30
    # FWT: a[0][1] and a[1][2] both missing -> None
    # forgetting_0 = max(0.80) - 0.50 = 0.30 (a[1][0] missing); forgetting_1 undefined -> None
    result = continual_metrics(matrix, base=BASE)
    assert result["acc"] == pytest.approx(0.725)
    assert result["bwt"] == pytest.approx(-0.30)
    assert result["fwt"] is None
    assert result["forgetting"][0] == pytest.approx(0.30)
    assert result["forgetting"][1] is None
    assert result["forgetting_mean"] == pytest.approx(0.30)
    # NaN in a numpy matrix means the same as None
    as_array = np.array([[np.nan if v is None else v for v in row] for row in matrix])
    assert continual_metrics(as_array, base=BASE) == result


def test_continual_metrics_single_task_and_validation() -> None:
    single = continual_metrics([[0.6]], base=[0.1])
    assert single["acc"] == pytest.approx(0.6)
    assert single["bwt"] is None and single["fwt"] is None
    assert single["forgetting"] == [] and single["forgetting_mean"] is None
    with pytest.raises(ValueError):
        continual_metrics([[0.1, 0.2], [0.3]])
    with pytest.raises(ValueError):
        continual_metrics([])
    with pytest.raises(ValueError):
        continual_metrics([[0.1, 0.2], [0.3, 0.4]], base=[0.1])
