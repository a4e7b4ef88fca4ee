"""A multi-turn guessing game with a sparse terminal reward, drivable by TRL 1.16's GRPOTrainer.

The agent must find a secret integer in [low, high]; after each guess the environment answers "higher",
"lower" or "correct". The reward is 1 if the secret is found within `max_turns` guesses, else 0 (sparse,
terminal: nothing per turn). Two ways to run it under TRL 1.16:

- `guessing_rollout(...)` returns a TRL `rollout_func`: it generates turn by turn with the trainer's own
  model (transformers generate), appends the environment's feedback as a user turn of the chat template,
  and returns `env_mask` (1 = model token, 0 = environment token). TRL turns `env_mask` into `tool_mask`,
  so feedback tokens are excluded from the loss, and posttrain derives turn indices from it (per-turn
  entropy, EPO's turn averaging). Works with any chat model, including random tiny ones.
- `GuessingGameTool` is the same game as a TRL `environment_factory` class (a `guess` tool and
  `get_reward`), for tool-calling models whose chat template TRL can parse.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from typing import Any

from posttrain.data.tasks import Example, Task, register_task

NUMBER = re.compile(r"-?\d+")


@dataclass
class GuessingGame:
    """One game. `step(text)` reads the last integer in the agent's turn as its guess."""

    secret: int
    low: int = 1
    high: int = 16
    max_turns: int = 4
    turns: int = 0
    solved: bool = False
    history: list[int | None] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.solved or self.turns >= self.max_turns

    def step(self, text: str) -> str:
        """Play one turn; returns the feedback shown to the agent."""
        if self.done:
            raise RuntimeError("the game is over")
        self.turns += 1
        numbers = NUMBER.findall(text)
        guess = int(numbers[-1]) if numbers else None
        self.history.append(guess)
        if guess is None:
            return f"No number found. Guess an integer from {self.low} to {self.high}."
        if guess == self.secret:
            self.solved = True
            return "correct"
        return "higher" if guess < self.secret else "lower"

    def reward(self) -> float:
        """Sparse terminal reward: 1 if solved within max_turns, else 0."""
        return 1.0 if self.solved else 0.0


def prompt_text(game: int, low: int, high: int, max_turns: int) -> str:
    return (f"Game {game}: I picked a secret number from {low} to {high}. Guess it: answer with one number "
            f"per turn. After each guess I say higher, lower or correct. You have {max_turns} guesses.")


def _secrets(n: int, low: int, high: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(low, high) for _ in range(n)]


@register_task("guessing")
class GuessingTask(Task):
    """The guessing game as a posttrain task: `prompt` (one unique game per row), `answer` (the secret).

    Training on it needs the multi-turn rollout (`rollout_func`), which `posttrain.train` passes to the
    trainer for any task that has one. As a single-turn eval task, `score` grades a one-shot guess.
    """

    instruction = ""

    def __init__(self, *, low: int = 1, high: int = 16, max_turns: int = 4, tokens_per_turn: int = 8,
                 n: int = 256, seed: int = 0, system_prompt: str | None = None) -> None:
        super().__init__(system_prompt=system_prompt)
        if not low < high:
            raise ValueError("guessing: need low < high")
        self.low, self.high, self.max_turns, self.tokens_per_turn, self.n, self.seed = (
            low, high, max_turns, tokens_per_turn, n, seed
        )

    def examples(self, split: str | None = None, path: Any = None, limit: int | None = None) -> list[Example]:
        seed = self.seed + (1 if split == "test" else 0)
        n = self.n if limit is None else min(self.n, limit)
        return [Example(id=f"guess-{split or 'train'}-{i}",
                        question=prompt_text(i, self.low, self.high, self.max_turns),
                        answer=str(s)) for i, s in enumerate(_secrets(n, self.low, self.high, seed))]

    def extract_answer(self, text: str) -> str | None:
        numbers = NUMBER.findall(text)
        return numbers[-1] if numbers else None

    def score(self, text: str, answer: str) -> float:
        return 1.0 if self.extract_answer(text) == str(answer).strip() else 0.0

    def reward_funcs(self) -> list:
        return [guessing_reward]

    def rollout_func(self, dataset: Any) -> Any:
        """TRL rollout_func playing this task's games; `dataset` maps each prompt to its secret."""
        return guessing_rollout(secrets_from_dataset(dataset), self.max_turns, self.tokens_per_turn,
                                self.low, self.high)


def secrets_from_dataset(dataset: Any) -> dict[str, int]:
    """prompt text (the last user message) -> secret, from a dataset with `prompt` and `answer` (or `secret`)."""
    key = "secret" if "secret" in dataset.column_names else "answer"
    return {_prompt_key(p): int(a) for p, a in zip(dataset["prompt"], dataset[key])}


def _prompt_key(prompt: Any) -> str:
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def guessing_dataset(n: int = 64, low: int = 1, high: int = 16, max_turns: int = 4, seed: int = 0):
    """A `datasets.Dataset` of games (conversational `prompt`, `answer` = the secret), seeded."""
    return GuessingTask(low=low, high=high, max_turns=max_turns, n=n, seed=seed).load()


def guessing_reward(prompts, completions, solved=None, **kwargs) -> list[float]:
    """Reward function for GRPO: the games' terminal rewards, passed through by the rollout as `solved`."""
    if solved is None:
        raise ValueError("guessing_reward needs the `solved` field of guessing_rollout")
    return [1.0 if s else 0.0 for s in solved]


guessing_reward.__name__ = "accuracy"  # the base trainer's group statistics read the `accuracy` reward


def _feedback_ids(tokenizer: Any, feedback: str, ended: bool) -> list[int]:
    """Token ids of the environment's feedback as a user turn followed by the assistant generation prompt.

    Rendered with the chat template on a dummy conversation, keeping what follows the assistant's text;
    when the agent's turn already ended with the end-of-turn token, that token is not repeated.
    """
    marker = "\u2063GUESS\u2063"
    msgs = [{"role": "user", "content": "u"}, {"role": "assistant", "content": marker},
            {"role": "user", "content": feedback}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    suffix = text.split(marker, 1)[1]
    eos = tokenizer.eos_token or ""
    if ended and eos and suffix.startswith(eos):
        suffix = suffix[len(eos):]
    return tokenizer(suffix, add_special_tokens=False)["input_ids"]


def guessing_rollout(secrets: dict[str, int], max_turns: int = 4, tokens_per_turn: int = 8, low: int = 1,
                     high: int = 16):
    """A TRL `rollout_func(prompts, trainer)` playing one game per prompt row; `secrets` maps each prompt
    (its last user message, unique per game) to the secret (`secrets_from_dataset`).

    Each turn the model generates up to `tokens_per_turn` tokens (sampling with the trainer's temperature),
    the environment answers, and the loop continues until the game ends or `max_completion_length` is
    reached. Generation goes through the trainer's shared rollout engine (`rollout.engine: vllm`: synced to
    the current weights, put back to sleep after the rollout when it sleeps between steps), else through an
    `HFEngine` around the trainer's model; both continue the token contexts as they are. Returns prompt_ids,
    completion_ids, logprobs, env_mask, solved, turns (extra fields go to the reward functions). logprobs: with
    the shared engine, the sampled tokens' log-probabilities (NaN on feedback tokens, which TRL's importance
    sampling correction then leaves at ratio 1); without it None (TRL's own forward is on-policy).
    """

    def rollout(prompts: list, trainer: Any) -> dict[str, Any]:
        from posttrain.rollout import HFEngine, SamplingParams

        tok = trainer.processing_class
        games = [GuessingGame(secret=secrets[_prompt_key(p)], low=low, high=high, max_turns=max_turns) for p in prompts]
        prompt_ids = [tok.apply_chat_template(p, tokenize=True, add_generation_prompt=True, return_dict=False)
                      for p in prompts]
        prompt_ids = [list(p["input_ids"]) if isinstance(p, dict) else list(p) for p in prompt_ids]
        completion = [[] for _ in prompts]
        env_mask = [[] for _ in prompts]
        budget = trainer.max_completion_length
        engine = getattr(trainer, "rollout_engine", None)
        shared = engine is not None
        logprobs: list[list[float]] = [[] for _ in prompts]
        if not shared:
            engine = HFEngine(trainer.accelerator.unwrap_model(trainer.model), tok, batch_size=max(len(prompts), 1),
                              progress=False)
        sampling = SamplingParams(n=1, temperature=trainer.temperature, top_p=trainer.top_p,
                                  top_k=trainer.top_k or None, min_p=trainer.min_p, max_new_tokens=tokens_per_turn,
                                  logprobs=shared)
        eos_ids = set(trainer.eos_token_ids)
        for _ in range(max_turns):
            active = [i for i, g in enumerate(games) if not g.done and len(completion[i]) < budget]
            if not active:
                break
            outs = engine.generate_ids([prompt_ids[i] + completion[i] for i in active], sampling)
            for out, i in zip(outs, active, strict=True):
                new = out.completions[0].token_ids[: budget - len(completion[i])]
                completion[i] += new
                env_mask[i] += [1] * len(new)
                if shared:
                    logprobs[i] += list(out.completions[0].logprobs[: len(new)])
                feedback = games[i].step(tok.decode(new, skip_special_tokens=True))
                if games[i].done or len(completion[i]) >= budget:
                    continue
                fb = _feedback_ids(tok, feedback, ended=bool(new) and new[-1] in eos_ids)
                fb = fb[: budget - len(completion[i])]
                completion[i] += fb
                env_mask[i] += [0] * len(fb)
                logprobs[i] += [math.nan] * len(fb)
        if getattr(engine, "enable_sleep_mode", False):
            engine.sleep(level=1)  # free the accelerator for the training step, as TRLGeneration does
        return {"prompt_ids": prompt_ids, "completion_ids": completion, "logprobs": logprobs if shared else None,
                "env_mask": env_mask,
                "solved": [g.solved for g in games], "turns": [g.turns for g in games]}

    return rollout


class GuessingGameTool:
    """The same game as a TRL `environment_factory` environment (tool-calling models)."""

    def __init__(self, low: int = 1, high: int = 16, max_turns: int = 4):
        self.low, self.high, self.max_turns = low, high, max_turns
        self.game: GuessingGame | None = None

    def reset(self, secret: int | None = None, **kwargs: Any) -> str | None:
        self.game = GuessingGame(secret=secret if secret is not None else random.randint(self.low, self.high),
                                 low=self.low, high=self.high, max_turns=self.max_turns)
        return None

    def guess(self, number: int) -> str:
        """Guess the secret number.

        Args:
            number: The guess, an integer.

        Returns:
            "higher", "lower" or "correct", or a note that the game is over.
        """
        if self.game is None or self.game.done:
            return "The game is over."
        return self.game.step(str(number))

    def get_reward(self) -> float:
        return self.game.reward() if self.game is not None else 0.0
