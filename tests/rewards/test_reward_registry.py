"""Reward registry and TRL-signature reward functions (posttrain.rewards)."""

from __future__ import annotations

from typing import Any

import pytest

from posttrain import rewards
from posttrain.rewards import REWARDS, boxed_format_reward, completion_text, get_reward, register_reward
from posttrain.rewards.format import has_boxed_answer


class EchoTask:
    """A grader that accepts a completion whose last number equals the answer."""

    name = "echo"

    def score(self, text: str, answer: str) -> float:
        return 1.0 if rewards.last_number(text) == answer else 0.0


def conv(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


TEXTS = ["so it is \\boxed{31}", "I get 30", "\\boxed{}", "31"]


def trl_call(fn: Any, completions: list[Any], **columns: Any) -> list[float | None]:
    """Call `fn` the way TRL 1.16's GRPOTrainer does."""
    prompts = [[{"role": "user", "content": "What is 14 + 17?"}]] * len(completions)
    return fn(
        prompts=prompts,
        completions=completions,
        completion_ids=[[1, 2]] * len(completions),
        trainer_state=None,
        log_extra=lambda *a, **k: None,
        log_metric=lambda *a, **k: None,
        **columns,
    )


@pytest.mark.parametrize("wrap", [lambda t: t, conv], ids=["str", "conversational"])
def test_accuracy_reward(wrap: Any) -> None:
    fn = get_reward("accuracy", EchoTask())
    assert fn.__name__ == "accuracy"
    got = trl_call(fn, [wrap(t) for t in TEXTS], answer=["31", "31", "31", "31"])
    assert got == [1.0, 0.0, 0.0, 1.0]


def test_accuracy_none_answer_gives_none() -> None:
    fn = get_reward("accuracy", EchoTask())
    assert trl_call(fn, ["31", "31"], answer=[None, "31"]) == [None, 1.0]


@pytest.mark.parametrize("wrap", [lambda t: t, conv], ids=["str", "conversational"])
def test_format_reward(wrap: Any) -> None:
    fn = get_reward("format", EchoTask())
    assert fn.__name__ == "format"
    assert trl_call(fn, [wrap(t) for t in TEXTS], answer=["31"] * 4) == [1.0, 0.0, 0.0, 0.0]
    assert boxed_format_reward(None, [wrap(t) for t in TEXTS]) == [1.0, 0.0, 0.0, 0.0]


def test_has_boxed_answer() -> None:
    assert has_boxed_answer("x \\boxed{\\frac{1}{2}}")
    assert not has_boxed_answer("\\boxed{ }")
    assert not has_boxed_answer("\\boxed{1")


def test_accuracy_needs_answer_column_and_task() -> None:
    fn = get_reward("accuracy", EchoTask())
    with pytest.raises(KeyError, match="answer"):
        trl_call(fn, ["1"])
    with pytest.raises(ValueError, match="1 completions but 2 answers"):
        trl_call(fn, ["1"], answer=["1", "2"])
    with pytest.raises(ValueError, match="task"):
        get_reward("accuracy")


def test_unknown_reward_suggests() -> None:
    with pytest.raises(KeyError, match="Did you mean 'accuracy'"):
        get_reward("acuracy", EchoTask())


def test_unknown_reward_option() -> None:
    with pytest.raises(TypeError, match="'format'.*weight"):
        get_reward("format", EchoTask(), weight=2.0)


def test_register_reward_and_rename() -> None:
    def factory(task: Any, bonus: float = 1.0) -> Any:
        def inner(prompts: Any, completions: list[Any], completion_ids: Any = None, **kwargs: Any) -> list[float | None]:
            return [bonus] * len(completions)

        return inner

    register_reward("test_constant")(factory)
    try:
        fn = get_reward("test_constant", None, bonus=0.5)
        assert fn.__name__ == "test_constant"  # renamed so TRL logs rewards/test_constant/mean
        assert trl_call(fn, ["a", "b"]) == [0.5, 0.5]
        with pytest.raises(ValueError, match="already registered"):
            register_reward("test_constant")(factory)
    finally:
        REWARDS.pop("test_constant", None)


def test_completion_text() -> None:
    assert completion_text("plain") == "plain"
    assert completion_text(conv("hi")) == "hi"
    assert completion_text({"role": "assistant", "content": "one"}) == "one"
    parts = [{"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert completion_text(parts) == "ab"
    mixed = [{"role": "tool", "content": "tool out"}, {"role": "assistant", "content": "final"}]
    assert completion_text(mixed) == "final"
    with pytest.raises(TypeError):
        completion_text(42)
    with pytest.raises(TypeError):
        completion_text(["not a message"])
