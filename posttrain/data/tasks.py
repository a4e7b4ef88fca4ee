"""The task registry and the Task base class.

A task turns a source of problems into a `datasets.Dataset` with the columns TRL's GRPOTrainer
reads (`prompt` as chat messages, `answer` as the gold string, `id`) and grades completions with
`score`, which is also its reward: the grader of evaluation is the reward of training.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from posttrain.data.sources import write_jsonl
from posttrain.rewards import extract_answer, get_reward, math_equal, suggest

if TYPE_CHECKING:
    import datasets

__all__ = ["TASKS", "Example", "Task", "register_task", "get_task", "format_prompt", "export_jsonl"]

TASKS: dict[str, type[Task]] = {}
T = TypeVar("T", bound="type[Task]")


@dataclass(frozen=True)
class Example:
    """One problem before prompt formatting: the question text without the instruction."""

    id: str
    question: str
    answer: str


class Task:
    """Base class. Subclasses set `name` (via `register_task`) and implement `examples`."""

    name: ClassVar[str] = ""
    instruction: ClassVar[str] = "\nPut the final answer in \\boxed{}."
    default_split: ClassVar[str | None] = None

    def __init__(self, *, system_prompt: str | None = None, instruction: str | None = None) -> None:
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise TypeError(f"task {self.name!r}: option 'system_prompt' must be a string")
        if instruction is not None and not isinstance(instruction, str):
            raise TypeError(f"task {self.name!r}: option 'instruction' must be a string")
        self.system_prompt = system_prompt
        if instruction is not None:
            self.instruction = instruction  # shadows the class default for this instance

    def examples(self, split: str | None = None, path: str | Path | None = None,
                 limit: int | None = None) -> list[Example]:
        """The problems of `split` (or of the JSONL at `path`), first `limit` only."""
        raise NotImplementedError

    def messages(self, question: str) -> list[dict[str, str]]:
        """The chat prompt for one question: optional system message, then question + instruction."""
        user = {"role": "user", "content": question + self.instruction}
        if self.system_prompt:
            return [{"role": "system", "content": self.system_prompt}, user]
        return [user]

    def load(self, split: str | None = None, path: str | Path | None = None,
             limit: int | None = None) -> datasets.Dataset:
        """A Dataset with columns `prompt` (chat messages), `answer` (gold string) and `id`."""
        import datasets

        rows = self.examples(split=split, path=path, limit=limit)
        features = datasets.Features(
            {
                "prompt": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
                "answer": datasets.Value("string"),
                "id": datasets.Value("string"),
            }
        )
        return datasets.Dataset.from_dict(
            {
                "prompt": [self.messages(r.question) for r in rows],
                "answer": [r.answer for r in rows],
                "id": [r.id for r in rows],
            },
            features=features,
        )

    def extract_answer(self, text: str) -> str | None:
        """The final answer in a completion: last box, else `#### N`, else the last number."""
        return extract_answer(text)

    def score(self, text: str, answer: str) -> float:
        """1.0 when the completion's answer equals the gold `answer`, else 0.0."""
        return 1.0 if math_equal(answer, self.extract_answer(text)) else 0.0

    def reference_completion(self, answer: str) -> str:
        """A response that states the gold `answer` in the form the grader reads (the chosen response of
        preference pairs built for prompts the model never gets right)."""
        return f"The final answer is \\boxed{{{answer}}}."

    def grading_key(self) -> tuple:
        """Tasks with equal keys grade a completion the same way (a `mixture` needs one grader for its batch)."""
        return (type(self).extract_answer.__qualname__, type(self).score.__qualname__)

    def reward_funcs(self) -> list[Callable[..., list[float | None]]]:
        """TRL reward functions for training on this task (by default its grader, `accuracy`)."""
        return [get_reward("accuracy", self)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def register_task(name: str) -> Callable[[T], T]:
    """Class decorator: register a Task subclass under `name` (and set its `name`)."""

    def decorator(cls: T) -> T:
        if name in TASKS:
            raise ValueError(f"task {name!r} is already registered")
        cls.name = name
        TASKS[name] = cls
        return cls

    return decorator


def task_options(name: str) -> list[str]:
    """The option names task `name` accepts."""
    params = inspect.signature(TASKS[name]).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def get_task(name: str, **options: Any) -> Task:
    """An instance of task `name` built from recipe options (plus `system_prompt`)."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}." + suggest(name, list(TASKS)))
    known = task_options(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        hints = "".join(suggest(o, known) for o in unknown)
        raise TypeError(f"task {name!r} got unknown option(s) {unknown}.{hints}")
    return TASKS[name](**options)


def format_prompt(tokenizer: Any, messages: list[dict[str, str]] | str) -> str:
    """Chat messages as the model's prompt text (with the generation prompt).

    Tokenizers without a chat template (base models, tiny test tokenizers) get the contents joined
    by blank lines.
    """
    if isinstance(messages, str):
        return messages
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n\n".join(m["content"] for m in messages)


def export_jsonl(task: Task, split: str | None, path: str | Path, limit: int | None = None) -> Path:
    """Write `task`'s problems of `split` as JSONL rows {id, question, answer}; `load(path=...)` reads them back."""
    rows = task.examples(split=split, limit=limit)
    return write_jsonl(path, ({"id": r.id, "question": r.question, "answer": r.answer} for r in rows))
