"""Stability-gap metrics (min-ACC, WC-ACC) from continual evaluation, and the plots of a continual report."""

from __future__ import annotations

import pytest

from posttrain.eval.metrics import stability_gap_metrics
from posttrain.eval.plots import plot_accuracy_matrix, plot_stability_gap

MATRIX = [[0.8, 0.1, 0.2],
          [0.6, 0.9, 0.3],
          [0.7, 0.5, 0.6]]
EVALS = [{"stage": 1, "step": 5, "accuracy": [0.4, None, None]},
         {"stage": 2, "step": 5, "accuracy": [0.65, 0.3, None]}]


def test_min_acc_and_wc_acc_hand_computed() -> None:
    m = stability_gap_metrics(MATRIX, EVALS)
    # stage 1: task 0 dipped to 0.4 within it (its end value 0.6); WC = 0.9 / 2 + 0.4 / 2
    # stage 2: task 0's lowest after stage 0 is still 0.4, task 1's is 0.3 (within stage 2): min-ACC = 0.35,
    #          WC = 0.6 / 3 + 2 / 3 * 0.35
    assert m["min_acc"] == [None, pytest.approx(0.4), pytest.approx(0.35)]
    assert m["wc_acc"] == [0.8, pytest.approx(0.65), pytest.approx(0.6 / 3 + 2 / 3 * 0.35)]
    assert m["task_min"] == [pytest.approx(0.4), pytest.approx(0.3)]


def test_without_within_stage_evaluations_the_matrix_alone_counts() -> None:
    m = stability_gap_metrics(MATRIX)
    assert m["min_acc"] == [None, pytest.approx(0.6), pytest.approx((0.6 + 0.5) / 2)]
    assert m["task_min"] == [pytest.approx(0.6), pytest.approx(0.5)]
    # an evaluation of task j during its own stage (or before) is not "after its stage"
    m = stability_gap_metrics(MATRIX, [{"stage": 1, "accuracy": [0.9, 0.0, 0.0]}])
    assert m["min_acc"][1] == pytest.approx(0.6) and m["task_min"][1] == pytest.approx(0.5)


def test_partial_runs_and_bad_input() -> None:
    m = stability_gap_metrics(MATRIX[:2])  # a sequence stopped after 2 stages
    assert m["min_acc"] == [None, pytest.approx(0.6)] and m["task_min"] == [pytest.approx(0.6)]
    m = stability_gap_metrics([[None, 0.1], [None, 0.4]])
    assert m["min_acc"] == [None, None] and m["wc_acc"] == [None, None]
    with pytest.raises(ValueError, match="does not fit"):
        stability_gap_metrics(MATRIX, [{"stage": 3, "accuracy": [0, 0, 0]}])
    with pytest.raises(ValueError, match="S <= N"):
        stability_gap_metrics([[0.1], [0.2]])


def test_accuracy_matrix_of_fewer_stages_than_tasks_and_the_stability_plot(tmp_path) -> None:
    png = plot_accuracy_matrix([[0.5, 0.6, None]], ["a", "b", "c"], tmp_path / "m.png", stage_names=["joint"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="need a 1 x 3 matrix"):
        plot_accuracy_matrix([[0.5, 0.6, 0.1], [0.1, 0.2, 0.3]], ["a", "b", "c"], tmp_path / "x.png",
                             stage_names=["joint"])
    curves = {"a": [[10, 0.8], [15, 0.4], [20, 0.6]], "b": [[20, 0.9], [25, 0.3], [30, 0.5]]}
    png = plot_stability_gap(curves, [10, 20, 30], tmp_path / "gap.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
