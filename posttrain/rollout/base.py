"""The rollout engine interface: one object generates for GRPO training, best-of-n and evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol


@dataclass
class SamplingParams:
    """How to sample. temperature 0 means greedy decoding."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    max_new_tokens: int = 256
    seed: int | None = None
    logprobs: bool = False  # per-token log-probability of each sampled token (at `temperature`, 1 if greedy)
    entropies: bool = False  # per-token full-vocabulary entropy (exact on the hf backend)

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.n, int) or self.n < 1:
            problems.append(f"n must be an integer >= 1, got {self.n!r}")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and self.top_k < 0:
            problems.append(f"top_k must be >= 0 or None, got {self.top_k!r}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            problems.append(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if self.n > 1 and self.temperature == 0:
            problems.append(f"n={self.n} samples with temperature 0 (greedy) would be {self.n} identical copies")
        if problems:
            raise ValueError("bad sampling parameters: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: list[float] | None = None
    entropies: list[float] | None = None


@dataclass
class GenerationOutput:
    prompt: str
    prompt_token_ids: list[int]
    completions: list[Completion] = field(default_factory=list)


class RolloutEngine(Protocol):
    def generate(self, prompts: list[str], sampling: SamplingParams) -> list[GenerationOutput]:
        """Generate `sampling.n` completions for each (already chat-formatted) prompt, in prompt order."""
        ...


def check_prompt_ids(prompt_ids: Sequence[Sequence[int]], sampling: SamplingParams, context: int | None,
                     context_name: str = "context") -> None:
    """Reject, before anything is generated, prompts an engine would refuse or silently truncate, naming the
    prompt: an empty one, or one that leaves less than `sampling.max_new_tokens` of `context` tokens. Every
    backend calls this, so the same bad prompt gets the same error whichever engine runs."""
    for i, ids in enumerate(prompt_ids):
        if len(ids) == 0:
            raise ValueError(f"prompt {i} is empty (0 tokens)")
        if context is not None and len(ids) + sampling.max_new_tokens > context:
            raise ValueError(
                f"prompt {i} has {len(ids)} tokens; with max_new_tokens={sampling.max_new_tokens} the {context_name} "
                f"({context} tokens) allows at most {context - sampling.max_new_tokens}")


def eos_token_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and all of the model's generation-config EOS ids (chat
    models often list several, e.g. <|im_end|> and <|endoftext|>), as vLLM stops on them too."""
    ids: list[int] = []
    sources = [getattr(tokenizer, "eos_token_id", None)]
    config = getattr(model, "generation_config", None)
    sources.append(getattr(config, "eos_token_id", None))
    for value in sources:
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids
