"""Answer extractors and graders that a suite entry can name (`extractor:` / `grader:`).

The default for both is `task`: the task's own `extract_answer` and `score`, which are also its reward
in training (one grader for evaluation and training). The others let a suite grade a dataset the task
would grade differently, e.g. `extractor: boxed` + `grader: math` for a strict boxed-only score.
Graders compare the gold answer with the extracted one (gold first, as math-verify wants).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from posttrain.rewards import extract_answer, extract_boxed, last_number, math_equal

__all__ = ["EXTRACTORS", "GRADERS", "Grader", "make_grader"]


def _choice(text: str, task: Any) -> str | None:
    from posttrain.data.multiple_choice import extract_choice

    return extract_choice(text, getattr(task, "num_choices", 4))


def _norm(value: str | None) -> str:
    return " ".join(str(value).strip().lower().split()).strip(" .")


EXTRACTORS: dict[str, Callable[[str, Any], str | None]] = {
    "task": lambda text, task: task.extract_answer(text),
    "math": lambda text, task: extract_answer(text),  # box, else "#### N", else the last number
    "boxed": lambda text, task: extract_boxed(text),
    "last_number": lambda text, task: last_number(text),
    "choice": _choice,
    "raw": lambda text, task: text.strip() or None,
}

GRADERS: dict[str, Callable[[str, str | None], bool]] = {
    "task": lambda gold, pred: False,  # unused: "task" grades the text with task.score (see make_grader)
    "math": lambda gold, pred: pred is not None and math_equal(gold, pred),
    "exact": lambda gold, pred: pred is not None and _norm(gold) == _norm(pred),
    "choice": lambda gold, pred: pred is not None and pred.strip().upper() == str(gold).strip().upper(),
}

Grader = Callable[[str, str], tuple[str | None, float]]


def make_grader(task: Any, extractor: str = "task", grader: str = "task") -> Grader:
    """`fn(completion_text, gold) -> (extracted answer, score in [0, 1])` for a suite entry."""
    if extractor not in EXTRACTORS:
        raise KeyError(f"unknown extractor {extractor!r}; known: {sorted(EXTRACTORS)}")
    if grader not in GRADERS:
        raise KeyError(f"unknown grader {grader!r}; known: {sorted(GRADERS)}")
    extract = EXTRACTORS[extractor]
    if grader == "task":
        return lambda text, gold: (task.extract_answer(text), float(task.score(text, gold)))
    compare = GRADERS[grader]

    def grade(text: str, gold: str) -> tuple[str | None, float]:
        answer = extract(text, task)
        return answer, 1.0 if compare(gold, answer) else 0.0

    return grade
