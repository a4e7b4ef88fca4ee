"""Verifiable rewards as TRL reward functions, behind a name -> factory registry.

A factory takes the task (anything with `score(text, answer) -> float`) and its own options and
returns a TRL reward function `fn(prompts, completions, completion_ids=None, **kwargs)` whose
`__name__` is the registry name, so TRL logs it as `rewards/<name>/mean`. Dataset columns reach the
function as lists in `kwargs` (the gold answers as `answer`).
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable
from typing import Any, Protocol

from posttrain.rewards.format import boxed_format_reward, has_boxed_answer
from posttrain.rewards.math import extract_answer, extract_boxed, last_number, math_equal

__all__ = [
    "REWARDS",
    "RewardFunc",
    "RewardFactory",
    "Gradable",
    "register_reward",
    "get_reward",
    "import_reward",
    "completion_text",
    "suggest",
    "extract_answer",
    "extract_boxed",
    "last_number",
    "math_equal",
    "boxed_format_reward",
    "has_boxed_answer",
]

RewardFunc = Callable[..., list[float | None]]
RewardFactory = Callable[..., RewardFunc]
REWARDS: dict[str, RewardFactory] = {}


class Gradable(Protocol):
    """What a reward needs from a task (posttrain.data.Task satisfies it)."""

    name: str

    def score(self, text: str, answer: str) -> float: ...


def suggest(name: str, known: list[str]) -> str:
    """" Did you mean 'x'?" for the closest known name, or the list of known names."""
    close = difflib.get_close_matches(name, known, n=1)
    if close:
        return f" Did you mean {close[0]!r}? Known: {', '.join(sorted(known))}."
    return f" Known: {', '.join(sorted(known))}."


def register_reward(name: str) -> Callable[[RewardFactory], RewardFactory]:
    """Register a reward factory `factory(task, **options) -> RewardFunc` under `name`."""

    def decorator(factory: RewardFactory) -> RewardFactory:
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is already registered")
        REWARDS[name] = factory
        return factory

    return decorator


def import_reward(path: str, **options: Any) -> RewardFunc:
    """A reward function named by import path, `package.module:function` (as TRL's CLI takes them): a TRL reward
    function `fn(prompts, completions, **kwargs) -> list[float | None]`, called with the entry's `options` as extra
    keyword arguments. Its `__name__` is what TRL logs (`rewards/<name>/mean`). ValueError naming the path when
    the module or function cannot be had."""
    import importlib

    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"reward {path!r}: an import path is 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"reward {path!r}: cannot import module {module_name!r} ({err}); is it installed, or on "
                         "PYTHONPATH?") from None
    fn = getattr(module, attr, None)
    if fn is None:
        public = sorted(n for n in dir(module) if callable(getattr(module, n)) and not n.startswith("_"))
        raise ValueError(f"reward {path!r}: module {module_name!r} has no {attr!r}." + suggest(attr, public))
    if not callable(fn):
        raise ValueError(f"reward {path!r}: {attr!r} is not callable")
    if not options:
        return fn

    @functools.wraps(fn)
    def with_options(*args: Any, **kwargs: Any) -> list[float | None]:
        return fn(*args, **{**kwargs, **options})

    return with_options


def get_reward(name: str, task: Gradable | None = None, **options: Any) -> RewardFunc:
    """The TRL reward function `name` built for `task` (a registered name, or an import path
    `package.module:function`); KeyError for unknown names, TypeError for unknown options, ValueError for an import
    path that does not resolve."""
    if ":" in name:
        return import_reward(name, **options)
    if name not in REWARDS:
        raise KeyError(f"unknown reward {name!r}." + suggest(name, list(REWARDS)))
    factory = REWARDS[name]
    try:
        inspect.signature(factory).bind(task, **options)
    except TypeError as exc:
        params = [p for p in inspect.signature(factory).parameters if p != "task"]
        raise TypeError(f"reward {name!r}: bad options {sorted(options)} ({exc}); accepted: {params}") from None
    fn = factory(task, **options)
    if getattr(fn, "__name__", None) != name:
        fn = _renamed(fn, name)
    return fn


def _renamed(fn: RewardFunc, name: str) -> RewardFunc:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> list[float | None]:
        return fn(*args, **kwargs)

    wrapper.__name__ = wrapper.__qualname__ = name
    return wrapper


def completion_text(completion: Any) -> str:
    """The text of one TRL completion: a string, or conversational messages (assistant contents joined)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return _content_text(completion.get("content"))
    if isinstance(completion, (list, tuple)):
        messages = [m for m in completion if isinstance(m, dict)]
        if len(messages) != len(completion):
            raise TypeError(f"conversational completion must be a list of message dicts, got {completion!r:.200}")
        assistant = [m for m in messages if m.get("role", "assistant") == "assistant"]
        return "\n".join(_content_text(m.get("content")) for m in (assistant or messages))
    raise TypeError(f"completion must be a str or a list of messages, got {type(completion).__name__}")


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multimodal-style parts: [{"type": "text", "text": ...}]
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return str(content)


def _answers(kwargs: dict[str, Any], n: int, reward: str) -> list[Any]:
    if "answer" not in kwargs:
        raise KeyError(f"reward {reward!r} needs the dataset column 'answer'; got columns {sorted(kwargs)}")
    answers = list(kwargs["answer"])
    if len(answers) != n:
        raise ValueError(f"reward {reward!r}: {n} completions but {len(answers)} answers")
    return answers


@register_reward("accuracy")
def accuracy(task: Gradable | None) -> RewardFunc:
    """The task's own grader as a reward: `task.score(text, answer)`; None where the answer is missing."""
    if task is None or not callable(getattr(task, "score", None)):
        raise ValueError("reward 'accuracy' needs a task with a score(text, answer) method")

    def accuracy(
        prompts: list[Any] | None, completions: list[Any], completion_ids: list[list[int]] | None = None, **kwargs: Any
    ) -> list[float | None]:
        answers = _answers(kwargs, len(completions), "accuracy")
        return [
            None if answer is None else float(task.score(completion_text(c), str(answer)))
            for c, answer in zip(completions, answers)
        ]

    return accuracy


@register_reward("format")
def format_(task: Gradable | None = None) -> RewardFunc:
    """1.0 when the completion holds a non-empty \\boxed{...} answer, else 0.0."""

    def format(  # noqa: A001 - the name is what TRL logs
        prompts: list[Any] | None, completions: list[Any], completion_ids: list[list[int]] | None = None, **kwargs: Any
    ) -> list[float | None]:
        return boxed_format_reward(prompts, completions, completion_ids, **kwargs)

    return format


from posttrain.rewards import ensemble as _ensemble  # noqa: E402, F401 - registers `rm_ensemble` (imports no torch)
