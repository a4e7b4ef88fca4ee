"""Offline synthetic tasks: `arithmetic`, the quickstart default ("What is 14 + 17?").

Problems are indexed: index -> (operands, operators) is a bijection on the problem space, so the
held-out test set is a seeded sample of distinct indices and training draws only indices outside
it. Same options and seed, same problems, on any machine.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from posttrain.data.sources import iter_rows, make_id, pick, stringify_answer
from posttrain.data.tasks import Example, Task, register_task
from posttrain.rewards import extract_boxed, last_number

__all__ = ["ArithmeticTask", "evaluate"]

_OPS = "+-*"
_ENUMERATE_BELOW = 2_000_000  # problem spaces up to this size are listed outright when drawing train


def evaluate(operands: list[int], ops: list[str]) -> int:
    """The value of `a0 op0 a1 op1 ...` with the usual precedence (* before + and -)."""
    terms, signs = [operands[0]], []
    for op, value in zip(ops, operands[1:]):
        if op == "*":
            terms[-1] *= value
        else:
            terms.append(value)
            signs.append(op)
    total = terms[0]
    for sign, term in zip(signs, terms[1:]):
        total = total + term if sign == "+" else total - term
    return total


@register_task("arithmetic")
class ArithmeticTask(Task):
    """Integer arithmetic on `num_operands` numbers in [min_value, max_value] with operators `ops`.

    Graded as the small model is measured in ENVIRONMENT.md: the boxed answer when there is one,
    else the last number of the completion (SmolLM2 rarely fills the box).
    """

    instruction = " Put the final answer in \\boxed{}."
    default_split = "train"
    splits = ("train", "test")

    def __init__(
        self,
        *,
        min_value: int = 1,
        max_value: int = 20,
        num_operands: int = 2,
        ops: str = "+",
        num_train: int = 1000,
        num_eval: int = 100,
        seed: int = 0,
        system_prompt: str | None = None,
        instruction: str | None = None,
    ) -> None:
        super().__init__(system_prompt=system_prompt, instruction=instruction)
        ints = {"min_value": min_value, "max_value": max_value, "num_operands": num_operands}
        ints |= {"num_train": num_train, "num_eval": num_eval, "seed": seed}
        for key, value in ints.items():
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"task 'arithmetic': option {key!r} must be an integer, got {value!r}")
        if min_value > max_value:
            raise ValueError(f"task 'arithmetic': option 'min_value' ({min_value}) > 'max_value' ({max_value})")
        if num_operands < 2:
            raise ValueError(f"task 'arithmetic': option 'num_operands' must be >= 2, got {num_operands}")
        if not isinstance(ops, str) or not ops or set(ops) - set(_OPS):
            raise ValueError(f"task 'arithmetic': option 'ops' must be a non-empty subset of {_OPS!r}, got {ops!r}")
        for key in ("num_train", "num_eval"):
            if ints[key] < 0:
                raise ValueError(f"task 'arithmetic': option {key!r} must be >= 0, got {ints[key]}")
        self.min_value, self.max_value, self.num_operands = min_value, max_value, num_operands
        self.ops = "".join(dict.fromkeys(ops))  # deduplicated, order kept
        self.num_train, self.num_eval, self.seed = num_train, num_eval, seed
        self.space = (max_value - min_value + 1) ** num_operands * len(self.ops) ** (num_operands - 1)
        if num_eval > self.space or (num_train > 0 and num_eval >= self.space):
            raise ValueError(
                f"task 'arithmetic': the problem space holds {self.space} problems, too few for "
                f"num_eval={num_eval} held-out problems plus training problems; widen min_value/max_value, "
                f"add operands or ops, or lower num_eval"
            )

    def problem(self, index: int) -> tuple[list[int], list[str]]:
        """Operands and operators of problem `index` in [0, space)."""
        width = self.max_value - self.min_value + 1
        operands = []
        for _ in range(self.num_operands):
            index, digit = divmod(index, width)
            operands.append(self.min_value + digit)
        ops = []
        for _ in range(self.num_operands - 1):
            index, digit = divmod(index, len(self.ops))
            ops.append(self.ops[digit])
        return operands, ops

    def example(self, index: int, id: str) -> Example:
        operands, ops = self.problem(index)
        shown = [str(v) if v >= 0 else f"({v})" for v in operands]
        expr = shown[0] + "".join(f" {op} {v}" for op, v in zip(ops, shown[1:]))
        return Example(id=id, question=f"What is {expr}?", answer=str(evaluate(operands, ops)))

    def test_indices(self) -> list[int]:
        rng = random.Random(f"arithmetic-test-{self.seed}")
        if self.space <= sys.maxsize:  # len(range(n)) overflows beyond it
            return rng.sample(range(self.space), self.num_eval)
        seen: dict[int, None] = {}
        while len(seen) < self.num_eval:
            seen[rng.randrange(self.space)] = None
        return list(seen)

    def train_indices(self) -> list[int]:
        held_out = set(self.test_indices())
        rng = random.Random(f"arithmetic-train-{self.seed}")
        if self.space <= _ENUMERATE_BELOW:
            pool = [i for i in range(self.space) if i not in held_out]
            return [pool[rng.randrange(len(pool))] for _ in range(self.num_train)]
        out: list[int] = []  # a huge space: rejection is cheap since the test set is a tiny part of it
        while len(out) < self.num_train:
            i = rng.randrange(self.space)
            if i not in held_out:
                out.append(i)
        return out

    def examples(self, split: str | None = None, path: str | Path | None = None,
                 limit: int | None = None) -> list[Example]:
        if path is not None:
            return [
                Example(
                    id=make_id(self.name, pick(row, ("id",), where, required=False), index),
                    question=str(pick(row, ("question",), where)),
                    answer=stringify_answer(pick(row, ("answer",), where), where),
                )
                for where, index, row in iter_rows(self.name, path=path, hub_id=None, limit=limit)
            ]
        split = split or self.default_split
        if split not in self.splits:
            raise ValueError(f"task 'arithmetic' has splits {self.splits}, not {split!r}")
        indices = self.test_indices() if split == "test" else self.train_indices()
        if limit is not None:
            indices = indices[:limit]
        return [self.example(i, f"{self.name}-{split}-{n}") for n, i in enumerate(indices)]

    def extract_answer(self, text: str) -> str | None:
        boxed = extract_boxed(text)
        return boxed if boxed is not None else last_number(text)
