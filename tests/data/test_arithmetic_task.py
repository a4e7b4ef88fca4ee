"""The offline synthetic `arithmetic` task (posttrain.data.synthetic)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from posttrain.data import ArithmeticTask, export_jsonl, get_task
from posttrain.data.synthetic import evaluate

QUESTION = re.compile(r"What is (.+)\? Put the final answer in \\boxed\{\}\.")


def questions(task: ArithmeticTask, split: str, **kw: int) -> list[str]:
    return [p[-1]["content"] for p in task.load(split=split, **kw)["prompt"]]


def recompute(content: str) -> int:
    """Independent check of the gold: Python's own evaluation of the printed expression."""
    match = QUESTION.fullmatch(content)
    assert match, content
    return eval(match.group(1), {"__builtins__": {}})  # noqa: S307 - our own generated digits and + - *


def test_prompt_text_and_defaults() -> None:
    task = get_task("arithmetic")
    ds = task.load()
    assert len(ds) == 1000 and ds["id"][0] == "arithmetic-train-0"
    assert len(task.load(split="test")) == 100
    prompt = ds[0]["prompt"]
    assert len(prompt) == 1 and prompt[0]["role"] == "user"
    assert re.fullmatch(r"What is \d+ \+ \d+\? Put the final answer in \\boxed\{\}\.", prompt[0]["content"])
    assert task.example(13 + 16 * 20, "x").question == "What is 14 + 17?"
    assert task.example(13 + 16 * 20, "x").answer == "31"


def test_golds_are_right() -> None:
    for ops in ["+", "-", "*", "+-*"]:
        task = get_task("arithmetic", ops=ops, num_operands=3, min_value=-5, max_value=30, num_train=50, num_eval=50)
        for split in ("train", "test"):
            ds = task.load(split=split)
            for prompt, answer in zip(ds["prompt"], ds["answer"]):
                assert answer == str(recompute(prompt[-1]["content"]))


def test_evaluate_precedence() -> None:
    assert evaluate([2, 3, 4], ["+", "*"]) == 14
    assert evaluate([2, 3, 4], ["*", "-"]) == 2
    assert evaluate([10, 3, 2], ["-", "-"]) == 5


def test_deterministic_for_a_seed() -> None:
    a = get_task("arithmetic", seed=3)
    b = get_task("arithmetic", seed=3)
    c = get_task("arithmetic", seed=4)
    for split in ("train", "test"):
        assert a.load(split=split).to_list() == b.load(split=split).to_list()
        assert questions(a, split) != questions(c, split)
    # The held-out set depends on the seed and the space only, not on how much training data is drawn.
    assert questions(get_task("arithmetic", seed=3, num_train=5), "test") == questions(a, "test")


def test_held_out_is_disjoint_and_distinct() -> None:
    # 25 problems, 10 held out: 500 training draws would hit the test set almost surely if they could.
    task = get_task("arithmetic", min_value=1, max_value=5, num_eval=10, num_train=500)
    test, train = questions(task, "test"), questions(task, "train")
    assert len(set(test)) == 10
    assert len(train) == 500 and not set(train) & set(test)
    assert len(set(train)) == 15  # every non-held-out problem is reachable


def test_space_too_small() -> None:
    with pytest.raises(ValueError, match="holds 4 problems"):
        get_task("arithmetic", min_value=1, max_value=2, num_eval=4)
    task = get_task("arithmetic", min_value=1, max_value=2, num_eval=4, num_train=0)  # eval-only is fine
    assert len(set(questions(task, "test"))) == 4


def test_difficulty_options() -> None:
    task = get_task("arithmetic", min_value=50, max_value=99, num_operands=3, ops="-*", num_train=200)
    ops_seen: set[str] = set()
    for content in questions(task, "train"):
        expr = QUESTION.fullmatch(content).group(1)  # type: ignore[union-attr]
        tokens = expr.split(" ")
        numbers, ops = [int(t) for t in tokens[::2]], tokens[1::2]
        assert len(numbers) == 3 and all(50 <= n <= 99 for n in numbers)
        ops_seen |= set(ops)
    assert ops_seen == {"-", "*"}
    negative = get_task("arithmetic", min_value=-3, max_value=-1, num_eval=2, num_train=5)
    assert "(-" in questions(negative, "test")[0]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"min_value": 5, "max_value": 1}, "'min_value'"),
        ({"num_operands": 1}, "'num_operands'"),
        ({"ops": "+/"}, "'ops'"),
        ({"ops": ""}, "'ops'"),
        ({"num_eval": -1}, "'num_eval'"),
    ],
)
def test_bad_option_values(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=f"arithmetic.*{message}"):
        get_task("arithmetic", **options)
    with pytest.raises(TypeError, match="'seed'"):
        get_task("arithmetic", seed="zero")


def test_unknown_split() -> None:
    with pytest.raises(ValueError, match="'validation'"):
        get_task("arithmetic").load(split="validation")


@pytest.mark.parametrize(
    ("completion", "score"),
    [
        ("\\boxed{31}", 1.0),
        ("14 + 17 = 31", 1.0),  # no box: the last number counts
        ("The answer is 31.", 1.0),
        ("I think 31 or maybe 30", 0.0),
        ("\\boxed{30} although 31", 0.0),  # a box wins over the last number
        ("14 + 17 = 50", 0.0),
        ("no idea", 0.0),
    ],
)
def test_score(completion: str, score: float) -> None:
    assert get_task("arithmetic").score(completion, "31") == score


def test_export_import_round_trip(tmp_path: Path) -> None:
    task = get_task("arithmetic", ops="+-", num_train=30, num_eval=20, seed=7)
    for split in ("train", "test"):
        path = export_jsonl(task, split, tmp_path / f"{split}.jsonl")
        assert path.read_text().count("\n") == len(task.load(split=split))
        imported = get_task("arithmetic").load(path=path)
        assert imported.to_list() == task.load(split=split).to_list()
    assert len(get_task("arithmetic").load(path=tmp_path / "test.jsonl", limit=5)) == 5


def test_huge_problem_space() -> None:
    # 1000^8 * 3^7 problems: more than a Python range can take the len() of.
    task = get_task("arithmetic", min_value=1, max_value=1000, num_operands=8, ops="+-*", num_train=5, num_eval=5)
    test = questions(task, "test")
    assert len(set(test)) == 5 and not set(test) & set(questions(task, "train"))
    assert all(len(QUESTION.fullmatch(q).group(1).split(" ")) == 15 for q in test)  # type: ignore[union-attr]
