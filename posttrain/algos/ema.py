"""EMA-balanced LoRA maths for continual instruction tuning (registry kind ``ema_weight``), and the TF-IDF
instruction similarity that decides retrain-or-expand and routes test instances.

Sources: LCIA, "Large Continual Instruction Assistant" (Qiao et al., ICML 2025; reference code
JingyangQiao/CoIN: ``CoIN/peft/tuners/lora.py::ema_update`` and ``instruct/LoRASelect.py``); its baseline
I-LoRA, "Analyzing and Reducing Catastrophic Forgetting in Parameter Efficient Tuning" (Ren et al., 2024;
reference code which47/LLMCL ``method/ILORA.py``).

Shared signature of ``EMA_WEIGHTS``: ``fn(theta, ema, grad, prev_grad, args) -> float``, the weight w in
[0, 1] that the EMA update gives the NEW weights of one tensor (``ema_update``). ``theta``, ``ema``,
``grad`` and ``prev_grad`` have the tensor's own shape (any); a function that needs no gradient ignores them.

- ``dynamic`` (LCIA): w = s (1 + |g|_1) / (|theta - theta*|_1 |g - g_prev|_1), fallback when outside (0, 1).
- ``fixed``: a constant w (the fixed-EMA LoRA baseline; w = 1 - lambda gives I-LoRA's interpolation).

Everything here is a pure function of its arguments: the state (theta*, g_prev, the codebook) lives in
``posttrain.trainers.continual`` and ``posttrain.models.adapter_groups``.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from posttrain.algos.registry import Registry

__all__ = [
    "EMA_WEIGHTS",
    "ENGLISH_STOP_WORDS",
    "DynamicEMAArgs",
    "FixedEMAArgs",
    "dynamic_ema_weight",
    "ema_update",
    "hidden_consistency",
    "ilora_interpolate",
    "instruction_set_similarity",
    "retrain_or_expand",
    "route_instruction",
    "tfidf_cosine",
    "tfidf_tokens",
]

EMAWeightFn = Callable[[Tensor, Tensor, Tensor, Tensor, Any], float]
EMA_WEIGHTS: Registry[EMAWeightFn] = Registry("ema_weight")
ApplyTo = Literal["new", "old"]


# ------------------------------------------------------------------------------------------------ EMA
@dataclass(frozen=True)
class DynamicEMAArgs:
    """LCIA's defaults: scale s = 2.0 (the reference code's factor 2), fallback weight 0.01."""

    scale: float = 2.0
    fallback: float = 0.01
    needs_grad: ClassVar[bool] = True  # reads |g| and |g - g_prev|: gradients must be real at the hook

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise ValueError(f"scale must be > 0, got {self.scale!r}")
        if not 0 < self.fallback <= 1:
            raise ValueError(f"fallback must be in (0, 1], got {self.fallback!r}")


@dataclass(frozen=True)
class FixedEMAArgs:
    """A constant weight on the new weights (0.01: the usual decay 0.99; 0.75: I-LoRA's lambda = 0.25)."""

    weight: float = 0.01
    needs_grad: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not 0 < self.weight <= 1:
            raise ValueError(f"weight must be in (0, 1], got {self.weight!r}")


def _l1(x: Tensor) -> float:
    """|x|_1 accumulated in float64 (a bf16 sum over a LoRA matrix would lose most of its digits)."""
    return float(torch.linalg.vector_norm(x.detach(), ord=1, dtype=torch.float64))


def dynamic_ema_weight(theta: Tensor, ema: Tensor, grad: Tensor, prev_grad: Tensor, scale: float = 2.0,
                       fallback: float = 0.01) -> float:
    """LCIA's per-tensor balance weight (Qiao et al. 2025, Eq. 9 with the reference code's constants).

    With L1 norms over the whole tensor (any shape, all four the same shape):

        a = |theta - theta*|_1,   b = |g|_1,   c = |g - g_prev|_1,   w = s (1 + b) / (a c).

    If w is not finite (a or c is 0) or not in the open interval (0, 1), w = ``fallback``. ``theta`` are the
    weights after the optimizer step, ``theta*`` the EMA before this update, ``g`` this step's gradient and
    ``g_prev`` the previous step's (the paper's first- and second-order terms: b approximates L', c L'').
    Differs from ``fixed`` in that w follows the loss landscape: large moves away from the EMA or fast-changing
    gradients shrink w (stability), a flat region lets the EMA follow the live weights (plasticity).
    """
    if not (theta.shape == ema.shape == grad.shape == prev_grad.shape):
        raise ValueError(f"shapes differ: theta {tuple(theta.shape)}, ema {tuple(ema.shape)}, "
                         f"grad {tuple(grad.shape)}, prev_grad {tuple(prev_grad.shape)}")
    a = _l1(theta.float() - ema.float())
    b = _l1(grad)
    c = _l1(grad.float() - prev_grad.float())
    denominator = a * c
    w = scale * (1.0 + b) / denominator if denominator > 0 else math.inf
    return float(w) if math.isfinite(w) and 0.0 < w < 1.0 else float(fallback)


@EMA_WEIGHTS.register("dynamic", args=DynamicEMAArgs)
def dynamic(theta: Tensor, ema: Tensor, grad: Tensor, prev_grad: Tensor, args: DynamicEMAArgs) -> float:
    """Registry entry for ``dynamic_ema_weight``."""
    return dynamic_ema_weight(theta, ema, grad, prev_grad, args.scale, args.fallback)


@EMA_WEIGHTS.register("fixed", args=FixedEMAArgs)
def fixed(theta: Tensor, ema: Tensor, grad: Tensor, prev_grad: Tensor, args: FixedEMAArgs) -> float:
    """A constant weight on the new weights, whatever the tensors (fixed-EMA LoRA; I-LoRA with 1 - lambda)."""
    return float(args.weight)


def ema_update(ema: Tensor, theta: Tensor, w: float, apply_to: ApplyTo = "new") -> Tensor:
    """One EMA step: ``apply_to="new"`` (the reference code, default) theta* <- (1 - w) theta* + w theta;
    ``"old"`` (the paper's reading, w weights the old EMA) theta* <- w theta* + (1 - w) theta.

    Shapes: ``ema`` and ``theta`` alike, any shape; returns a new tensor in ``ema``'s dtype (the inputs are
    not modified). The products are formed as in the reference (``ema * (1 - w) + theta * w``).
    """
    if ema.shape != theta.shape:
        raise ValueError(f"ema {tuple(ema.shape)} and theta {tuple(theta.shape)} differ in shape")
    if not 0.0 <= w <= 1.0:
        raise ValueError(f"EMA weight must be in [0, 1], got {w!r}")
    if apply_to == "new":
        keep, take = 1.0 - w, w
    elif apply_to == "old":
        keep, take = w, 1.0 - w
    else:
        raise ValueError(f"apply_to must be 'new' or 'old', got {apply_to!r}")
    return ema * keep + theta.detach().to(ema.dtype) * take


def ilora_interpolate(slow: Tensor, fast: Tensor, lam: float = 0.25) -> Tensor:
    """I-LoRA's slow learner (Ren et al. 2024, Eq. 4): theta_slow <- lambda theta_slow + (1 - lambda) theta_fast.

    The same step as ``ema_update(slow, fast, 1 - lambda)`` (the fixed EMA with w = 1 - lambda on the new
    weights); the reference code uses lambda = 0.25 after every optimizer step.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must be in [0, 1], got {lam!r}")
    return slow * lam + fast.detach().to(slow.dtype) * (1.0 - lam)


def hidden_consistency(fast: Sequence[Tensor], slow: Sequence[Tensor], mask: Tensor) -> Tensor:
    """I-LoRA's consistency regulariser (Ren et al. 2024, Eq. 5): the mean squared difference between the fast
    (live) and slow (EMA) weights' hidden states on replayed rows, over real tokens and every layer.

    ``fast[l]``, ``slow[l]``: ``[B, T, H]`` for each layer l (the model's ``hidden_states``); ``mask [B, T]`` is 1
    on real tokens. Gradients flow through ``fast`` only. The reference code also takes an element-wise max of
    the two first; this is the paper's plain MSE.
    """
    if len(fast) != len(slow) or not fast:
        raise ValueError(f"need the same non-zero number of layers, got {len(fast)} and {len(slow)}")
    weights = mask.to(fast[0].dtype).unsqueeze(-1)
    count = weights.sum() * fast[0].shape[-1]
    if count == 0:
        return fast[0].sum() * 0.0
    total = sum((((f - s.detach()) ** 2) * weights).sum() for f, s in zip(fast, slow, strict=True))
    return total / (count * len(fast))


# ------------------------------------------------------------------------------ instruction similarity
# scikit-learn's English stop-word list (sklearn.feature_extraction.text.ENGLISH_STOP_WORDS, from the Glasgow
# Information Retrieval Group), which LCIA's LoRASelect.py uses through TfidfVectorizer(stop_words="english").
ENGLISH_STOP_WORDS: frozenset[str] = frozenset("""
a about above across after afterwards again against all almost alone along already also although always am among
amongst amoungst amount an and another any anyhow anyone anything anyway anywhere are around as at back be became
because become becomes becoming been before beforehand behind being below beside besides between beyond bill both
bottom but by call can cannot cant co con could couldnt cry de describe detail do done down due during each eg eight
either eleven else elsewhere empty enough etc even ever every everyone everything everywhere except few fifteen fifty
fill find fire first five for former formerly forty found four from front full further get give go had has hasnt
have he hence her here hereafter hereby herein hereupon hers herself him himself his how however hundred i ie if in
inc indeed interest into is it its itself keep last latter latterly least less ltd made many may me meanwhile might
mill mine more moreover most mostly move much must my myself name namely neither never nevertheless next nine no
nobody none noone nor not nothing now nowhere of off often on once one only onto or other others otherwise our ours
ourselves out over own part per perhaps please put rather re same see seem seemed seeming seems serious several she
should show side since sincere six sixty so some somehow someone something sometime sometimes somewhere still such
system take ten than that the their them themselves then thence there thereafter thereby therefore therein
thereupon these they thick thin third this those though three through throughout thru thus to together too top
toward towards twelve twenty two un under until up upon us very via was we well were what whatever when whence
whenever where whereafter whereas whereby wherein whereupon wherever whether which while whither who whoever whole
whom whose why will with within without would yet you your yours yourself yourselves
""".split())

_TOKEN = re.compile(r"(?u)\b\w\w+\b")  # TfidfVectorizer's default token_pattern
Reduce = Literal["mean_pairs", "best_match"]


def tfidf_tokens(text: str, stop_words: frozenset[str] = ENGLISH_STOP_WORDS) -> list[str]:
    """Lower-cased word tokens of two or more characters, stop words removed (TfidfVectorizer's analyzer)."""
    return [t for t in _TOKEN.findall(text.lower()) if t not in stop_words]


def tfidf_cosine(a: str, b: str, stop_words: frozenset[str] = ENGLISH_STOP_WORDS) -> float:
    """Cosine similarity of two texts' TF-IDF vectors, the TF-IDF fitted on the pair alone (as LCIA's
    LoRASelect.py refits ``TfidfVectorizer(stop_words="english")`` for every pair).

    tf = raw counts; idf(t) = ln((1 + n) / (1 + df(t))) + 1 with n = 2 documents (scikit-learn's smoothed idf);
    each vector L2-normalised. A text with no token left scores 0 against anything. Equals
    ``cosine_similarity(TfidfVectorizer(stop_words="english").fit_transform([a, b]))[0, 1]``.
    """
    ta, tb = Counter(tfidf_tokens(a, stop_words)), Counter(tfidf_tokens(b, stop_words))
    if not ta or not tb:
        return 0.0
    idf = {t: math.log(3.0 / (1.0 + (t in ta) + (t in tb))) + 1.0 for t in ta.keys() | tb.keys()}
    va = {t: n * idf[t] for t, n in ta.items()}
    vb = {t: n * idf[t] for t, n in tb.items()}
    dot = sum(v * vb[t] for t, v in va.items() if t in vb)
    norm = math.sqrt(sum(v * v for v in va.values())) * math.sqrt(sum(v * v for v in vb.values()))
    return min(1.0, dot / norm)


def instruction_set_similarity(new: Sequence[str], old: Sequence[str], reduce: Reduce = "mean_pairs",
                               stop_words: frozenset[str] = ENGLISH_STOP_WORDS) -> float:
    """Similarity of two instruction sets.

    ``mean_pairs`` (LCIA, default): the mean of ``tfidf_cosine`` over all |new| x |old| pairs. Two identical
    sets of one instruction score 1; identical sets of several dissimilar instructions score less than 1
    (every cross pair counts). ``best_match``: the mean over ``new`` of its best cosine against ``old``, which
    is 1 for any set contained in ``old``.
    """
    if not new or not old:
        raise ValueError("instruction sets must not be empty")
    if reduce == "mean_pairs":
        return sum(tfidf_cosine(a, b, stop_words) for a in new for b in old) / (len(new) * len(old))
    if reduce == "best_match":
        return sum(max(tfidf_cosine(a, b, stop_words) for b in old) for a in new) / len(new)
    raise ValueError(f"reduce must be 'mean_pairs' or 'best_match', got {reduce!r}")


def retrain_or_expand(new: Sequence[str], groups: Sequence[Sequence[str]], threshold: float = 0.9,
                      reduce: Reduce = "mean_pairs") -> tuple[int | None, list[float]]:
    """LCIA's retrain-or-expand decision for a new task with instruction set ``new``.

    ``groups[k]`` is the k-th adapter group's instruction codebook. Returns (k, similarities): k is the first
    group with the highest similarity when that is >= ``threshold`` (retrain that group's adapter), None when
    no group reaches it or there is none (open a new adapter). Groups never outnumber tasks: a task opens at
    most one group.
    """
    sims = [instruction_set_similarity(new, g, reduce) for g in groups]
    if not sims:
        return None, sims
    best = max(range(len(sims)), key=lambda k: (sims[k], -k))
    return (best if sims[best] >= threshold else None), sims


def route_instruction(candidates: Sequence[str], groups: Sequence[Sequence[str]], threshold: float = 0.9,
                      reduce: Reduce = "mean_pairs") -> tuple[int, float]:
    """Per-instance routing: the adapter group whose instructions match the instance best.

    ``candidates`` are the instance's possible instruction lines (its prompt's lines); the instance's
    similarity to group k is the highest ``instruction_set_similarity([line], groups[k])`` over them.
    Returns (k, similarity): the best group when its similarity is >= ``threshold``, else the newest group
    (``len(groups) - 1``), LCIA's rule for an instruction no group knows.
    """
    if not groups:
        raise ValueError("no adapter group to route to")
    lines = [c for c in candidates if tfidf_tokens(c)] or [""]
    sims = [max(instruction_set_similarity([line], g, reduce) for line in lines) for g in groups]
    best = max(range(len(sims)), key=lambda k: (sims[k], -k))
    return (best, sims[best]) if sims[best] >= threshold else (len(groups) - 1, sims[best])
