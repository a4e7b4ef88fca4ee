"""Per-instance routing over adapter groups: each prompt is generated with the LoRA adapter of the group whose
instructions match it best (LCIA's test-time routing, `posttrain.models.adapter_groups`).

`RoutedEngine` wraps any rollout engine: it splits a batch of prompts by group, generates each part with that
group's adapter selected, and returns the outputs in prompt order. Selecting an adapter is the engine's own
business (`select(group_name)` is a context manager): a PEFT model's `set_adapter` for the hf engine
(`peft_adapter`), a LoRA request per group for vLLM (`VLLMEngine.lora_adapter`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from posttrain.rollout.base import GenerationOutput, SamplingParams

__all__ = ["RoutedEngine", "RoutedScorer", "peft_adapter", "prompt_lines"]


def prompt_lines(prompt: str, special_tokens: Sequence[str] = ()) -> list[str]:
    """The non-empty lines of a chat-formatted prompt, with the template's special tokens (`<|im_start|>`, ...)
    taken out, so that an instruction line reads as written."""
    for token in sorted(special_tokens, key=len, reverse=True):
        if token:
            prompt = prompt.replace(token, "\n")
    return [line.strip() for line in prompt.splitlines() if line.strip()]


@contextmanager
def peft_adapter(model: Any, name: str) -> Iterator[None]:
    """Generate with PEFT adapter `name` inside the block; the previously active adapter comes back after."""
    previous = model.active_adapter
    if name != previous:
        model.set_adapter(name)
    try:
        yield
    finally:
        if name != previous:
            model.set_adapter(previous)


class RoutedEngine:
    """A rollout engine that routes every prompt to an adapter group.

    groups: a `posttrain.models.adapter_groups.AdapterGroups` (its `route(lines)` picks the group);
    select(name): context manager that makes `engine` generate with group `name`'s adapter.
    `counts` tallies the routing decisions (group -> prompts), `last_routes` holds the last call's.
    """

    def __init__(self, engine: Any, groups: Any, select: Callable[[str], AbstractContextManager[Any]],
                 tokenizer: Any = None):
        self.engine, self.groups, self.select = engine, groups, select
        self.tokenizer = tokenizer if tokenizer is not None else getattr(engine, "tokenizer", None)
        self._special = list(getattr(self.tokenizer, "all_special_tokens", []) or [])
        self.counts: Counter[str] = Counter()
        self.last_routes: list[str] = []

    # the harness reads these to fit prompts into the context
    @property
    def model(self) -> Any:
        return getattr(self.engine, "model", None)

    @property
    def max_context(self) -> int | None:
        return getattr(self.engine, "max_context", None)

    def route(self, prompt: str) -> str:
        return self.groups.route(prompt_lines(prompt, self._special))[0]

    def generate(self, prompts: list[str], sampling: SamplingParams | None = None) -> list[GenerationOutput]:
        routes = [self.route(p) for p in prompts]
        self.last_routes = routes
        self.counts.update(routes)
        outputs: list[GenerationOutput | None] = [None] * len(prompts)
        for name in dict.fromkeys(routes):
            index = [i for i, r in enumerate(routes) if r == name]
            with self.select(name):
                for i, out in zip(index, self.engine.generate([prompts[i] for i in index], sampling), strict=True):
                    outputs[i] = out
        return outputs  # type: ignore[return-value]


class RoutedScorer:
    """A per-completion scorer (the harness's `kl_scorer`, e.g. `BaseKL`) that sees each output with the adapter
    its prompt was routed to, as the generation did."""

    def __init__(self, scorer: Callable[[list[GenerationOutput]], list[Any]], engine: RoutedEngine):
        self.scorer, self.engine = scorer, engine

    def __call__(self, outputs: list[GenerationOutput]) -> list[Any]:
        routes = [self.engine.route(o.prompt) for o in outputs]
        scores: list[Any] = [None] * len(outputs)
        for name in dict.fromkeys(routes):
            index = [i for i, r in enumerate(routes) if r == name]
            with self.engine.select(name):
                for i, score in zip(index, self.scorer([outputs[i] for i in index]), strict=True):
                    scores[i] = score
        return scores
