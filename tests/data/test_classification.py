"""Classification (continual tasks) and multiple-choice (MMLU-STEM) tasks: loading, prompts, tricky answers."""

from __future__ import annotations

import json

import pytest

from posttrain.data import TASKS, get_task
from posttrain.data.classification import find_label
from posttrain.data.multiple_choice import extract_choice

AMAZON = ["very negative", "negative", "neutral", "positive", "very positive"]


@pytest.mark.parametrize("text, expected", [
    ("very negative", "very negative"),            # not the shorter "negative" inside it
    ("It is negative, not very positive", "negative"),  # the earliest label wins
    ("NEUTRAL.", "neutral"),                       # case-insensitive, punctuation around
    ("The review is Positive!", "positive"),
    ("positively glowing", None),                  # word boundaries: no label inside a word
    ("", None),
])
def test_find_label_tricky(text, expected):
    assert find_label(text, AMAZON) == expected


def test_find_label_true_false():
    assert find_label("False. The passage says otherwise; true for Manhattan", ["True", "False"]) == "False"


def test_classification_task_loads_continual_folder(shared_data):
    task = get_task("classification")
    ds = task.load(path=shared_data / "continual" / "agnews", limit=4)
    labels = json.loads((shared_data / "continual" / "agnews" / "labels.json").read_text())
    assert len(ds) == 4 and ds[0]["id"] == "agnews-0" and all(a in labels for a in ds["answer"])
    content = ds[0]["prompt"][-1]["content"]
    assert content.endswith("Answer with one of these labels: World, Sports, Business, Science or Technology.")
    gold = ds[0]["answer"]
    assert task.score(f"I would say {gold}.", gold) == 1.0
    other = next(x for x in labels if x != gold)
    assert task.score(f"{other}", gold) == 0.0
    train = task.load(split="train", path=shared_data / "continual" / "agnews", limit=2)
    assert len(train) == 2


def test_classification_errors(tmp_path):
    (tmp_path / "test.jsonl").write_text(json.dumps({"sentence": "x", "label": "maybe"}) + "\n")
    (tmp_path / "labels.json").write_text('["yes", "no"]')
    with pytest.raises(ValueError, match=r"test.jsonl:1: label 'maybe' is not one of \['yes', 'no'\]"):
        get_task("classification").load(path=tmp_path)
    with pytest.raises(TypeError, match="'labels' must be a non-empty list"):
        get_task("classification", labels="yes")
    with pytest.raises(ValueError, match="needs path="):
        get_task("classification").load()
    task = get_task("classification", labels=["yes", "no"], instruction=" Say {labels} in \\boxed{}.")
    assert task.messages("Q?")[0]["content"] == "Q? Say yes, no in \\boxed{}."


@pytest.mark.parametrize("text, expected", [
    ("B", "B"),
    ("(C) because ...", "C"),
    ("A frog is an amphibian, so the answer is D.", "D"),   # the article "A" is not an answer
    ("The answer is (b)", "B"),
    ("Answer: C", "C"),
    ("\\boxed{\\text{A}}", "A"),
    ("I think it's option E.", None),                        # only A-D exist
    ("Both A) and B) look plausible but B) is right", "B"),
    ("no idea", None),
])
def test_extract_choice_tricky(text, expected):
    assert extract_choice(text, 4) == expected


def test_extract_choice_by_quoted_option():
    assert extract_choice("It must be increase the mortality rate", 4,
                          ["maintain it", "zero control", "reduce K", "increase the mortality rate"]) == "D"


def test_mmlu_stem_loads_and_grades(benchmarks_dir):
    assert {"mmlu_stem", "multiple_choice", "classification"} <= set(TASKS)
    task = get_task("mmlu_stem")
    ds = task.load(path=benchmarks_dir, limit=3)
    assert len(ds) == 3 and ds[0]["answer"] == "C"  # the first row's answer index is 2
    content = ds[0]["prompt"][0]["content"]
    assert "\n\nA. maintain the population" in content and "\nD. increase the mortality rate" in content
    assert "### choices ###" not in content
    assert content.endswith("Answer with the letter of the correct option.")
    assert task.score("The answer is C.", "C") == 1.0 and task.score("A frog", "C") == 0.0
    biology = get_task("mmlu_stem", subjects=["college_physics"]).load(path=benchmarks_dir, limit=2)
    assert len(biology) == 2


def test_multiple_choice_bad_rows(tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 5}) + "\n")
    with pytest.raises(ValueError, match=r"mc.jsonl:1: answer must be an option index 0..1"):
        get_task("multiple_choice").load(path=path)
