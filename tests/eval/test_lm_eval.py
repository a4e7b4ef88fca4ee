"""lm-evaluation-harness path: a clear error without the extra; the local task definitions use our prompts
and grader; a real run when lm-eval is installed (skipped otherwise)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

from posttrain.data import get_task
from posttrain.eval.harness import evaluate_suite
from posttrain.eval.lm_eval_backend import LMEvalMissing, require_lm_eval
from posttrain.eval.suite import suite_from_dict

ROOT = Path(__file__).resolve().parents[2]
TASKS_DIR = ROOT / "eval" / "lm_eval_tasks"


def _utils():
    spec = importlib.util.spec_from_file_location("lm_eval_task_utils", TASKS_DIR / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_missing_lm_eval_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` raise ImportError
    with pytest.raises(LMEvalMissing, match=r"posttrain\[lm-eval\]"):
        require_lm_eval()
    suite = suite_from_dict({"name": "x", "tasks": [{"name": "arc", "lm_eval": "arc_easy"}]})
    with pytest.raises(LMEvalMissing, match="`lm_eval:` need it"):
        evaluate_suite(None, None, suite, tmp_path, hf_model=object())


class _Tags(yaml.SafeLoader):
    pass


_Tags.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")


@pytest.mark.parametrize("name", ["posttrain_gsm8k", "posttrain_arithmetic"])
def test_local_task_definitions_are_complete(name):
    spec = yaml.load((TASKS_DIR / f"{name}.yaml").read_text(), Loader=_Tags)
    assert spec["task"] == name and spec["output_type"] == "generate_until"
    utils = _utils()
    for key in ("doc_to_text", "doc_to_target", "process_results"):
        assert spec[key].startswith("!function utils.") and hasattr(utils, spec[key].split(".", 1)[1])
    assert spec["generation_kwargs"]["do_sample"] is False


def test_local_tasks_use_our_prompt_and_grader(benchmarks_dir):
    utils = _utils()
    doc = json.loads((benchmarks_dir / "gsm8k.jsonl").read_text().splitlines()[0])
    ours = get_task("gsm8k").load(path=benchmarks_dir, limit=1)[0]
    assert utils.gsm8k_prompt(doc) == ours["prompt"][-1]["content"]
    assert utils.gsm8k_gold(doc) == ours["answer"]
    assert utils.process_gsm8k(doc, [f"so \\boxed{{{ours['answer']}}}"]) == {"exact_match": 1.0}
    assert utils.process_gsm8k(doc, ["no idea"]) == {"exact_match": 0.0}
    row = {"question": "What is 3 + 4?", "answer": "7"}
    assert utils.arithmetic_prompt(row) == get_task("arithmetic").messages(row["question"])[-1]["content"]
    assert utils.process_arithmetic(row, ["3 + 4 = 7"]) == {"exact_match": 1.0}


def test_lm_eval_task_through_the_suite(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from posttrain.data import export_jsonl
    from posttrain.models import load_model, load_tokenizer

    # the task file names its data relative to the working directory: run from a scratch folder holding it, so the
    # test never overwrites the repository's outputs/lm_eval_data (which bench/eval_lm_eval_compare.py uses)
    work = tmp_path / "cwd"
    export_jsonl(get_task("arithmetic"), "test", work / "outputs" / "lm_eval_data" / "arithmetic_test.jsonl", limit=4)
    monkeypatch.chdir(work)
    suite = suite_from_dict({"name": "lm", "lm_eval_include": [str(TASKS_DIR)], "tasks": [
        {"name": "arith", "lm_eval": "posttrain_arithmetic", "limit": 2, "sampling": {"max_new_tokens": 8}}]})
    res = evaluate_suite(None, load_tokenizer("tiny-qwen2"), suite, tmp_path, hf_model=load_model("tiny-qwen2"))
    arith = res["tasks"]["arith"]
    assert arith["backend"] == "lm-eval" and 0.0 <= arith["metrics"]["accuracy"] <= 1.0
    assert len((tmp_path / "samples_arith.jsonl").read_text().splitlines()) == 2
