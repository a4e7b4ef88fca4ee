"""PNG plots for evaluation reports: pass@k curves, token-entropy histograms, training curves with
the entropy-performance law, the continual-learning accuracy matrix, and the chosen / rejected log-probability
distributions of preference pairs.

Each function writes one PNG (creating parent folders) and returns its path. The Agg backend is
selected on import so that plotting works on headless training nodes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from posttrain.eval.metrics import entropy_stats, fit_entropy_law  # noqa: E402

__all__ = [
    "plot_accuracy_matrix",
    "plot_best_of_n",
    "plot_stability_gap",
    "plot_entropy_histogram",
    "plot_pair_logps",
    "plot_pass_at_k",
    "plot_training_curves",
]

PathLike = str | os.PathLike[str]

_DPI = 120
_MIN_LAW_POINTS = 3  # a line through 2 points always has r2 = 1 and says nothing


def _save(fig: Any, path: PathLike) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.tight_layout()
        fig.savefig(out, dpi=_DPI, format="png")
    finally:
        plt.close(fig)
    return out


def _finite_number(value: Any) -> float | None:
    """A plottable float, or None for missing / non-numeric / non-finite log values."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def plot_pass_at_k(
    curves: Mapping[str, Mapping[int, float | tuple[float, float]]], path: PathLike
) -> Path:
    """pass@k against k, one line per label (e.g. base vs trained checkpoint).

    Values are floats, or ``(mean, stderr)`` pairs as returned by
    :func:`posttrain.eval.metrics.pass_at_k_all`, drawn with error bars. k is on a log2 axis.
    Raises ``ValueError`` when there is no point to plot.
    """
    if not any(len(c) for c in curves.values()):
        raise ValueError("plot_pass_at_k: no curve has any point")
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    max_k = 1
    for label, curve in curves.items():
        if not curve:
            continue
        items = sorted((int(k), v) for k, v in curve.items())  # keys may be "8" after a JSON round trip
        ks, points = [k for k, _ in items], [v for _, v in items]
        max_k = max(max_k, ks[-1])
        means = [p[0] if isinstance(p, (tuple, list)) else p for p in points]
        errs = [p[1] if isinstance(p, (tuple, list)) else 0.0 for p in points]
        ax.errorbar(ks, means, yerr=errs, marker="o", markersize=3, capsize=2, label=str(label))
    if max_k > 1:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("k (samples per prompt)")
    ax.set_ylabel("pass@k")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("pass@k (unbiased estimator)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_entropy_histogram(entropies: Sequence[float] | np.ndarray, path: PathLike, bins: int = 50) -> Path:
    """Histogram of per-token entropies (nats), with the mean, p80 and p95 marked; NaN entries
    (padding) are dropped.

    Raises ``ValueError`` for an empty input (nothing to plot).
    """
    if hasattr(entropies, "detach"):  # torch.Tensor, without importing torch here
        entropies = entropies.detach().float().cpu().numpy()
    arr = np.asarray(entropies, dtype=np.float64).reshape(-1)
    arr = arr[~np.isnan(arr)]  # padding, dropped as in entropy_stats
    stats = entropy_stats(arr)
    if stats["count"] == 0:
        raise ValueError("plot_entropy_histogram: no token entropies to plot")
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.hist(arr, bins=bins, color="tab:blue", alpha=0.8)
    for key, style in (("mean", "-"), ("p80", "--"), ("p95", ":")):
        ax.axvline(float(stats[key]), color="black", linestyle=style, label=f"{key} = {stats[key]:.3f}")
    ax.set_yscale("log")
    ax.set_xlabel("token entropy H_t (nats)")
    ax.set_ylabel("tokens (log scale)")
    ax.set_title(f"Token entropy distribution (n = {stats['count']}, top-20% mean = {stats['top20_mean']:.3f})")
    ax.legend()
    return _save(fig, path)


def _series(log_history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key`` over the log entries that hold a finite number for it; an entry
    without ``step`` uses its position in the history."""
    steps, values = [], []
    for idx, entry in enumerate(log_history):
        value = _finite_number(entry.get(key))
        if value is None:
            continue
        step = _finite_number(entry.get("step"))
        steps.append(float(idx) if step is None else step)
        values.append(value)
    return steps, values


def plot_training_curves(
    log_history: Sequence[Mapping[str, Any]],
    path: PathLike,
    keys: Sequence[str] = ("reward", "entropy/mean"),
    fit_law: bool = True,
) -> Path:
    """Training curves from a ``Trainer.state.log_history``-style list of dicts: one panel per key
    in ``keys`` that has at least one value (keys absent from every entry are skipped).

    When ``fit_law`` and the first two keys are a reward and an entropy that co-occur in at least
    3 log entries with 2 distinct entropies, a last panel scatters reward against entropy with the
    fitted entropy-performance law R = -a exp(H) + b (Cui et al. 2025; see
    :func:`posttrain.eval.metrics.fit_entropy_law`) and its a, b, r2 and ceiling in the legend.

    Raises ``ValueError`` only when none of ``keys`` has a value to plot.
    """
    present = [(key, *_series(log_history, key)) for key in keys]
    present = [p for p in present if p[1]]
    if not present:
        raise ValueError(f"plot_training_curves: none of {list(keys)} appears in the log history")

    law_points: list[tuple[float, float]] = []
    law: dict[str, float] | None = None
    if fit_law and len(keys) >= 2:
        reward_key, entropy_key = keys[0], keys[1]
        for entry in log_history:
            r, h = _finite_number(entry.get(reward_key)), _finite_number(entry.get(entropy_key))
            if r is not None and h is not None:
                law_points.append((h, r))
        if len(law_points) >= _MIN_LAW_POINTS:
            try:
                law = fit_entropy_law([h for h, _ in law_points], [r for _, r in law_points])
            except ValueError:  # all entropies equal: no slope to fit, so no law panel
                law = None

    n_panels = len(present) + (law is not None)
    fig, axes = plt.subplots(1, n_panels, figsize=(4.8 * n_panels, 4.0), squeeze=False)
    for ax, (key, steps, values) in zip(axes[0], present):
        ax.plot(steps, values, marker="o" if len(values) < 30 else None, markersize=3)
        ax.set_xlabel("training step")
        ax.set_ylabel(key)
        ax.set_title(f"{key} over training")
        ax.grid(True, alpha=0.3)

    if law is not None:
        ax = axes[0][-1]
        hs = np.array([h for h, _ in law_points])
        rs = np.array([r for _, r in law_points])
        ax.scatter(hs, rs, s=12, label="logged steps")
        grid = np.linspace(0.0, hs.max(), 200)
        ax.plot(
            grid,
            -law["a"] * np.exp(grid) + law["b"],
            color="tab:red",
            label=(f"R = -a exp(H) + b\na = {law['a']:.4g}, b = {law['b']:.4g}\n"
                   f"r2 = {law['r2']:.3f}, ceiling b - a = {law['ceiling']:.4g}"),
        )
        ax.set_xlabel(f"{keys[1]} (H)")
        ax.set_ylabel(f"{keys[0]} (R)")
        ax.set_title("Entropy-performance law")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    return _save(fig, path)


def plot_accuracy_matrix(
    matrix: Sequence[Sequence[float | None]] | np.ndarray,
    task_names: Sequence[str],
    path: PathLike,
    stage_names: Sequence[str] | None = None,
) -> Path:
    """Heatmap of the continual-learning accuracy matrix, ``matrix[i][j]`` = accuracy on task j after
    training stage i, each cell annotated with its value; None / NaN cells (not evaluated) stay
    blank and read "n/a". The matrix is N x N with N task names, or S x N with S stage names (a joint
    multi-task stage, a sequence stopped early); raises ``ValueError`` otherwise.
    """
    n = len(task_names)
    rows = [[np.nan if v is None else float(v) for v in row] for row in matrix]
    s = n if stage_names is None else len(stage_names)
    if n == 0 or len(rows) != s or s == 0 or any(len(r) != n for r in rows):
        raise ValueError(f"plot_accuracy_matrix: need a {s} x {n} matrix (stages x len(task_names) = {n})")
    data = np.ma.masked_invalid(np.array(rows, dtype=np.float64))
    finite = data.compressed()
    vmax = 1.0 if finite.size == 0 or finite.max() <= 1.0 else 100.0  # fractions or percentages
    fmt = "{:.2f}" if vmax == 1.0 else "{:.1f}"

    size = max(4.0, 0.9 * n + 2.0)
    fig, ax = plt.subplots(figsize=(size + 1.0, max(2.5, 0.9 * s + 2.0)))
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
    image = ax.imshow(data, cmap=cmap, vmin=0.0, vmax=vmax)
    fig.colorbar(image, ax=ax, label="accuracy")
    for i in range(s):
        for j in range(n):
            value = data[i, j]
            if np.ma.is_masked(value):
                ax.text(j, i, "n/a", ha="center", va="center", color="dimgrey", fontsize=8)
                continue
            # dark text on the bright (yellow) end of viridis, white elsewhere
            color = "black" if value / vmax > 0.6 else "white"
            ax.text(j, i, fmt.format(float(value)), ha="center", va="center", color=color, fontsize=8)
    ax.set_xticks(range(n), [str(t) for t in task_names], rotation=45, ha="right")
    ax.set_yticks(range(s), [f"after {t}" for t in (task_names if stage_names is None else stage_names)])
    ax.set_xlabel("evaluated task j")
    ax.set_ylabel("training stage i")
    ax.set_title("Accuracy matrix a[i][j]")
    return _save(fig, path)


def plot_pair_logps(panels: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: PathLike,
                    bins: int = 30) -> Path:
    """Histograms of the chosen and the rejected responses' sequence log-probabilities, one panel per model
    (e.g. {"before": (chosen, rejected), "after": ...}) on one shared x-axis: the picture of DPO-Shift's Figure 1,
    where DPO moves both distributions down and DPO-Shift keeps the chosen one up. Medians are marked.

    Raises ``ValueError`` when there is no panel or a panel has no pairs.
    """
    if not panels or any(len(c) == 0 or len(r) == 0 for c, r in panels.values()):
        raise ValueError("plot_pair_logps: every panel needs chosen and rejected log-probabilities")
    values = np.concatenate([np.asarray(v, dtype=np.float64) for c, r in panels.values() for v in (c, r)])
    edges = np.linspace(values.min(), values.max(), bins + 1) if values.max() > values.min() else bins
    fig, axes = plt.subplots(len(panels), 1, figsize=(6.4, 1.0 + 2.2 * len(panels)), sharex=True, squeeze=False)
    for ax, (label, (chosen, rejected)) in zip(axes[:, 0], panels.items()):
        for data, name, color in ((chosen, "chosen", "tab:green"), (rejected, "rejected", "tab:red")):
            arr = np.asarray(data, dtype=np.float64)
            ax.hist(arr, bins=edges, color=color, alpha=0.5, label=f"{name} (median {np.median(arr):.1f})")
            ax.axvline(float(np.median(arr)), color=color, linestyle="--")
        ax.set_title(f"{label} ({len(chosen)} pairs)", fontsize=10)
        ax.set_ylabel("pairs")
        ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel("sequence log-probability log pi(y | x)")
    return _save(fig, path)


def plot_best_of_n(results: Mapping[str, Any], path: PathLike, scorers: Sequence[str] | None = None) -> Path:
    """Best-of-n against d = sqrt(KL): the gold gain over n = 1 of each scorer's pick with its Gao et al. fit
    d (a - b d) (dashed), and the scorer's own proxy gain, from `posttrain.eval.bon` results (keys `sqrt_kl`,
    `curves`, `fits`). `scorers` default: the aggregates and member_0 (a single reward model)."""
    names = list(scorers or [s for s in results["curves"] if not s.startswith("member_") or s == "member_0"])
    d = np.asarray(results["sqrt_kl"], dtype=np.float64)
    fig, (gold_ax, proxy_ax) = plt.subplots(1, 2, figsize=(11.0, 4.4))
    grid = np.linspace(0.0, d.max(), 100)
    for i, name in enumerate(names):
        curve, color = results["curves"][name], f"C{i}"
        gold = np.asarray(curve["gold"]) - curve["gold"][0]
        gold_ax.plot(d, gold, color=color, linewidth=1.2, label=name)
        marks = [j for j, n in enumerate(results.get("ns", range(1, len(d) + 1))) if n & (n - 1) == 0]  # 1, 2, 4..
        gold_ax.errorbar(d[marks], gold[marks], yerr=np.asarray(curve["gold_stderr"])[marks], color=color,
                         marker="o", markersize=3, capsize=2, linestyle="none")
        fit = results.get("fits", {}).get(name)
        if fit:
            gold_ax.plot(grid, grid * (fit["a"] - fit["b"] * grid), color=color, linestyle="--", linewidth=1)
        proxy_ax.plot(d, np.asarray(curve["proxy"]) - curve["proxy"][0], color=color, marker="o", markersize=2.5,
                      linewidth=1, label=name)
    gold_ax.set_title("gold gain of the best-of-n pick (bars: stderr over prompts;\ndashed: Gao fit d(a - b d))")
    gold_ax.set_ylabel("gold - gold(n = 1)")
    proxy_ax.set_title("proxy gain (each scorer's own score)")
    proxy_ax.set_ylabel("proxy - proxy(n = 1)")
    for ax in (gold_ax, proxy_ax):
        ax.set_xlabel("sqrt(KL(n)),  KL = log n - (n - 1)/n")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    return _save(fig, path)


def plot_stability_gap(
    curves: Mapping[str, Sequence[Sequence[float]]],
    stage_ends: Sequence[float],
    path: PathLike,
) -> Path:
    """Accuracy of each earlier task over training steps (continual evaluation): ``curves[task]`` is a list of
    (global step, accuracy) from the end of the task's own stage on; dotted lines mark the stage boundaries
    ``stage_ends``. The dips right after a boundary are the stability gap."""
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for name, points in curves.items():
        pts = [(float(x), y) for x, y in ((p[0], _finite_number(p[1])) for p in points) if y is not None]
        if pts:
            xs, ys = zip(*sorted(pts))
            ax.plot(xs, ys, marker="o", markersize=3, label=str(name))
    for end in stage_ends[:-1]:
        ax.axvline(float(end), color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("optimizer step (all stages)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Earlier tasks during later stages (stability gap)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)
