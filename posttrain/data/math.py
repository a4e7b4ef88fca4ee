"""Math benchmarks graded with math-verify: gsm8k, math500, aime24, amc23.

Each loads from the Hub by default, or from `path`: a JSONL file or a folder holding `<name>.jsonl` (so
`path=data/benchmarks`, as `posttrain data benchmarks` writes it, serves all four). With `path`, the file is the
data and `split` is not consulted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from posttrain.data.sources import iter_rows, make_id, pick, stringify_answer
from posttrain.data.tasks import Example, Task, register_task

__all__ = ["MathTask", "GSM8K", "MATH500", "AIME24", "AMC23"]


class MathTask(Task):
    """A benchmark of (question, answer) rows; subclasses name the source and the fields."""

    hub_id: ClassVar[str]
    hub_config: ClassVar[str | None] = None
    default_split: ClassVar[str | None] = "test"
    question_fields: ClassVar[tuple[str, ...]] = ("problem", "question")
    answer_fields: ClassVar[tuple[str, ...]] = ("answer",)
    id_fields: ClassVar[tuple[str, ...]] = ("id", "unique_id", "idx")
    # Logical split -> the Hub's split name, for benchmarks published under an odd split name.
    hub_splits: ClassVar[dict[str, str]] = {}

    def __init__(self, *, system_prompt: str | None = None, instruction: str | None = None) -> None:
        super().__init__(system_prompt=system_prompt, instruction=instruction)

    def gold(self, value: Any, where: str) -> str:
        """The gold answer string from the raw answer field."""
        return stringify_answer(value, where)

    def examples(self, split: str | None = None, path: str | Path | None = None,
                 limit: int | None = None) -> list[Example]:
        split = split or self.default_split
        split = self.hub_splits.get(split, split) if split else split
        out = []
        for where, index, row in iter_rows(
            self.name, path=path, hub_id=self.hub_id, hub_config=self.hub_config, split=split, limit=limit
        ):
            question = pick(row, self.question_fields, where)
            if not isinstance(question, str) or not question.strip():
                raise ValueError(f"{where}: question must be a non-empty string")
            answer = self.gold(pick(row, self.answer_fields, where), where)
            raw_id = pick(row, self.id_fields, where, required=False)
            out.append(Example(id=make_id(self.name, raw_id, index), question=question, answer=answer))
        if not out and limit != 0:
            raise ValueError(f"task {self.name!r}: no rows in {path or f'{self.hub_id}[{split}]'}")
        return out


@register_task("gsm8k")
class GSM8K(MathTask):
    """Grade-school word problems; the gold is the number after the solution's `#### ` marker."""

    hub_id = "openai/gsm8k"
    hub_config = "main"
    question_fields = ("question",)

    def gold(self, value: Any, where: str) -> str:
        text = stringify_answer(value, where)
        if "####" not in text:
            raise ValueError(f"{where}: gsm8k answer has no '#### N' marker")
        final = text.rsplit("####", 1)[1].strip().replace(",", "")
        if not final:
            raise ValueError(f"{where}: gsm8k answer has nothing after '####'")
        return final


@register_task("math500")
class MATH500(MathTask):
    """The 500-problem MATH test subset (LaTeX answers)."""

    hub_id = "HuggingFaceH4/MATH-500"


@register_task("aime24")
class AIME24(MathTask):
    """AIME 2024 (30 problems, integer answers 0-999)."""

    hub_id = "HuggingFaceH4/aime_2024"
    default_split = "train"
    hub_splits = {"test": "train"}  # its only split is "train", but it is an evaluation set


@register_task("amc23")
class AMC23(MathTask):
    """AMC 2023 (40 problems; answers stored as floats such as 27.0, graded as "27")."""

    hub_id = "math-ai/amc23"
