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
