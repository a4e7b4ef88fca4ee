"""Own data without Python: the `custom` task (files, column mapping, templates, chat prompts, graders, fraction),
`mixture`, rewards by import path, and the same task in a recipe and an eval suite."""

from __future__ import annotations

import json
import sys

import pytest

from posttrain.data import get_task
from posttrain.rewards import get_reward


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_svamp_through_a_template_and_math_grading(benchmarks_dir):
    task = get_task("custom", template="{Body} {Question}", answer_field="Answer", id_field="ID",
                    instruction=" Put the final answer in \\boxed{}.")
    ds = task.load(path=benchmarks_dir / "svamp.jsonl", limit=5)
    row = ds[0]
    assert row["id"] == "svamp-chal-777" and row["answer"] == "145"
    assert row["prompt"] == [{"role": "user", "content": "There are 87 oranges and 290 bananas in Philip's collection. "
                              "If the bananas are organized into 2 groups and oranges are organized into 93 groups "
                              "How big is each group of bananas? Put the final answer in \\boxed{}."}]
    assert task.score("290 / 2 = \\boxed{145}", "145") == 1.0 and task.score("It is 146.", "145") == 0.0
    assert len(task.load(path=benchmarks_dir / "svamp.jsonl")) == 1000


def test_chat_prompts_exact_and_regex_graders_and_fraction(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": f"Capital of country {i}?"}], "target": f"City {i}", "id": i}
            for i in range(40)]
    path = _jsonl(tmp_path / "chat.jsonl", rows)
    task = get_task("custom", answer_field="target", grader="exact", system_prompt="Be brief.", instruction=" One word.")
    ds = task.load(path=path)
    assert ds[0]["prompt"] == [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "Capital of country 0? One word."}]
    assert task.score("  city 0. ", "City 0") == 1.0 and task.score("City 01", "City 0") == 0.0
    regex = get_task("custom", answer_field="target", grader="exact", answer_regex=r"ANSWER:\s*(.+)")
    assert regex.score("thinking... ANSWER: no\nANSWER: City 3", "City 3") == 1.0
    assert regex.score("City 3", "City 3") == 0.0  # no match: no answer
    half = get_task("custom", answer_field="target", grader="exact", fraction=0.5, seed=1).load(path=path)
    again = get_task("custom", answer_field="target", grader="exact", fraction=0.5, seed=1).load(path=path)
    assert 10 < len(half) < 30 and half["id"] == again["id"]  # seeded, order kept
    labels = get_task("custom", question_field="text", answer_field="y", grader="label", labels=["yes", "no"])
    assert labels.score("I think no, not yes", "no") == 1.0


def test_parquet_and_csv(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"q": "1+1?", "a": 2}, {"q": "2+2?", "a": 4}]).to_parquet(str(tmp_path / "d.parquet"))
    (tmp_path / "d.csv").write_text("q,a\n1+1?,2\n2+2?,4\n")
    for name in ("d.parquet", "d.csv"):
        ds = get_task("custom", question_field="q", answer_field="a").load(path=tmp_path / name)
        assert ds["answer"] == ["2", "4"] and ds[1]["prompt"][0]["content"] == "2+2?"


@pytest.mark.parametrize("options, rows, message", [
    ({"question_field": "q"}, [{"question": "x", "answer": 1}], r"d.jsonl:1: missing field 'q'"),
    ({"template": "{Body} {Q}"}, [{"Body": "x", "answer": 1}], r"d.jsonl:1: template names column 'Q'"),
    ({}, [{"question": "x"}, {"question": "y"}], r"d.jsonl:1: missing field 'answer' or 'solution'"),
    ({"grader": "label", "labels": ["a", "b"]}, [{"question": "x", "answer": "c"}], r"label 'c' is not one of"),
    ({"messages_field": "chat"}, [{"chat": "hi", "answer": 1}], r"'chat' must be a list of chat messages"),
    ({}, [{"question": "  ", "answer": 1}], r"the question must be a non-empty string"),
])
def test_bad_rows_name_file_and_line(tmp_path, options, rows, message):
    path = _jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(ValueError, match=message):
        get_task("custom", **options).load(path=path)


@pytest.mark.parametrize("options, message", [
    ({"grader": "fuzzy"}, "'grader' must be one of math, exact, label"),
    ({"grader": "label"}, "'labels'"),
    ({"template": "{a", "question_field": None}, "not a valid format string"),
    ({"answer_regex": "(unclosed"}, "not a valid regular expression"),
    ({"fraction": 1.5}, "'fraction' must be in"),
    ({"template": "{a}", "question_field": "q"}, "exclude each other"),
])
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        get_task("custom", **options)


def test_unknown_file_kind_and_missing_file(tmp_path):
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(ValueError, match="not a .jsonl, .json, .parquet or .csv"):
        get_task("custom").load(path=tmp_path / "d.txt")
    with pytest.raises(FileNotFoundError, match="no data file"):
        get_task("custom").load(path=tmp_path / "absent.jsonl")


def test_mixture_draws_by_weight_and_needs_one_grader(tmp_path, benchmarks_dir):
    svamp = {"task": "custom", "path": str(benchmarks_dir / "svamp.jsonl"), "weight": 3,
             "options": {"template": "{Body} {Question}", "answer_field": "Answer"}}
    gsm = {"task": "gsm8k", "path": str(benchmarks_dir), "weight": 1}
    ds = get_task("mixture", sources=[gsm, svamp], size=40, seed=2).load()
    ids = ds["id"]
    assert len(ids) == 40 and sum(i.startswith("svamp") for i in ids) == 30 and len(set(ids)) == 40
    assert ds["id"] == get_task("mixture", sources=[gsm, svamp], size=40, seed=2).load()["id"]
    with pytest.raises(ValueError, match="grade differently"):
        get_task("mixture", sources=[gsm, {"task": "custom", "options": {"grader": "exact"}}])
    with pytest.raises(ValueError, match=r"sources\[1\]: 'weight' must be a positive number"):
        get_task("mixture", sources=[gsm, {**svamp, "weight": -1}])
    with pytest.raises(ValueError, match=r"sources\[0\] \(gsm8k\) has 1319 rows, fewer than the 2000"):
        get_task("mixture", sources=[gsm, svamp], size=8000).load()
    with pytest.raises(ValueError, match="at least two"):
        get_task("mixture", sources=[gsm])


def test_reward_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def length_penalty(prompts, completions, scale=1.0, **kwargs):\n"
        "    return [-scale * len(c) for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = get_reward("my_rewards:length_penalty", None, scale=0.5)
    assert fn(None, ["ab", "abcd"]) == [-1.0, -2.0] and fn.__name__ == "length_penalty"
    with pytest.raises(ValueError, match=r"cannot import module 'no_such_module'"):
        get_reward("no_such_module:f")
    with pytest.raises(ValueError, match=r"has no 'length_penality'. Did you mean 'length_penalty'"):
        get_reward("my_rewards:length_penality")
    sys.modules.pop("my_rewards", None)


def test_recipe_with_custom_data_and_an_import_path_reward(tmp_path, benchmarks_dir, monkeypatch):
    """The recipe form: a bad reward path fails before the model loads, naming the entry; a good one trains."""
    import posttrain.models as models
    from posttrain.recipe import RecipeError, load_recipe
    from posttrain.train import run_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
method: grpo
model: {{name_or_path: tiny-qwen2}}
data:
  train:
    task: custom
    path: {benchmarks_dir / "svamp.jsonl"}
    limit: 16
    options: {{template: "{{Body}} {{Question}}", answer_field: Answer}}
rewards: [accuracy, {{name: "my_rewards:length_penalty", weight: 0.1, options: {{scale: 0.01}}}}]
rollout: {{num_generations: 4, max_new_tokens: 6}}
trainer: {{max_steps: 1, per_device_train_batch_size: 8}}
output_dir: {tmp_path / "run"}
""")
    (tmp_path / "my_rewards.py").write_text(
        "def length_penalty(prompts, completions, scale=1.0, **kwargs):\n"
        "    return [-scale * len(str(c)) for c in completions]\n")
    bad = load_recipe(recipe, ["rewards.1.name=my_rewards:nope"])
    real_load = models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("model loaded before the reward check"))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RecipeError, match=r"rewards\[1\] \(my_rewards:nope\): reward 'my_rewards:nope': module"):
        run_recipe(bad)
    assert not (tmp_path / "run").exists()  # nothing written before the checks
    monkeypatch.setattr(models, "load_model", real_load)
    result = run_recipe(load_recipe(recipe))
    history = json.loads((tmp_path / "run" / "trainer_state.json").read_text())["log_history"]
    assert "rewards/length_penalty/mean" in history[0] and result.summary["steps"] == 1
    sys.modules.pop("my_rewards", None)


def test_custom_task_in_an_eval_suite(tmp_path, benchmarks_dir):
    from posttrain.eval.harness import evaluate_suite
    from posttrain.eval.suite import suite_from_dict

    suite = suite_from_dict({"name": "own", "sampling": {"n": 1, "temperature": 0.0, "max_new_tokens": 4}, "tasks": [
        {"name": "svamp", "task": "custom", "path": str(benchmarks_dir / "svamp.jsonl"), "limit": 3,
         "options": {"template": "{Body} {Question}", "answer_field": "Answer"}}]})

    class Echo:
        def generate(self, prompts, sampling):
            from posttrain.rollout.base import Completion, GenerationOutput

            return [GenerationOutput(prompt=p, prompt_token_ids=[1], completions=[
                Completion(token_ids=[1], text="\\boxed{145}", finish_reason="stop")]) for p in prompts]

    res = evaluate_suite(Echo(), None, suite, tmp_path / "out", progress=False)
    assert res["tasks"]["svamp"]["metrics"]["n_prompts"] == 3
    assert res["tasks"]["svamp"]["metrics"]["accuracy"] == pytest.approx(1 / 3)  # only the first answer is 145
