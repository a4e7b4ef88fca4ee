"""Build the offline benchmark folder once, from the Hub: `posttrain data benchmarks --output DIR` writes
`DIR/<task>.jsonl` for each registered Hub benchmark (gsm8k, math500, aime24, amc23, mmlu_stem), the rows exactly
as the Hub serves them. Every task (and `--data-dir DIR` of `posttrain eval`, `data.train.path=DIR` of a recipe)
then reads them without network: the local reader and the Hub reader see the same fields."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from posttrain.data.sources import iter_rows

__all__ = ["HUB_BENCHMARKS", "export_benchmarks"]

HUB_BENCHMARKS = ("gsm8k", "math500", "aime24", "amc23", "mmlu_stem")


def export_benchmarks(output: str | Path, tasks: Sequence[str] = HUB_BENCHMARKS, limit: int | None = None) -> dict:
    """Write `output/<task>.jsonl` for each task (its evaluation split, from the Hub); returns {task: rows}."""
    from posttrain.data import get_task

    out = Path(output).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name in tasks:
        task = get_task(name)
        hub_id = getattr(task, "hub_id", None)
        if hub_id is None:
            raise ValueError(f"task {name!r} has no Hub source to export (known: {', '.join(HUB_BENCHMARKS)})")
        split = task.default_split or "test"
        split = getattr(task, "hub_splits", {}).get(split, split)
        subjects = set(getattr(task, "subjects", None) or ())
        path = out / f"{name}.jsonl"
        n = 0
        with path.open("w", encoding="utf-8") as f:
            for _, _, row in iter_rows(name, path=None, hub_id=hub_id, hub_config=task.hub_config, split=split):
                if subjects and row.get("subject") not in subjects:
                    continue
                if limit is not None and n >= limit:
                    break
                f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
                n += 1
        counts[name] = n
    return counts
