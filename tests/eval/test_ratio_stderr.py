"""ratio_mean_stderr: the pooled token mean with a cluster-robust standard error (hand-computed golden value)."""

import math

import pytest

from posttrain.eval.metrics import ratio_mean_stderr


def test_golden_value_and_edge_cases():
    # R = 15/7; residuals S - R T = -16/7, -2/7, 18/7; se = sqrt(3/2 * 584/49) / 7
    mean, se = ratio_mean_stderr([2, 4, 9], [2, 2, 3])
    assert mean == pytest.approx(15 / 7) and se == pytest.approx(math.sqrt(1.5 * 584 / 49) / 7)
    assert ratio_mean_stderr([3, 6], [3, 6]) == (1.0, 0.0)  # every cluster at the mean
    assert ratio_mean_stderr([5, 0], [2, 0]) == (2.5, 0.0)  # empty clusters dropped; one left
    with pytest.raises(ValueError, match="no tokens"):
        ratio_mean_stderr([0.0], [0])
    with pytest.raises(ValueError, match="sums has 2 values but counts has 1"):
        ratio_mean_stderr([1, 2], [1])
