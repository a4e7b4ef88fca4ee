"""Converting O-LoRA's CL_Benchmark folders to the continual recipes' task layout."""

from __future__ import annotations

import json

import pytest

from posttrain.data import get_task
from posttrain.data.long_sequence import convert_long_sequence


def _benchmark(root):
    cb = root / "NLI" / "CB"
    cb.mkdir(parents=True)
    rows = [{"label": ["entailment", "neutral"][i % 2], "sentence": f"sentence 1: p{i}\nsentence 2: h{i}"}
            for i in range(10)]
    (cb / "train.json").write_text(json.dumps(rows))
    (cb / "test.json").write_text(json.dumps(rows[:4]))
    (cb / "labels.json").write_text('["entailment", "contradiction", "neutral"]')
    wic = root / "WiC" / "WiC"
    wic.mkdir(parents=True)
    (wic / "train.json").write_text(json.dumps([{"label": "True", "sentence": "word: a"},
                                                {"label": "False", "sentence": "word: b"}]))
    (wic / "dev.json").write_text(json.dumps([{"label": "False", "sentence": "word: c"}]))


def test_conversion_samples_rows_and_reads_back_as_a_task(tmp_path):
    _benchmark(tmp_path / "CL_Benchmark")
    done = convert_long_sequence(tmp_path / "CL_Benchmark", tmp_path / "out", train_rows=6, test_rows=3)
    assert done == ["cb", "wic"]
    train = [json.loads(x) for x in (tmp_path / "out" / "cb" / "train.jsonl").read_text().splitlines()]
    assert len(train) == 6 and set(train[0]) == {"sentence", "label"}
    assert json.loads((tmp_path / "out" / "wic" / "labels.json").read_text()) == ["True", "False"]  # from train rows
    assert len((tmp_path / "out" / "wic" / "test.jsonl").read_text().splitlines()) == 1  # dev.json as test
    again = convert_long_sequence(tmp_path / "CL_Benchmark", tmp_path / "again", train_rows=6, test_rows=3)
    assert again == done and (tmp_path / "again" / "cb" / "train.jsonl").read_text() == \
        (tmp_path / "out" / "cb" / "train.jsonl").read_text()  # the fixed seed
    ds = get_task("classification").load(split="test", path=tmp_path / "out" / "cb")
    assert len(ds) == 3


def test_conversion_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no long-sequence task"):
        convert_long_sequence(tmp_path, tmp_path / "out")
    with pytest.raises(KeyError, match="unknown long-sequence task 'xnli'"):
        convert_long_sequence(tmp_path, tmp_path / "out", tasks=["xnli"])
    bad = tmp_path / "NLI" / "CB"
    bad.mkdir(parents=True)
    (bad / "train.json").write_text('[{"label": "x"}]')
    (bad / "test.json").write_text("[]")
    with pytest.raises(ValueError, match=r"train.json: row 1 is not a \{label, sentence\} object"):
        convert_long_sequence(tmp_path, tmp_path / "out", tasks=["cb"])
