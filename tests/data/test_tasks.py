"""Task registry, prompt formatting and the math benchmark loaders (posttrain.data)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import pytest

from posttrain.data import TASKS, Task, format_prompt, get_task
from posttrain.data.sources import read_jsonl, stringify_answer

MATH_TASKS = {"gsm8k": 1319, "math500": 500, "aime24": 30, "amc23": 40}


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_registry_names() -> None:
    assert {"gsm8k", "math500", "aime24", "amc23", "arithmetic"} <= set(TASKS)
    for name, cls in TASKS.items():
        assert issubclass(cls, Task) and cls.name == name


def test_unknown_task_suggests() -> None:
    with pytest.raises(KeyError, match="Did you mean 'gsm8k'"):
        get_task("gsm8kk")


@pytest.mark.parametrize("name", ["gsm8k", "arithmetic"])
def test_unknown_option_names_option_and_task(name: str) -> None:
    with pytest.raises(TypeError, match=f"{name}.*'colour'"):
        get_task(name, colour="blue")


def test_system_prompt_and_instruction_options() -> None:
    task = get_task("math500", system_prompt="Think step by step.", instruction=" Answer:")
    assert task.messages("1+1?") == [
        {"role": "system", "content": "Think step by step."},
        {"role": "user", "content": "1+1? Answer:"},
    ]
    plain = get_task("math500")
    assert plain.messages("1+1?") == [{"role": "user", "content": "1+1?\nPut the final answer in \\boxed{}."}]
    with pytest.raises(TypeError, match="system_prompt"):
        get_task("gsm8k", system_prompt=3)


class TemplateTokenizer:
    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool, add_generation_prompt: bool) -> str:
        assert tokenize is False and add_generation_prompt is True
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


class BareTokenizer:
    chat_template = None


def test_format_prompt() -> None:
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    assert format_prompt(TemplateTokenizer(), msgs) == "<system>S<user>Q<assistant>"
    assert format_prompt(BareTokenizer(), msgs) == "S\n\nQ"
    assert format_prompt(None, "raw text") == "raw text"


def test_stringify_answer() -> None:
    assert stringify_answer(27.0, "x") == "27"
    assert stringify_answer(2.5, "x") == "2.5"
    assert stringify_answer(" 025 ", "x") == "025"
    with pytest.raises(ValueError, match="x: empty answer"):
        stringify_answer("  ", "x")
    with pytest.raises(ValueError, match="x: answer must be"):
        stringify_answer([1], "x")


# --- the shared benchmark files (skipped when ../shared/data is absent) ---


@pytest.mark.parametrize(("name", "rows"), sorted(MATH_TASKS.items()))
def test_benchmark_loads_from_dir(benchmarks_dir: Path, name: str, rows: int) -> None:
    task = get_task(name)
    ds = task.load(path=benchmarks_dir)
    assert isinstance(ds, datasets.Dataset)
    assert len(ds) == rows
    assert set(ds.column_names) == {"prompt", "answer", "id"}
    assert len(set(ds["id"])) == rows and all(i.startswith(f"{name}-") for i in ds["id"][:5])
    first = ds[0]
    assert first["prompt"][-1]["role"] == "user"
    assert first["prompt"][-1]["content"].endswith("\nPut the final answer in \\boxed{}.")
    for gold in ds["answer"][:20]:
        assert gold and gold == gold.strip()
        assert task.score(f"Reasoning... so the answer is \\boxed{{{gold}}}.", gold) == 1.0
        assert task.score("Reasoning... so the answer is \\boxed{123456789}.", gold) == 0.0


def test_benchmark_known_golds(benchmarks_dir: Path) -> None:
    golds = {name: get_task(name).load(path=benchmarks_dir, limit=3)["answer"] for name in MATH_TASKS}
    assert golds["gsm8k"] == ["18", "3", "70000"]  # "#### 70,000"-style markers stripped of commas
    assert golds["amc23"] == ["27", "36", "45"]  # stored as floats 27.0, ...
    assert golds["aime24"] == ["204", "113", "371"]
    assert golds["math500"][0] == "\\left( 3, \\frac{\\pi}{2} \\right)"


def test_benchmark_math_verify_golds(benchmarks_dir: Path) -> None:
    # Equivalent but differently written answers go through math-verify, not string equality.
    task = get_task("math500")
    golds = task.load(path=benchmarks_dir, limit=3)["answer"]
    assert task.score("\\boxed{(3, \\pi/2)}", golds[0]) == 1.0
    assert task.score("\\boxed{\\frac{14}{3}}", golds[2]) == 1.0 and golds[2] == "\\frac{14}{3}"
    assert task.score("\\boxed{14/3}", golds[2]) == 1.0
    assert task.score("\\boxed{4.6}", golds[2]) == 0.0


def test_dir_and_file_paths_agree(benchmarks_dir: Path) -> None:
    task = get_task("aime24")
    from_dir = task.load(path=benchmarks_dir)
    from_file = task.load(path=benchmarks_dir / "aime24.jsonl")
    assert from_dir.to_list() == from_file.to_list()
    assert len(task.load(path=str(benchmarks_dir), limit=7)) == 7


def test_reward_funcs_score_dataset(benchmarks_dir: Path) -> None:
    task = get_task("gsm8k")
    ds = task.load(path=benchmarks_dir, limit=4)
    (accuracy,) = task.reward_funcs()
    assert accuracy.__name__ == "accuracy"
    completions = [[{"role": "assistant", "content": f"#### {a}"}] for a in ds["answer"]]
    completions[1] = [{"role": "assistant", "content": "#### 999999"}]
    assert accuracy(ds["prompt"], completions, answer=ds["answer"], id=ds["id"]) == [1.0, 0.0, 1.0, 1.0]


# --- synthetic files: malformed rows, field mapping, paths ---


def test_missing_file_and_dir(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="gsm8k.jsonl"):
        get_task("gsm8k").load(path=tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        get_task("gsm8k").load(path=tmp_path / "nope.jsonl")


def test_bad_json_names_file_and_line(tmp_path: Path) -> None:
    good = json.dumps({"problem": "1+1?", "answer": "2"})
    path = write_lines(tmp_path / "mine.jsonl", [good, "", good, '{"problem": "oops", '])
    with pytest.raises(ValueError, match=r"mine\.jsonl:4: invalid JSON"):
        get_task("math500").load(path=path)
    assert len(get_task("math500").load(path=path, limit=2)) == 2  # the bad line is never reached


@pytest.mark.parametrize(
    ("name", "row", "message"),
    [
        ("math500", {"problem": "1+1?"}, "missing field 'answer'"),
        ("amc23", {"answer": 3.0}, "missing field 'problem' or 'question'"),
        ("gsm8k", {"question": "q", "answer": "no marker 5"}, "no '#### N' marker"),
        ("aime24", {"problem": "q", "answer": ""}, "empty answer"),
        ("math500", ["not", "an", "object"], "expected a JSON object"),
    ],
)
def test_malformed_row_names_file_and_line(tmp_path: Path, name: str, row: Any, message: str) -> None:
    ok = {"problem": "p", "question": "q", "answer": "#### 1"}
    path = write_lines(tmp_path / "data.jsonl", [json.dumps(ok), json.dumps(ok), json.dumps(row)])
    with pytest.raises(ValueError, match=rf"data\.jsonl:3: .*{message}"):
        get_task(name).load(path=path)


def test_gsm8k_mapping_from_local_file(tmp_path: Path) -> None:
    rows = [
        {"question": "How many?", "answer": "Work <<1+1=2>>\n#### 1,234"},
        {"question": "Owe?", "answer": "#### -5"},
    ]
    write_lines(tmp_path / "gsm8k.jsonl", [json.dumps(r) for r in rows])
    ds = get_task("gsm8k").load(path=tmp_path)
    assert ds["answer"] == ["1234", "-5"]
    assert ds["id"] == ["gsm8k-0", "gsm8k-1"]
    assert ds["prompt"][0] == [{"role": "user", "content": "How many?\nPut the final answer in \\boxed{}."}]
    task = get_task("gsm8k")
    assert task.score("it is 1,234", "1234") == 1.0
    assert task.score("\\boxed{-5}", "-5") == 1.0 and task.score("\\boxed{5}", "-5") == 0.0


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "amc23.jsonl", [""])
    with pytest.raises(ValueError, match="no rows"):
        get_task("amc23").load(path=path)
    assert len(get_task("amc23").load(path=path, limit=0)) == 0


def test_read_jsonl_skips_blank_lines_only(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "x.jsonl", ['{"a": 1}', "  ", '{"a": 2}'])
    assert [(where.rsplit(":", 1)[1], i, row) for where, i, row in read_jsonl(path)] == [
        ("1", 0, {"a": 1}),
        ("3", 1, {"a": 2}),
    ]


HUB = {
    "gsm8k": ("openai/gsm8k", "main", "test", {"question": "q", "answer": "x\n#### 7"}),
    "math500": ("HuggingFaceH4/MATH-500", None, "test", {"problem": "q", "answer": "7", "unique_id": "u"}),
    "aime24": ("HuggingFaceH4/aime_2024", None, "train", {"problem": "q", "answer": "7", "id": 60}),
    "amc23": ("math-ai/amc23", None, "test", {"question": "q", "answer": 7.0, "id": 0}),
}


@pytest.mark.parametrize("name", sorted(HUB))
def test_default_source_is_the_hub(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    hub_id, config, split, row = HUB[name]
    calls: list[tuple[Any, ...]] = []

    def fake_load_dataset(path: str, name: str | None = None, split: str | None = None) -> list[dict[str, Any]]:
        calls.append((path, name, split))
        return [row, row, row]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = get_task(name).load(limit=2)
    assert calls == [(hub_id, config, split)]
    assert len(ds) == 2 and ds["answer"] == ["7", "7"]
    get_task(name).load(split="test")  # "test" (what evaluation asks for) reaches each benchmark's eval split
    assert calls[-1] == (hub_id, config, split)
