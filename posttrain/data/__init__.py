"""Tasks: datasets for training and evaluation, and their graders.

`get_task(name, **options).load(split=None, path=None, limit=None)` gives a Dataset with columns
`prompt` (chat messages), `answer` (gold string) and `id`; `task.score(text, answer)` grades a
completion and `task.reward_funcs()` gives the same grader as TRL reward functions.
"""

from __future__ import annotations

from posttrain.data import classification as _classification  # noqa: F401 - registers classification
from posttrain.data import custom as _custom  # noqa: F401 - registers custom, mixture
from posttrain.data import math as _math  # noqa: F401 - registers gsm8k, math500, aime24, amc23
from posttrain.data import multiple_choice as _mc  # noqa: F401 - registers multiple_choice, mmlu_stem
from posttrain.data import synthetic as _synthetic  # noqa: F401 - registers arithmetic
from posttrain.data.math import MathTask
from posttrain.data.sources import read_jsonl, resolve_jsonl, write_jsonl
from posttrain.data.synthetic import ArithmeticTask
from posttrain.data.tasks import (
    TASKS,
    Example,
    Task,
    export_jsonl,
    format_prompt,
    get_task,
    register_task,
    task_options,
)

__all__ = [
    "TASKS",
    "Task",
    "Example",
    "MathTask",
    "ArithmeticTask",
    "register_task",
    "get_task",
    "task_options",
    "format_prompt",
    "export_jsonl",
    "read_jsonl",
    "resolve_jsonl",
    "write_jsonl",
]
