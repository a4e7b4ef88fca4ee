import math

import pytest
import torch

from posttrain.algos.entropy import entropy_summary, masked_flatten, token_entropy
from posttrain.algos.groups import group_outcome_fractions, mean_unique_per_group


def test_token_entropy_uniform_and_peaked():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]])
    h = token_entropy(logits)
    assert h[0].item() == pytest.approx(math.log(4))
    assert h[1].item() == pytest.approx(0.0, abs=1e-6)
    # Temperature 2 on logits [2, 0] equals temperature 1 on [1, 0]
    assert token_entropy(torch.tensor([2.0, 0.0]), 2.0).item() == pytest.approx(token_entropy(torch.tensor([1.0, 0.0])).item())


def test_entropy_summary_hand_values():
    x = torch.arange(1.0, 11.0)  # 1..10
    s = entropy_summary(x)
    assert s["mean"] == pytest.approx(5.5)
    assert s["p50"] == pytest.approx(5.5)
    assert s["p95"] == pytest.approx(9.55)  # linear interpolation: 1 + 0.95 * 9
    assert s["top20_mean"] == pytest.approx(9.5)  # top ceil(2) = {10, 9}
    assert entropy_summary(torch.tensor([3.0]))["top20_mean"] == 3.0
    assert all(math.isnan(v) for v in entropy_summary(torch.tensor([])).values())
    assert s["p80"] == pytest.approx(8.2)  # 1 + 0.8 * 9
    assert entropy_summary(torch.tensor([1.0, float("nan"), 3.0]))["mean"] == pytest.approx(2.0)


def test_masked_flatten():
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_flatten(v, m).tolist() == [1.0, 2.0, 4.0]


def test_group_outcomes():
    correct = torch.tensor([1, 1, 1, 0, 0, 0, 1, 0, 1, 1, 1, 1]).bool()  # G=3: all-correct, all-wrong, mixed, all-correct
    assert group_outcome_fractions(correct, 3) == {"frac_all_correct": 0.5, "frac_all_wrong": 0.25, "frac_mixed": 0.25}
    with pytest.raises(ValueError, match="not a multiple"):
        group_outcome_fractions(correct, 5)


def test_unique_answers():
    answers = ["1", "1", "2", None, None, "3"]
    assert mean_unique_per_group(answers, 3) == pytest.approx((2 + 2) / 2)
    assert mean_unique_per_group(["a"] * 4, 2) == 1.0


def test_percentiles_match_torch_quantile_on_small_inputs():
    gen = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 10, 1001):
        x = torch.rand(n, generator=gen, dtype=torch.float64) * 3
        stats = entropy_summary(x)
        expected = torch.quantile(x, torch.tensor([0.5, 0.8, 0.95], dtype=torch.float64)).tolist()
        assert [stats["p50"], stats["p80"], stats["p95"]] == pytest.approx(expected, rel=0, abs=1e-12)


def test_percentiles_beyond_torch_quantile_limit():
    """torch.quantile refuses more than 2**24 elements (a MATH-500 x n=64 evaluation has more tokens). The sequence
    n-1..0 has known order statistics: the q-quantile is q (n - 1), the top-20% mean the mean of the last k."""
    n = 2**24 + 7
    x = torch.arange(n - 1, -1, -1, dtype=torch.float32)  # descending: the sort has work to do
    stats = entropy_summary(x)
    assert [stats["p50"], stats["p80"], stats["p95"]] == pytest.approx([q * (n - 1) for q in (0.5, 0.8, 0.95)],
                                                                       rel=0, abs=1e-6)
    k = -(-n // 5)
    assert stats["top20_mean"] == pytest.approx((n - 1) - (k - 1) / 2, rel=1e-12)
    assert stats["mean"] == pytest.approx((n - 1) / 2, rel=1e-12)
