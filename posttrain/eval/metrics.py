"""Evaluation metrics: pass@k, avg@n, maj@k, token-entropy statistics, forgetting, the
entropy-performance law and a sampled-token KL estimate.

Pure functions on Python sequences and numpy arrays (torch tensors are accepted where noted and
converted on the CPU); no I/O, no model. Formulas are documented in docs/eval.md ("Metrics"; the papers' "Evaluation
metrics" and the continual-tuning metrics); that page writes indices 1-based, this module 0-based.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

from posttrain.algos.entropy import entropy_summary

__all__ = [
    "avg_at_n",
    "continual_metrics",
    "entropy_stats",
    "fit_entropy_law",
    "group_outcome_fractions",
    "kl_from_logprobs",
    "maj_at_k",
    "mean_stderr",
    "pass_at_k",
    "pass_at_k_all",
    "ratio_mean_stderr",
    "stability_gap_metrics",
    "unique_answers",
]


def _as_float_array(values: Any, name: str, drop_nan: bool = False) -> np.ndarray:
    """Flatten ``values`` (sequence, numpy array or CPU/GPU torch tensor) to a float64 numpy array;
    non-finite values raise, except NaN when ``drop_nan`` (then removed)."""
    if hasattr(values, "detach"):  # torch.Tensor, without importing torch here
        values = values.detach().float().cpu().numpy()
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if drop_nan:
        arr = arr[~np.isnan(arr)]
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    return arr


# --------------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------------


def mean_stderr(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean and standard error of the mean.

    stderr = s / sqrt(n) with s the sample standard deviation (ddof = 1). With a single value the
    spread is unknown and stderr is reported as 0.0. An empty input raises ``ValueError``.
    """
    arr = _as_float_array(values, "values")
    n = arr.size
    if n == 0:
        raise ValueError("mean_stderr needs at least one value")
    mean = float(arr.mean())
    if n == 1:
        return mean, 0.0
    return mean, float(arr.std(ddof=1) / math.sqrt(n))


def ratio_mean_stderr(sums: Sequence[float] | np.ndarray, counts: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Pooled mean R = sum_p S_p / sum_p T_p of a per-token quantity (entropy, KL) whose tokens come in
    clusters p (the prompts: samples of one prompt are not independent), with the cluster-robust
    (delta-method) standard error

        stderr^2 = P / (P - 1) * sum_p (S_p - R T_p)^2 / (sum_p T_p)^2.

    ``sums[p]`` = S_p is the sum over the cluster's tokens, ``counts[p]`` = T_p their number. Clusters
    with no token are dropped; with one cluster left stderr is 0.0. Raises ``ValueError`` when there is
    no token at all or the lengths differ.
    """
    s, t = _as_float_array(sums, "sums"), _as_float_array(counts, "counts")
    if s.size != t.size:
        raise ValueError(f"sums has {s.size} values but counts has {t.size}")
    keep = t > 0
    s, t = s[keep], t[keep]
    total = float(t.sum())
    if total <= 0:
        raise ValueError("ratio_mean_stderr: no tokens")
    ratio = float(s.sum() / total)
    p = s.size
    if p == 1:
        return ratio, 0.0
    resid = s - ratio * t
    return ratio, float(math.sqrt(p / (p - 1) * float(np.sum(resid**2))) / total)


# --------------------------------------------------------------------------------------------------
# pass@k, avg@n, maj@k and exploration signals
# --------------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimator for one prompt (Chen et al. 2021, "Evaluating Large Language Models
    Trained on Code", eq. 1).

    With n samples of which c are correct, the probability that a uniformly drawn k-subset holds at
    least one correct sample is

        pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n - c + 1}^{n} (1 - k / i),

    evaluated as the product on the right so that no binomial coefficient is formed (no overflow for
    large n). When n - c < k every k-subset contains a correct sample and the result is exactly 1.0.

    Raises ``ValueError`` unless 0 <= c <= n and 1 <= k <= n.
    """
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"pass_at_k: {name} must be an int, got {value!r}")
    if n < 1:
        raise ValueError(f"pass_at_k: n must be >= 1, got n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def _check_groups(groups: Sequence[Sequence[Any]], name: str) -> None:
    if len(groups) == 0:
        raise ValueError(f"{name} is empty: need at least one prompt")
    for idx, group in enumerate(groups):
        if len(group) == 0:
            raise ValueError(f"{name}[{idx}] has no samples")


def pass_at_k_all(correct: Sequence[Sequence[bool]]) -> dict[int, tuple[float, float]]:
    """pass@k for every k = 1..n_min, averaged over prompts: ``{k: (mean, stderr)}``.

    ``correct[p][s]`` says whether sample s of prompt p is correct. Prompts may have different
    numbers of samples n_p: each prompt uses its own unbiased estimator pass_at_k(n_p, c_p, k), and k
    runs up to n_min = min_p n_p so that every prompt contributes to every k. stderr is the standard
    error over prompts (see :func:`mean_stderr`). pass@1 equals :func:`avg_at_n`.
    """
    _check_groups(correct, "correct")
    counts = [(len(group), sum(bool(x) for x in group)) for group in correct]
    n_min = min(n for n, _ in counts)
    return {k: mean_stderr([pass_at_k(n, c, k) for n, c in counts]) for k in range(1, n_min + 1)}


def avg_at_n(correct: Sequence[Sequence[bool]]) -> float:
    """avg@n: mean over prompts of the per-prompt accuracy of its n samples,
    avg@n = (1/P) sum_p (1/n_p) sum_s correct[p][s]. Equals pass@1."""
    _check_groups(correct, "correct")
    return float(np.mean([sum(bool(x) for x in group) / len(group) for group in correct]))


def _majority(answers: Sequence[str | None]) -> int | None:
    """Index of the first occurrence of the most frequent non-None answer (ties: the answer seen
    first wins); None when every answer is None."""
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for idx, ans in enumerate(answers):
        if ans is None:
            continue
        counts[ans] = counts.get(ans, 0) + 1
        first.setdefault(ans, idx)
    if not counts:
        return None
    best = max(counts.values())
    return min(first[a] for a, cnt in counts.items() if cnt == best)


def maj_at_k(
    answers: Sequence[Sequence[str | None]],
    correct: Sequence[Sequence[bool]],
    k: int,
) -> float:
    """maj@k: accuracy of the majority (most frequent) answer among the first k samples per prompt.

    ``answers[p][s]`` is the extracted, normalised final answer of sample s (None when no answer
    could be extracted) and ``correct[p][s]`` its grade, so equivalence is decided by the grader and
    only identical answer strings are pooled. The majority answer counts as correct when its first
    occurrence among the k samples was graded correct. Ties are broken by first occurrence; None
    never wins against a real answer, and a prompt whose k answers are all None scores 0.

        maj@k = (1/P) sum_p correct[p][first index of argmax_a count_{s<k}(answers[p][s] == a)]

    Raises ``ValueError`` when k < 1, k exceeds a prompt's sample count, or the shapes differ.
    """
    _check_groups(answers, "answers")
    if len(answers) != len(correct):
        raise ValueError(f"answers has {len(answers)} prompts but correct has {len(correct)}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"maj_at_k: k must be an int >= 1, got {k!r}")
    hits = []
    for p, (ans, cor) in enumerate(zip(answers, correct)):
        if len(ans) != len(cor):
            raise ValueError(f"prompt {p}: {len(ans)} answers but {len(cor)} grades")
        if k > len(ans):
            raise ValueError(f"maj_at_k: k={k} exceeds the {len(ans)} samples of prompt {p}")
        winner = _majority(ans[:k])
        hits.append(0.0 if winner is None else float(bool(cor[winner])))
    return float(np.mean(hits))


def unique_answers(answers: Sequence[Sequence[str | None]]) -> list[int]:
    """Number of distinct non-None final answers in each prompt's group (an exploration signal:
    a collapsed policy answers every sample alike). Average with :func:`mean_stderr`."""
    return [len({a for a in group if a is not None}) for group in answers]


def group_outcome_fractions(correct: Sequence[Sequence[bool]]) -> dict[str, float]:
    """Fractions of prompts whose samples are all correct, all wrong, or mixed (`frac_all_correct`,
    `frac_all_wrong`, `frac_mixed`, the keys training logs under `groups/`). All-correct and all-wrong groups
    give GRPO zero advantage, so their share tracks lost learning signal. Every prompt needs the same number
    of samples (as in an evaluation with n samples per prompt)."""
    import torch

    from posttrain.algos.groups import group_outcome_fractions as fractions

    _check_groups(correct, "correct")
    sizes = {len(g) for g in correct}
    if len(sizes) != 1:
        raise ValueError(f"correct: every prompt needs the same number of samples, got group sizes {sorted(sizes)}")
    return fractions(torch.tensor([bool(x) for g in correct for x in g]), sizes.pop())


# --------------------------------------------------------------------------------------------------
# Entropy
# --------------------------------------------------------------------------------------------------


def entropy_stats(token_entropies: Sequence[float] | np.ndarray) -> dict[str, float | int | None]:
    """Summary of per-token entropies H_t (already masked to valid completion tokens; any shape,
    flattened; torch tensors accepted).

    Returns ``mean``, ``p50``, ``p80``, ``p95`` (linear-interpolation percentiles),
    ``top20_mean`` = mean of the ceil(0.2 n) largest entropies (the "forking" tokens), and ``count``
    = n. The numbers come from :func:`posttrain.algos.entropy.entropy_summary`,
    the same code that logs entropy during training; NaN entries (padding) are dropped before counting,
    +-inf raises ``ValueError``. With no tokens the statistics are None and count is 0 (never NaN, so the
    dict serialises to valid JSON).
    """
    arr = _as_float_array(token_entropies, "token_entropies", drop_nan=True)
    if arr.size == 0:
        return {"mean": None, "p50": None, "p80": None, "p95": None, "top20_mean": None, "count": 0}
    return {**entropy_summary(torch.from_numpy(arr)), "count": int(arr.size)}


def fit_entropy_law(entropy: Sequence[float], reward: Sequence[float]) -> dict[str, float]:
    """Fit the entropy-performance law of Cui et al. 2025 ("The Entropy Mechanism of Reinforcement
    Learning for Reasoning Language Models", eq. 1):

        R = -a exp(H) + b,

    as an ordinary least-squares line of R against x = exp(H) (slope -a, intercept b). Returns
    ``a``, ``b``, ``r2`` = 1 - SS_res / SS_tot, ``ceiling`` = b - a (the predicted reward when the
    entropy has collapsed to H = 0) and ``n`` (number of points). A constant reward gives a = 0 and,
    since the fit is then exact, r2 = 1.0.

    Raises ``ValueError`` for mismatched lengths, non-finite values, or fewer than 2 distinct
    entropy values (the slope is then undetermined).
    """
    h = _as_float_array(entropy, "entropy")
    r = _as_float_array(reward, "reward")
    if h.size != r.size:
        raise ValueError(f"entropy has {h.size} values but reward has {r.size}")
    x = np.exp(h)
    if np.unique(x).size < 2:
        raise ValueError("fit_entropy_law needs at least 2 distinct entropy values to fit a line")
    xm, rm = x.mean(), r.mean()
    slope = float(np.sum((x - xm) * (r - rm)) / np.sum((x - xm) ** 2))
    intercept = float(rm - slope * xm)
    ss_res = float(np.sum((r - (intercept + slope * x)) ** 2))
    ss_tot = float(np.sum((r - rm) ** 2))
    # a constant reward is fitted exactly by a flat line; its ss_tot is 0 only up to rounding
    r2 = 1.0 if np.ptp(r) == 0.0 else 1.0 - ss_res / ss_tot
    a, b = -slope, intercept
    return {"a": a, "b": b, "r2": r2, "ceiling": b - a, "n": int(h.size)}


# --------------------------------------------------------------------------------------------------
# KL to the base model
# --------------------------------------------------------------------------------------------------


def kl_from_logprobs(
    logprobs: Any,
    ref_logprobs: Any,
    mask: Any | None = None,
    estimator: Literal["k1", "k3"] = "k3",
) -> float:
    """Token-mean estimate of KL(pi || pi_ref) from the log-probs of tokens sampled from pi.

    ``logprobs`` = log pi(o_t | ...) and ``ref_logprobs`` = log pi_ref(o_t | ...) of the SAME sampled
    tokens, shape [B, T] (any matching shape; numpy arrays, sequences or torch tensors); ``mask``
    (same shape, 1 = valid token) defaults to all valid. With log_r = ref_logprobs - logprobs
    (Schulman, "Approximating KL Divergence", 2020):

        k1 = -log_r                      unbiased, high variance, can be negative per token
        k3 = exp(log_r) - 1 - log_r      unbiased, >= 0 per token, lower variance (GRPO's KL term)

    Both are unbiased only when the tokens were sampled from pi (the evaluated model), not from the
    base. Returns sum(m * k) / sum(m). Raises ``ValueError`` on shape mismatch, an unknown estimator,
    or a mask with no valid token.
    """
    if estimator not in ("k1", "k3"):
        raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1' or 'k3'")

    def to_np(x: Any) -> np.ndarray:
        if hasattr(x, "detach"):
            x = x.detach().float().cpu().numpy()
        return np.asarray(x, dtype=np.float64)

    lp, ref = to_np(logprobs), to_np(ref_logprobs)
    if lp.shape != ref.shape:
        raise ValueError(f"logprobs shape {lp.shape} != ref_logprobs shape {ref.shape}")
    m = np.ones_like(lp) if mask is None else to_np(mask)
    if m.shape != lp.shape:
        raise ValueError(f"mask shape {m.shape} != logprobs shape {lp.shape}")
    denom = float(m.sum())
    if denom <= 0:
        raise ValueError("kl_from_logprobs: the mask selects no valid token")
    valid = m != 0
    log_r = np.where(valid, ref - lp, 0.0)  # padded positions may hold garbage or -inf
    per_token = -log_r if estimator == "k1" else np.expm1(log_r) - log_r
    return float(np.sum(m * per_token) / denom)


# --------------------------------------------------------------------------------------------------
# Continual learning: the stage x task accuracy matrix
# --------------------------------------------------------------------------------------------------


def _entry(value: Any) -> float | None:
    """None and NaN both mean "not evaluated"."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def continual_metrics(
    matrix: Sequence[Sequence[float | None]] | np.ndarray,
    base: Sequence[float | None] | np.ndarray | None = None,
) -> dict[str, Any]:
    """Forgetting metrics over the stage x task accuracy matrix (Lopez-Paz & Ranzato 2017, GEM;
    Chaudhry et al. 2018, RWalk). ``matrix[i][j]`` is the accuracy on task j after training stage i
    (0-based, N tasks, N x N); ``base[j]`` the accuracy of the model before any continual training.

    ALGORITHMS.md writes these 1-based (a[N][j], j < N, j > 1); shifted to 0-based:

        ACC           = mean_{j}          a[N-1][j]
        BWT           = mean_{j < N-1}    (a[N-1][j] - a[j][j])        (negative = forgetting)
        FWT           = mean_{j >= 1}     (a[j-1][j] - base[j])        (only when base is given)
        forgetting_j  = max_{i < N-1} a[i][j] - a[N-1][j]              for j < N-1

    The max in forgetting_j runs over every earlier stage, including those before task j was
    trained, as written in ALGORITHMS.md. Entries that are None (or NaN) were not evaluated: a term
    that needs one is skipped, and a metric with no term left is None. Returns ``acc``, ``bwt``,
    ``fwt``, ``forgetting`` (list of length N-1, None where undefined), ``forgetting_mean`` and
    ``n_tasks``.
    """
    rows = [[_entry(v) for v in row] for row in matrix]
    n = len(rows)
    if n == 0:
        raise ValueError("continual_metrics: the accuracy matrix is empty")
    for i, row in enumerate(rows):
        if len(row) != n:
            raise ValueError(f"accuracy matrix must be N x N (N={n}); row {i} has {len(row)} entries")
    last = rows[n - 1]

    bwt_terms = [
        last[j] - rows[j][j] if last[j] is not None and rows[j][j] is not None else None
        for j in range(n - 1)
    ]
    forgetting: list[float | None] = []
    for j in range(n - 1):
        earlier = [rows[i][j] for i in range(n - 1) if rows[i][j] is not None]
        forgetting.append(max(earlier) - last[j] if earlier and last[j] is not None else None)

    fwt = None
    if base is not None:
        base_vals = [_entry(v) for v in base]
        if len(base_vals) != n:
            raise ValueError(f"base has {len(base_vals)} entries for {n} tasks")
        fwt = _mean_or_none([
            rows[j - 1][j] - base_vals[j]
            if rows[j - 1][j] is not None and base_vals[j] is not None
            else None
            for j in range(1, n)
        ])

    return {
        "acc": _mean_or_none(last),
        "bwt": _mean_or_none(bwt_terms),
        "fwt": fwt,
        "forgetting": forgetting,
        "forgetting_mean": _mean_or_none(forgetting),
        "n_tasks": n,
    }


def stability_gap_metrics(
    matrix: Sequence[Sequence[float | None]],
    evaluations: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """The stability gap (De Lange, van de Ven & Tuytelaars, ICLR 2023, "Continual evaluation for lifelong
    learning: identifying the stability gap") from continual evaluation.

    ``matrix[i][j]``: accuracy on task j after stage i (task j is trained in stage j; S <= N rows);
    ``evaluations``: evaluations within stages, each ``{"stage": k, "accuracy": [acc_j or None, ...]}``. For
    task j, the evaluations "after its own stage ended" are the within-stage ones of stages k > j and the
    end-of-stage entries ``matrix[k][j]``, k > j. 0-based (ALGORITHMS.md writes 1-based):

        min-ACC_k = mean_{j < k} min{ acc_j at any evaluation after stage j, up to the end of stage k }
        WC-ACC_k  = a[k][k] / (k + 1) + (1 - 1 / (k + 1)) min-ACC_k

    min-ACC_0 is None (no earlier task) and WC-ACC_0 = a[0][0]. ``task_min[j]`` is the lowest accuracy task j
    reached after its stage, over the whole run (None for the last task). Missing entries are skipped; a
    quantity with nothing left is None.
    """
    rows = [[_entry(v) for v in row] for row in matrix]
    s = len(rows)
    n = len(rows[0]) if rows else 0
    if any(len(r) != n for r in rows) or s > n:
        raise ValueError(f"stability_gap_metrics: need S <= N rows of N entries, got {s} rows")
    for e in evaluations:
        if not 0 <= int(e["stage"]) < s or len(e["accuracy"]) != n:
            raise ValueError(f"evaluation {e!r} does not fit the {s} x {n} matrix")

    def after(j: int, last: int) -> list[float]:
        values = [rows[k][j] for k in range(j + 1, last + 1)]
        values += [_entry(e["accuracy"][j]) for e in evaluations if j < int(e["stage"]) <= last]
        return [v for v in values if v is not None]

    min_acc: list[float | None] = []
    wc_acc: list[float | None] = []
    for k in range(s):
        lows = [min(v) for j in range(k) if (v := after(j, k))]
        m = float(np.mean(lows)) if lows and k > 0 else None
        min_acc.append(m)
        own = rows[k][k]
        if k == 0 or m is None:
            wc_acc.append(own if k == 0 else None)
        else:
            wc_acc.append(None if own is None else own / (k + 1) + (1 - 1 / (k + 1)) * m)
    task_min = [min(v) if (v := after(j, s - 1)) else None for j in range(max(s - 1, 0))]
    return {"min_acc": min_acc, "wc_acc": wc_acc, "task_min": task_min,
            "evaluations": [dict(e) for e in evaluations]}
