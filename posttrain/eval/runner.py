"""Evaluate a model on a task with the rollout engine: generate, grade with the task's grader, summarise.

This is the single-task core that the suite harness and the training report build on.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from posttrain.eval.metrics import entropy_stats
from posttrain.rollout.base import RolloutEngine, SamplingParams


def evaluate_task(engine: RolloutEngine, tokenizer: Any, task: Any, dataset: Any, sampling: SamplingParams,
                  samples_path: str | Path | None = None) -> dict[str, Any]:
    """Accuracy (mean over all samples of all prompts) with its standard error, plus token-entropy and
    length statistics. Writes one JSON line per prompt to `samples_path` when given."""
    from posttrain.data import format_prompt

    rows = list(dataset)
    prompts = [format_prompt(tokenizer, row["prompt"]) for row in rows]
    outputs = engine.generate(prompts, sampling)
    scores: list[float] = []
    entropies: list[float] = []
    lengths: list[int] = []
    records = []
    for row, out in zip(rows, outputs, strict=True):
        texts = [c.text for c in out.completions]
        answers = [task.extract_answer(t) for t in texts]
        row_scores = [float(task.score(t, row["answer"])) for t in texts]
        scores += row_scores
        lengths += [len(c.token_ids) for c in out.completions]
        for c in out.completions:
            entropies += c.entropies or []
        records.append({"id": row.get("id"), "prompt": out.prompt, "gold": row["answer"], "completions": texts,
                        "answers": answers, "scores": row_scores})
    if samples_path is not None:
        Path(samples_path).parent.mkdir(parents=True, exist_ok=True)
        with open(samples_path, "w") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
    n = len(scores)
    accuracy = sum(scores) / n if n else math.nan
    stderr = math.sqrt(accuracy * (1 - accuracy) / (n - 1)) if n > 1 else 0.0
    result: dict[str, Any] = {"accuracy": accuracy, "accuracy_stderr": stderr, "n_prompts": len(rows),
                              "n_samples": n, "mean_length": sum(lengths) / n if n else math.nan}
    if entropies:
        result["entropy"] = entropy_stats(entropies)
    return result
