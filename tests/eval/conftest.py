"""Fixtures for the evaluation harness tests: a scripted rollout engine (no model) and a tiny JSONL task."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from posttrain.rollout.base import Completion, GenerationOutput


class ScriptedEngine:
    """A rollout engine that answers "What is a + b?" prompts without a model: sample j of a prompt is
    right when j < right[prompt number] (default: every even-numbered prompt fully right, odd ones wrong).
    Records every prompt it was asked, so tests can count generations; `fail_after` raises
    KeyboardInterrupt after that many generate calls (an interrupted run)."""

    def __init__(self, right=None, fail_after: int | None = None, entropy: float = 1.0):
        self.right = right
        self.calls: list[list[str]] = []
        self.fail_after = fail_after
        self.entropy = entropy

    def generate(self, prompts, sampling):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("scripted interruption")
        self.calls.append(list(prompts))
        outs = []
        for prompt in prompts:
            a, b = map(int, re.search(r"What is (\d+) \+ (\d+)", prompt).groups())
            number = int(re.search(r"#(\d+)", prompt).group(1))
            n_right = self.right(number, sampling.n) if self.right else (sampling.n if number % 2 == 0 else 0)
            comps = []
            for j in range(sampling.n):
                answer = a + b if j < n_right else a + b + 1 + j  # wrong answers differ from each other
                text = f"The answer is \\boxed{{{answer}}}"
                ids = list(range(3 + j))
                comps.append(Completion(token_ids=ids, text=text, finish_reason="stop",
                                        entropies=[self.entropy] * len(ids) if sampling.entropies else None))
            outs.append(GenerationOutput(prompt=prompt, prompt_token_ids=[1, 2, 3], completions=comps))
        return outs

    @property
    def n_prompts(self) -> int:
        return sum(len(c) for c in self.calls)


@pytest.fixture
def scripted_engine():
    return ScriptedEngine


@pytest.fixture
def addition_data(tmp_path: Path) -> Path:
    """arithmetic-task JSONL rows: question "#i What is a + b?" with the sum as answer."""
    path = tmp_path / "data" / "add.jsonl"
    path.parent.mkdir(parents=True)
    rows = [{"id": f"q{i}", "question": f"#{i} What is {i} + {2 * i}?", "answer": str(3 * i)} for i in range(10)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_suite(tmp_path: Path, text: str, name: str = "suite.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path
