"""`posttrain data benchmarks`: the offline benchmark folder from the Hub (the Hub is replaced by local rows here)."""

from __future__ import annotations

import json

import datasets
import pytest

from posttrain.cli import main
from posttrain.data import get_task


def test_export_writes_rows_the_tasks_read_back(tmp_path, monkeypatch, benchmarks_dir):
    rows = {"openai/gsm8k": [json.loads(x) for x in (benchmarks_dir / "gsm8k.jsonl").read_text().splitlines()[:5]],
            "cais/mmlu": [{"question": "q", "choices": ["a", "b", "c", "d"], "answer": 1, "subject": s}
                          for s in ("anatomy", "high_school_history", "astronomy")]}
    asked = []

    def fake_load(hub_id, config=None, split=None, **kw):
        asked.append((hub_id, config, split))
        return datasets.Dataset.from_list(rows[hub_id])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    with pytest.raises(SystemExit) as code:
        main(["data", "benchmarks", "--output", str(tmp_path), "--tasks", "gsm8k,mmlu_stem"])
    assert code.value.code == 0
    assert asked == [("openai/gsm8k", "main", "test"), ("cais/mmlu", "all", "test")]
    gsm = get_task("gsm8k").load(path=tmp_path)
    assert gsm["answer"] == get_task("gsm8k").load(path=benchmarks_dir, limit=5)["answer"]
    mmlu = [json.loads(x) for x in (tmp_path / "mmlu_stem.jsonl").read_text().splitlines()]
    assert [r["subject"] for r in mmlu] == ["anatomy", "astronomy"]  # STEM subjects only
    with pytest.raises(SystemExit) as code:
        main(["data", "benchmarks", "--output", str(tmp_path), "--tasks", "arithmetic"])
    assert code.value.code == 2
