"""Suite files: the shipped suites load; mistakes are reported with the file and the key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from posttrain.eval.suite import EVAL_DIR, SuiteError, load_suite, with_overrides

SHIPPED = sorted(EVAL_DIR.glob("*.yaml"))


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return path


def test_shipped_suites_exist_and_load():
    names = {p.stem for p in SHIPPED}
    assert {"reasoning", "retention", "continual"} <= names
    for path in SHIPPED:
        suite = load_suite(path)
        assert suite.tasks and suite.source == str(path)


def test_reasoning_suite_contents_and_defaults_merge():
    suite = load_suite("reasoning")  # a name under eval/
    assert [t.name for t in suite.tasks] == ["gsm8k", "math500", "aime24", "amc23"]
    aime = suite.task("aime24")
    assert aime.sampling.n == 8 and aime.sampling.temperature == 0.6  # own n, suite temperature
    assert suite.task("gsm8k").sampling.n == 4


def test_continual_suite_is_ordered_classification():
    suite = load_suite("continual")
    assert suite.kind == "continual" and len(suite.tasks) == 10
    assert all(t.task == "classification" and t.path.startswith("../continual/") for t in suite.tasks)


def test_every_problem_reported_with_file_and_key(tmp_path):
    path = _write(tmp_path, """
name: bad
sampling: {n: 0}
tasks:
  - gsm8k
  - {name: gsm8k}
  - {name: x, task: gsm8kk}
  - {name: y, task: gsm8k, extractor: boxd, grader: math}
  - {name: z, task: gsm8k, sampling: {temprature: 1.0}}
  - {name: w, task: gsm8k, sampling: {n: 4, temperature: 0.0}}
  - {name: v, task: gsm8k, colour: red}
""")
    with pytest.raises(SuiteError) as info:
        load_suite(path)
    text = str(info.value)
    assert text.startswith(f"invalid eval suite {path}")
    for needle in ("sampling.n: must be >= 1", "unknown key 'tasks[4].sampling.temprature'. Did you mean "
                   "'tasks[4].sampling.temperature'", "unknown key 'tasks[6].colour'"):
        assert needle in text, text
    # the semantic checks run only once the types are right: fix the type errors and look again
    path = _write(tmp_path, """
name: bad
tasks:
  - gsm8k
  - {name: gsm8k}
  - {name: x, task: gsm8kk}
  - {name: y, task: gsm8k, extractor: boxd, grader: math}
  - {name: w, task: gsm8k, sampling: {n: 4, temperature: 0.0}}
  - {name: u, task: gsm8k, extractor: boxed}
  - {name: t, task: gsm8k, lm_eval: gsm8k}
""")
    with pytest.raises(SuiteError) as info:
        load_suite(path)
    text = str(info.value)
    for needle in ("tasks[1].name: duplicate task name 'gsm8k'", "tasks[2].task: unknown task 'gsm8kk'. Did you mean 'gsm8k'",
                   "tasks[3].extractor: unknown extractor 'boxd'. Did you mean 'boxed'",
                   "tasks[4].sampling: n=4 with temperature 0", "tasks[5].grader: 'task' grades with the task's own",
                   "tasks[6]: set either 'task'"):
        assert needle in text, text
    assert text.splitlines()[0].endswith("6 problems"), text


def test_yaml_syntax_and_missing_file(tmp_path):
    with pytest.raises(SuiteError, match=r"invalid YAML .*line 3"):
        load_suite(_write(tmp_path, "name: x\ntasks: [gsm8k\n"))
    with pytest.raises(FileNotFoundError, match="eval suite not found"):
        load_suite(tmp_path / "nope.yaml")
    with pytest.raises(SuiteError, match="missing required key 'name'"):
        load_suite(_write(tmp_path, "tasks: [gsm8k]\n"))


def test_overrides_apply_to_every_task():
    suite = with_overrides(load_suite("reasoning"), temperature=0.0, limit=3, max_new_tokens=7)
    for t in suite.tasks:
        assert (t.sampling.n, t.sampling.temperature, t.sampling.max_new_tokens, t.limit) == (1, 0.0, 7, 3)
    with pytest.raises(SuiteError, match="with command-line overrides"):
        with_overrides(load_suite("reasoning"), temperature=0.0, n=4)
