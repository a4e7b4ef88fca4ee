"""Prompt and grader hooks for the local lm-eval task definitions in this folder.

They call posttrain's own task code, so lm-evaluation-harness sees exactly the prompt text and grades
with exactly the grader that `posttrain eval` uses: any accuracy gap between the two harnesses then
comes from generation (batching, padding, stopping, chat-template handling), not from prompts or grading.
Run lm-eval from the repository root with `--include_path eval/lm_eval_tasks` (posttrain importable).
"""

from __future__ import annotations

from functools import lru_cache

from posttrain.data import get_task


@lru_cache(maxsize=None)
def _task(name: str):
    return get_task(name)


def _user_text(name: str, question: str) -> str:
    return _task(name).messages(question)[-1]["content"]


def gsm8k_prompt(doc: dict) -> str:
    return _user_text("gsm8k", doc["question"])


def gsm8k_gold(doc: dict) -> str:
    return doc["answer"].rsplit("####", 1)[1].strip().replace(",", "")


def arithmetic_prompt(doc: dict) -> str:
    return _user_text("arithmetic", doc["question"])


def arithmetic_gold(doc: dict) -> str:
    return str(doc["answer"])


def process_gsm8k(doc: dict, results: list[str]) -> dict[str, float]:
    return {"exact_match": _task("gsm8k").score(results[0], gsm8k_gold(doc))}


def process_arithmetic(doc: dict, results: list[str]) -> dict[str, float]:
    return {"exact_match": _task("arithmetic").score(results[0], arithmetic_gold(doc))}
