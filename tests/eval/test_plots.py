"""Tests for posttrain.eval.plots: each plot writes a real PNG; the layout follows what is plottable."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from posttrain.eval.plots import (
    plot_accuracy_matrix,
    plot_entropy_histogram,
    plot_pass_at_k,
    plot_training_curves,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_width(path: Path) -> int:
    """Check the file is a non-trivial PNG and return its pixel width (from the IHDR chunk)."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 1024
    assert data[12:16] == b"IHDR"
    return struct.unpack(">I", data[16:20])[0]


def _history(n: int = 12, with_entropy: bool = True) -> list[dict]:
    history: list[dict] = []
    for step in range(1, n + 1):
        h = 1.2 - 0.08 * step
        entry: dict = {"step": step, "reward": -0.3 * np.exp(h) + 0.9, "loss": 0.1, "note": "text"}
        if with_entropy:
            entry["entropy/mean"] = h
        history.append(entry)
    history.append({"step": n, "train_runtime": 12.3})  # TRL's final summary entry has no metrics
    return history


def test_plot_pass_at_k_writes_png(tmp_path: Path) -> None:
    curves = {
        "base": {1: 0.2, 2: 0.32, 4: 0.45, 8: 0.58},
        "trained": {1: (0.4, 0.02), 2: (0.48, 0.02), 4: (0.53, 0.03), 8: (0.56, 0.03)},
        "from_json": {"1": [0.3, 0.01], "16": [0.7, 0.02], "4": [0.5, 0.01]},  # str keys, list pairs
    }
    out = plot_pass_at_k(curves, tmp_path / "sub" / "pass_at_k.png")
    assert out == tmp_path / "sub" / "pass_at_k.png"
    _png_width(out)
    with pytest.raises(ValueError):
        plot_pass_at_k({"empty": {}}, tmp_path / "none.png")


def test_plot_entropy_histogram_writes_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    entropies = rng.exponential(0.5, size=2000)
    entropies[::100] = np.nan  # padding positions
    out = plot_entropy_histogram(entropies, tmp_path / "entropy.png", bins=40)
    _png_width(out)
    with pytest.raises(ValueError):
        plot_entropy_histogram([], tmp_path / "empty.png")


def test_plot_training_curves_with_entropy_law_panel(tmp_path: Path) -> None:
    with_law = _png_width(plot_training_curves(_history(), tmp_path / "law.png"))
    without_law = _png_width(plot_training_curves(_history(), tmp_path / "nolaw.png", fit_law=False))
    # reward, entropy and the reward-vs-entropy panel, against the two curve panels alone
    assert with_law > without_law * 1.3


def test_plot_training_curves_tolerates_missing_keys(tmp_path: Path) -> None:
    # No entropy logged anywhere: one reward panel, no law panel, no error.
    reward_only = _png_width(plot_training_curves(_history(with_entropy=False), tmp_path / "reward.png"))
    both = _png_width(plot_training_curves(_history(), tmp_path / "both.png", fit_law=False))
    assert reward_only < both
    # Entropy logged at only two steps: too few points for the law, curves still drawn.
    sparse = _history(with_entropy=False)
    sparse[0]["entropy/mean"], sparse[1]["entropy/mean"] = 1.0, 0.9
    assert _png_width(plot_training_curves(sparse, tmp_path / "sparse.png")) == both
    # Constant entropy: the law cannot be fitted and its panel is dropped rather than raising.
    flat = [dict(e, **{"entropy/mean": 0.5}) for e in _history(with_entropy=False)[:-1]]
    assert _png_width(plot_training_curves(flat, tmp_path / "flat.png")) == both
    with pytest.raises(ValueError):
        plot_training_curves([{"step": 1, "loss": 0.3}], tmp_path / "nothing.png")
    with pytest.raises(ValueError):
        plot_training_curves([], tmp_path / "empty.png")


def test_plot_accuracy_matrix_writes_png(tmp_path: Path) -> None:
    matrix = [[0.8, None, 0.1], [0.7, 0.9, None], [0.5, 0.7, 0.95]]
    out = plot_accuracy_matrix(matrix, ["sci", "math", "code"], tmp_path / "matrix.png")
    _png_width(out)
    percent = plot_accuracy_matrix(np.array([[80.0, 10.0], [60.0, 90.0]]), ["a", "b"], tmp_path / "pct.png")
    _png_width(percent)
    with pytest.raises(ValueError):
        plot_accuracy_matrix(matrix, ["sci", "math"], tmp_path / "bad.png")
