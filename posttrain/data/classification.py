"""Text classification as a generation task: `classification` (the continual-learning benchmark tasks).

Rows are `{"sentence": ..., "label": ...}` with `label` one of a fixed list of label strings (the
"long sequence" continual benchmark as folders <task>/{train,test}.jsonl (e.g. data/continual/<task>) with its
labels.json). The model is asked to answer with one label; the predicted label is the label named
earliest in the completion (the longest one when several start at the same place, so "very negative"
is not read as "negative"), compared case-insensitively with the gold label. The same `score` is the
reward when training on the task.

`path` is the task's folder (holding `<split>.jsonl` and `labels.json`) or one JSONL file (labels from
a `labels.json` beside it, or the `labels` option). Without `path`, `hub_id` names a Hub dataset with
the same two columns (names set by `text_field` and `label_field`).

The instruction (with `{labels}` filled in) follows the text by default; `instruction_first` puts it before
the text instead (O-LoRA's prompt layout for the long-sequence benchmark), and `max_chars` clips each line of
a text to that many characters (long passages on a small model's context or a CPU budget; every part of a
two-part input, premise and hypothesis, question and passage, keeps its start).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import ClassVar

from posttrain.data.sources import iter_rows, make_id, pick, stringify_answer
from posttrain.data.tasks import Example, Task, register_task

__all__ = ["ClassificationTask", "find_label"]

DEFAULT_INSTRUCTION = "\nAnswer with one of these labels: {labels}."


def find_label(text: str | None, labels: list[str]) -> str | None:
    """The label (as spelled in `labels`) named earliest in `text`, matched case-insensitively on word
    boundaries; ties at one position go to the longest label. None when no label appears."""
    if not text:
        return None
    best: tuple[int, int, str] | None = None  # (start, -length, label)
    for label in labels:
        pattern = r"(?<![\w])" + re.escape(label) + r"(?![\w])"
        match = re.search(pattern, text, flags=re.IGNORECASE)
        if match is not None:
            key = (match.start(), -len(label), label)
            if best is None or key < best:
                best = key
    return None if best is None else best[2]


@register_task("classification")
class ClassificationTask(Task):
    """Pick one of `labels` for a sentence; graded by the label named first in the completion."""

    instruction: ClassVar[str] = DEFAULT_INSTRUCTION
    default_split: ClassVar[str | None] = "test"

    def __init__(
        self,
        *,
        labels: list[str] | None = None,
        dataset: str | None = None,
        hub_id: str | None = None,
        hub_config: str | None = None,
        text_field: str = "sentence",
        label_field: str = "label",
        system_prompt: str | None = None,
        instruction: str | None = None,
        instruction_first: bool = False,
        max_chars: int | None = None,
    ) -> None:
        super().__init__(system_prompt=system_prompt, instruction=instruction)
        if not isinstance(instruction_first, bool):
            raise TypeError(f"task 'classification': option 'instruction_first' must be true or false, "
                            f"got {instruction_first!r}")
        if max_chars is not None and (isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1):
            raise TypeError(f"task 'classification': option 'max_chars' must be an integer >= 1, got {max_chars!r}")
        self.instruction_first, self.max_chars = instruction_first, max_chars
        if labels is not None and (
            not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x.strip() for x in labels)
        ):
            raise TypeError(f"task 'classification': option 'labels' must be a non-empty list of strings, "
                            f"got {labels!r}")
        if labels is not None and len({x.lower() for x in labels}) != len(labels):
            raise ValueError(f"task 'classification': option 'labels' has duplicates (case-insensitive): {labels}")
        for key, value in (("dataset", dataset), ("hub_id", hub_id), ("hub_config", hub_config)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"task 'classification': option {key!r} must be a string, got {value!r}")
        self.labels = list(labels) if labels is not None else None
        self.dataset = dataset
        self.hub_id, self.hub_config = hub_id, hub_config
        self.text_field, self.label_field = text_field, label_field

    # --- data -----------------------------------------------------------------------------------------

    def _files(self, split: str, path: str | Path) -> tuple[Path, Path | None]:
        """(data file, labels.json or None) for `path` (a task folder or a JSONL file)."""
        p = Path(path).expanduser()
        if p.is_dir():
            data, labels = p / f"{split}.jsonl", p / "labels.json"
        else:
            data, labels = p, p.parent / "labels.json"
        if not data.is_file():
            raise FileNotFoundError(f"no data file for task 'classification' at {data}")
        return data, labels if labels.is_file() else None

    def _read_labels(self, labels_file: Path | None) -> list[str]:
        if self.labels is not None:
            return self.labels
        if labels_file is None:
            raise ValueError("task 'classification': no labels; pass the 'labels' option or put labels.json "
                             "next to the data")
        try:
            labels = json.loads(labels_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{labels_file}: invalid JSON ({exc.msg})") from None
        if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x for x in labels):
            raise ValueError(f"{labels_file}: expected a JSON list of label strings")
        return labels

    def examples(self, split: str | None = None, path: str | Path | None = None,
                 limit: int | None = None) -> list[Example]:
        split = split or self.default_split
        if path is not None:
            data, labels_file = self._files(split, path)
            labels = self._read_labels(labels_file)
            name = self.dataset or (Path(path).name if Path(path).is_dir() else data.parent.name)
            rows = iter_rows(self.name, path=data, hub_id=None, limit=limit)
        else:
            if self.hub_id is None:
                raise ValueError("task 'classification' needs path= (a task folder or JSONL file) "
                                 "or the 'hub_id' option")
            if self.labels is None:
                raise ValueError("task 'classification' from the Hub needs the 'labels' option")
            labels, name = self.labels, self.dataset or self.hub_id.rsplit("/", 1)[-1]
            rows = iter_rows(self.name, path=None, hub_id=self.hub_id, hub_config=self.hub_config,
                             split=split, limit=limit)
        self.labels = labels  # the prompt and the grader use the labels just read
        lowered = {x.lower(): x for x in labels}
        out = []
        for where, index, row in rows:
            text = pick(row, (self.text_field,), where)
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{where}: {self.text_field!r} must be a non-empty string")
            if self.max_chars is not None:  # line by line, so that a premise and its hypothesis both stay
                text = "\n".join(line[: self.max_chars] for line in text.split("\n"))
            gold = stringify_answer(pick(row, (self.label_field,), where), where)
            if gold.lower() not in lowered:
                raise ValueError(f"{where}: label {gold!r} is not one of {labels}")
            out.append(Example(id=make_id(name, pick(row, ("id",), where, required=False), index),
                               question=text, answer=lowered[gold.lower()]))
        if not out and limit != 0:
            raise ValueError(f"task 'classification': no rows in {path or self.hub_id}")
        return out

    # --- prompt and grading ---------------------------------------------------------------------------

    def messages(self, question: str) -> list[dict[str, str]]:
        if self.labels is None:
            raise ValueError("task 'classification': load() the data (or pass 'labels') before building prompts")
        instruction = self.instruction.replace("{labels}", ", ".join(self.labels))
        content = f"{instruction.strip()}\n{question}" if self.instruction_first else question + instruction
        user = {"role": "user", "content": content}
        return [{"role": "system", "content": self.system_prompt}, user] if self.system_prompt else [user]

    def reference_completion(self, answer: str) -> str:
        return str(answer)

    def extract_answer(self, text: str) -> str | None:
        if self.labels is None:
            raise ValueError("task 'classification': labels unknown; load() the data or pass 'labels'")
        return find_label(text, self.labels)

    def score(self, text: str, answer: str) -> float:
        predicted = self.extract_answer(text)
        return 1.0 if predicted is not None and predicted.lower() == str(answer).strip().lower() else 0.0
