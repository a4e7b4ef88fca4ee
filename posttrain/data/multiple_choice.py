"""Multiple-choice questions as a generation task: `multiple_choice` (any JSONL) and `mmlu_stem`.

Rows hold `question`, `choices` (a list of option texts) and `answer` (the 0-based index of the right
option, or its letter). The prompt lists the options as "A. ...", "B. ..." and asks for the letter; the
predicted letter is read from, in order: a \\boxed{} letter, "answer is (B)" / "Answer: B", a letter
opening the completion ("B", "(B)", "B."), the one option whose full text the completion quotes, and
last a letter standing alone in brackets or before ")", "." or ":". Generative grading, like the reasoning
tasks; lm-evaluation-harness's log-likelihood MMLU is available by name through the `lm_eval` suite key.
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Any, ClassVar

from posttrain.data.sources import iter_rows, make_id, pick
from posttrain.data.tasks import Example, Task, register_task
from posttrain.rewards import extract_boxed

__all__ = ["MultipleChoiceTask", "MMLUStem", "extract_choice", "MMLU_STEM_SUBJECTS"]

LETTERS = string.ascii_uppercase
_SEP = "\n\n### choices ###\n"  # separates question and options inside Example.question (never shown)

# The STEM subjects of MMLU (lm-evaluation-harness's mmlu_stem group).
MMLU_STEM_SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "college_biology", "college_chemistry", "college_computer_science",
    "college_mathematics", "college_physics", "computer_security", "conceptual_physics", "electrical_engineering",
    "elementary_mathematics", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_mathematics", "high_school_physics", "high_school_statistics", "machine_learning",
)


def extract_choice(text: str | None, num_choices: int = 4, choices: list[str] | None = None) -> str | None:
    """The option letter a completion picks (see the module docstring for the order of rules), or None."""
    if not text:
        return None
    valid = LETTERS[:num_choices]
    cls = f"[{valid}]"
    boxed = extract_boxed(text)
    if boxed is not None:
        inner = re.sub(r"\\text\{([^}]*)\}", r"\1", boxed).strip(" ().:$")
        if len(inner) == 1 and inner in valid:
            return inner
    said = re.findall(rf"answer\s*(?:is|:)?\s*(?:option\s*)?[:\s]*\(?({cls})\b", text, flags=re.IGNORECASE)
    said = [s.upper() for s in said if s.upper() in valid]
    if said:
        return said[-1]
    opening = re.match(rf"\s*\(?({cls})(?:[).:]|\s*$|\s)", text)
    if opening and (len(text.strip()) == 1 or not re.match(r"\s*A\s+[a-z]", text)):  # "A frog..." is an article
        return opening.group(1)
    if choices:
        quoted = [LETTERS[i] for i, c in enumerate(choices) if c.strip() and c.strip().lower() in text.lower()]
        if len(quoted) == 1:
            return quoted[0]
    alone = re.findall(rf"(?:\(({cls})\)|(?<![\w'])({cls})(?=[).:]))", text)
    if alone:
        return next(x for x in alone[-1] if x)
    return None


class MultipleChoiceTask(Task):
    """Base class: questions with lettered options; subclasses may name a Hub source."""

    instruction: ClassVar[str] = "\nAnswer with the letter of the correct option."
    default_split: ClassVar[str | None] = "test"
    hub_id: ClassVar[str | None] = None
    hub_config: ClassVar[str | None] = None
    subject_fields: ClassVar[tuple[str, ...]] = ("subject", "type")

    def __init__(self, *, subjects: list[str] | None = None, system_prompt: str | None = None,
                 instruction: str | None = None) -> None:
        super().__init__(system_prompt=system_prompt, instruction=instruction)
        if subjects is not None and (not isinstance(subjects, list) or not all(isinstance(s, str) for s in subjects)):
            raise TypeError(f"task {self.name!r}: option 'subjects' must be a list of strings, got {subjects!r}")
        self.subjects = subjects
        self.num_choices = 4  # widened to the largest option count seen when data is loaded

    def _keep(self, row: dict[str, Any], where: str) -> bool:
        if self.subjects is None:
            return True
        return pick(row, self.subject_fields, where, required=False) in self.subjects

    def examples(self, split: str | None = None, path: str | Path | None = None,
                 limit: int | None = None) -> list[Example]:
        split = split or self.default_split
        if path is None and self.hub_id is None:
            raise ValueError(f"task {self.name!r} has no Hub source: pass path= to a JSONL file")
        out: list[Example] = []
        # limit counts kept rows, so the subject filter reads on until it has enough
        for where, index, row in iter_rows(self.name, path=path, hub_id=self.hub_id, hub_config=self.hub_config,
                                           split=split):
            if limit is not None and len(out) >= limit:
                break
            if not self._keep(row, where):
                continue
            out.append(self._example(row, where, index))
        if not out and limit != 0:
            raise ValueError(f"task {self.name!r}: no rows in {path or f'{self.hub_id}[{split}]'}")
        self.num_choices = max([self.num_choices, *(e.question.partition(_SEP)[2].count("\n") + 1 for e in out)])
        return out

    def _example(self, row: dict[str, Any], where: str, index: int) -> Example:
        question = pick(row, ("question",), where)
        choices = pick(row, ("choices", "options"), where)
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{where}: question must be a non-empty string")
        if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
            raise ValueError(f"{where}: choices must be a list of 2 to {len(LETTERS)} options")
        raw = pick(row, ("answer", "label"), where)
        if isinstance(raw, int) and not isinstance(raw, bool) and 0 <= raw < len(choices):
            letter = LETTERS[raw]
        elif isinstance(raw, str) and raw.strip().upper() in LETTERS[: len(choices)]:
            letter = raw.strip().upper()
        else:
            raise ValueError(f"{where}: answer must be an option index 0..{len(choices) - 1} or its letter, "
                             f"got {raw!r}")
        options = "\n".join(f"{LETTERS[i]}. {str(c).strip()}" for i, c in enumerate(choices))
        raw_id = pick(row, ("id",), where, required=False)
        return Example(id=make_id(self.name, raw_id, index), question=question.strip() + _SEP + options, answer=letter)

    def messages(self, question: str) -> list[dict[str, str]]:
        stem, _, options = question.partition(_SEP)
        return super().messages(f"{stem}\n\n{options}" if options else stem)

    def extract_answer(self, text: str) -> str | None:
        return extract_choice(text, num_choices=self.num_choices)

    def score(self, text: str, answer: str) -> float:
        gold = str(answer).strip().upper()
        return 1.0 if self.extract_answer(text) == gold else 0.0


@register_task("multiple_choice")
class GenericMultipleChoice(MultipleChoiceTask):
    """Any JSONL of {question, choices, answer} rows (path required)."""


@register_task("mmlu_stem")
class MMLUStem(MultipleChoiceTask):
    """MMLU, STEM subjects only (a local mmlu_stem.jsonl, or cais/mmlu on the Hub)."""

    hub_id = "cais/mmlu"
    hub_config = "all"

    def __init__(self, *, subjects: list[str] | None = None, system_prompt: str | None = None,
                 instruction: str | None = None) -> None:
        super().__init__(subjects=list(MMLU_STEM_SUBJECTS) if subjects is None else subjects,
                         system_prompt=system_prompt, instruction=instruction)
