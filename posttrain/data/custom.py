"""Your own data from a recipe, no Python: `custom` (one source) and `mixture` (several, with weights).

`custom` reads a local JSONL, JSON, Parquet or CSV file (the spec's `path`) or a Hub dataset (`hub_id`,
`hub_config`, `data_files`, the spec's `split`), maps its columns (`question_field` or a `template` over any
columns, or `messages_field` for chat prompts in TRL's conversational format; `answer_field`, `id_field`),
adds an optional instruction and system prompt, and grades completions with `grader`:

- `math`: math-verify equivalence of the final answer (last box, else `#### N`, else the last number);
- `exact`: the extracted answer equals the gold after lower-casing and collapsing whitespace;
- `label`: the first of `labels` named in the completion equals the gold label (classification);
- any of them after `answer_regex`: the answer is the last match of the pattern (its first group if any).

`fraction` keeps a seeded share of the rows (after `limit`). The grader is the reward in training (`accuracy`)
and the score in `posttrain eval` suites, as for every task. Every bad row or option is an error naming the file
and row (or the option) before anything trains.

    data:
      train:
        task: custom
        path: data/svamp.jsonl
        options: {template: "{Body} {Question}", answer_field: Answer, id_field: ID, grader: math}

`mixture` draws `size` rows from several task specs in proportion to their `weight` (seeded, without
replacement; a source with too few rows is an error), e.g. GSM8K and your own file. All sources must grade the
same way (one reward for the whole batch).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from posttrain.data.classification import find_label
from posttrain.data.sources import iter_rows, make_id, pick, read_jsonl, stringify_answer
from posttrain.data.tasks import Example, Task, get_task, register_task
from posttrain.rewards import extract_answer, math_equal

__all__ = ["CustomTask", "MixtureTask", "GRADERS"]

GRADERS = ("math", "exact", "label")
_QUESTION_FIELDS = ("question", "problem", "prompt", "input", "instruction")
_ANSWER_FIELDS = ("answer", "solution", "label", "target", "output")
_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".tsv": "csv"}


def _norm(value: Any) -> str:
    return " ".join(str(value).strip().lower().split()).strip(" .")


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "content" in m for m in value)


@register_task("custom")
class CustomTask(Task):
    """Rows of any file or Hub dataset, columns mapped in the recipe; see the module docstring."""

    instruction: ClassVar[str] = ""
    default_split: ClassVar[str | None] = "train"

    def __init__(self, *, hub_id: str | None = None, hub_config: str | None = None,
                 data_files: str | list[str] | dict[str, Any] | None = None, question_field: str | None = None,
                 template: str | None = None, messages_field: str | None = None, answer_field: str | None = None,
                 id_field: str | None = None, grader: str = "math", answer_regex: str | None = None,
                 labels: list[str] | None = None, fraction: float | None = None, seed: int = 0,
                 name: str | None = None, system_prompt: str | None = None, instruction: str | None = None) -> None:
        super().__init__(system_prompt=system_prompt, instruction=instruction)
        where = "task 'custom': option"
        if grader not in GRADERS:
            raise ValueError(f"{where} 'grader' must be one of {', '.join(GRADERS)}, got {grader!r}")
        if grader == "label" and not (isinstance(labels, list) and labels and all(isinstance(x, str) for x in labels)):
            raise ValueError(f"{where} 'labels' (a list of strings) is needed with grader 'label'")
        if sum(x is not None for x in (question_field, template, messages_field)) > 1:
            raise ValueError(f"{where}s 'question_field', 'template' and 'messages_field' exclude each other")
        if fraction is not None and not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
            raise ValueError(f"{where} 'fraction' must be in (0, 1], got {fraction!r}")
        self.pattern = None
        if answer_regex is not None:
            try:
                self.pattern = re.compile(answer_regex)
            except re.error as err:
                raise ValueError(f"{where} 'answer_regex' is not a valid regular expression: {err}") from None
        if template is not None:
            try:
                template.format_map(_Fields())
            except (ValueError, IndexError) as err:
                raise ValueError(f"{where} 'template' is not a valid format string: {err}") from None
        self.hub_id, self.hub_config, self.data_files = hub_id, hub_config, data_files
        self.question_field, self.template, self.messages_field = question_field, template, messages_field
        self.answer_field, self.id_field, self.grader = answer_field, id_field, grader
        self.labels, self.fraction, self.seed, self.label = labels, fraction, seed, name

    # --- rows -------------------------------------------------------------------------------------------

    def _rows(self, split: str | None, path: str | Path | None, limit: int | None) -> Iterator[tuple[str, int, dict]]:
        if path is not None:
            p = Path(path).expanduser()
            if not p.is_file():
                raise FileNotFoundError(f"task 'custom': no data file at {p}")
            kind = _FORMATS.get(p.suffix.lower())
            if kind is None:
                raise ValueError(f"task 'custom': {p} is not a .jsonl, .json, .parquet or .csv file")
            if p.suffix.lower() == ".jsonl":
                yield from read_jsonl(p, limit=limit)
                return
            import datasets

            ds = datasets.load_dataset(kind, data_files=str(p), split="train",
                                       **({"delimiter": "\t"} if p.suffix.lower() == ".tsv" else {}))
            for i, row in enumerate(ds):
                if limit is not None and i >= limit:
                    return
                yield f"{p} row {i + 1}", i, dict(row)
            return
        if self.hub_id is None:
            raise ValueError("task 'custom' needs path= (a local file) or the 'hub_id' option")
        if self.data_files is not None:
            import datasets

            ds = datasets.load_dataset(self.hub_id, self.hub_config, data_files=self.data_files, split=split)
            for i, row in enumerate(ds):
                if limit is not None and i >= limit:
                    return
                yield f"{self.hub_id}[{split}] row {i + 1}", i, dict(row)
            return
        yield from iter_rows(self.name, path=None, hub_id=self.hub_id, hub_config=self.hub_config, split=split,
                             limit=limit)

    def _keep(self, index: int) -> bool:
        if self.fraction is None or self.fraction >= 1:
            return True
        digest = hashlib.sha256(f"{self.seed}:{index}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < self.fraction

    def _prompt(self, row: dict[str, Any], where: str) -> tuple[str, list[dict[str, str]] | None]:
        """(question text, chat messages or None) of a row."""
        if self.messages_field is not None or (self.question_field is None and self.template is None
                                                and _is_messages(row.get("prompt"))):
            field = self.messages_field or "prompt"
            messages = pick(row, (field,), where)
            if not _is_messages(messages):
                raise ValueError(f"{where}: {field!r} must be a list of chat messages with 'role' and 'content'")
            return "", [dict(m) for m in messages]
        if self.template is not None:
            try:
                text = self.template.format_map(row)
            except KeyError as err:
                raise ValueError(f"{where}: template names column {err.args[0]!r}, which the row lacks "
                                 f"(row has {sorted(row)})") from None
        else:
            text = pick(row, (self.question_field,) if self.question_field else _QUESTION_FIELDS, where)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: the question must be a non-empty string")
        return text, None

    def examples(self, split: str | None = None, path: str | Path | None = None,
                 limit: int | None = None) -> list[Example]:
        split = split or self.default_split
        out, self._messages = [], {}
        name = self.label or (Path(path).stem if path is not None else (self.hub_id or "custom").rsplit("/", 1)[-1])
        for where, index, row in self._rows(split, path, limit):
            if not self._keep(index):
                continue
            question, messages = self._prompt(row, where)
            fields = (self.answer_field,) if self.answer_field else _ANSWER_FIELDS
            answer = stringify_answer(pick(row, fields, where), where)
            if self.grader == "label" and answer.lower() not in {x.lower() for x in self.labels}:
                raise ValueError(f"{where}: label {answer!r} is not one of {self.labels}")
            id_fields = (self.id_field,) if self.id_field else ("id",)
            raw_id = pick(row, id_fields, where, required=self.id_field is not None)
            example = Example(id=make_id(name, raw_id, index), question=question, answer=answer)
            if messages is not None:
                self._messages[example.id] = messages
            out.append(example)
        if not out and limit != 0:
            raise ValueError(f"task 'custom': no rows in {path or self.hub_id}")
        return out

    def load(self, split: str | None = None, path: str | Path | None = None, limit: int | None = None) -> Any:
        import datasets

        rows = self.examples(split=split, path=path, limit=limit)
        prompts = [self._chat(self._messages[r.id]) if r.id in self._messages else self.messages(r.question)
                   for r in rows]
        features = datasets.Features({
            "prompt": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
            "answer": datasets.Value("string"), "id": datasets.Value("string")})
        return datasets.Dataset.from_dict({"prompt": prompts, "answer": [r.answer for r in rows],
                                           "id": [r.id for r in rows]}, features=features)

    def _chat(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """A conversational prompt as given, with the instruction after the last user turn and the system prompt
        first (when the recipe sets them)."""
        messages = [{"role": str(m.get("role", "user")), "content": str(m["content"])} for m in messages]
        if self.instruction:
            last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
            if last is not None:
                messages[last] = {**messages[last], "content": messages[last]["content"] + self.instruction}
        if self.system_prompt and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        return messages

    # --- grading ----------------------------------------------------------------------------------------

    def extract_answer(self, text: str) -> str | None:
        if self.pattern is not None:
            matches = list(self.pattern.finditer(text or ""))
            if not matches:
                return None
            last = matches[-1]
            return (last.group(1) if last.groups() else last.group(0)).strip()
        if self.grader == "math":
            return extract_answer(text)
        if self.grader == "label":
            return find_label(text, self.labels)
        return (text or "").strip() or None

    def score(self, text: str, answer: str) -> float:
        predicted = self.extract_answer(text)
        if predicted is None:
            return 0.0
        if self.grader == "math":
            return 1.0 if math_equal(answer, predicted) else 0.0
        return 1.0 if _norm(predicted) == _norm(answer) else 0.0

    def reference_completion(self, answer: str) -> str:
        return f"The final answer is \\boxed{{{answer}}}." if self.grader == "math" else str(answer)

    def grading_key(self) -> tuple:
        if self.grader == "math" and self.pattern is None:
            return Task.grading_key(Task())  # the same as the math benchmarks: last box / #### / number, math-verify
        return ("custom", self.grader, self.pattern.pattern if self.pattern else None, tuple(self.labels or ()))


class _Fields(dict):
    """Any field name formats as empty: checks a template's syntax without a row."""

    def __missing__(self, key: str) -> str:
        return ""


@register_task("mixture")
class MixtureTask(Task):
    """Rows drawn from several task specs in proportion to their weights; see the module docstring."""

    def __init__(self, *, sources: list[dict[str, Any]] | None = None, size: int | None = None, seed: int = 0,
                 system_prompt: str | None = None, instruction: str | None = None) -> None:
        super().__init__(system_prompt=system_prompt, instruction=instruction)
        if not isinstance(sources, list) or len(sources) < 2:
            raise ValueError("task 'mixture': option 'sources' must list at least two task specs "
                             "({task, path, split, options, weight})")
        if size is not None and (not isinstance(size, int) or size < 1):
            raise ValueError(f"task 'mixture': option 'size' must be a positive integer, got {size!r}")
        self.specs, self.tasks, self.weights = [], [], []
        allowed = {"task", "path", "split", "options", "weight", "limit"}
        for i, spec in enumerate(sources):
            where = f"task 'mixture': sources[{i}]"
            if not isinstance(spec, dict) or "task" not in spec:
                raise ValueError(f"{where} must be a mapping with a 'task'")
            unknown = sorted(set(spec) - allowed)
            if unknown:
                raise ValueError(f"{where}: unknown keys {unknown} (allowed: {sorted(allowed)})")
            weight = spec.get("weight", 1.0)
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight <= 0:
                raise ValueError(f"{where}: 'weight' must be a positive number, got {weight!r}")
            if spec["task"] == "mixture":
                raise ValueError(f"{where}: a mixture cannot contain a mixture")
            try:
                task = get_task(spec["task"], system_prompt=system_prompt, **dict(spec.get("options") or {}))
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{where}: {err.args[0] if err.args else err}") from None
            self.specs.append(spec)
            self.tasks.append(task)
            self.weights.append(float(weight))
        keys = {t.grading_key() for t in self.tasks}
        if len(keys) > 1:
            raise ValueError("task 'mixture': the sources grade differently "
                             f"({', '.join(sorted(map(str, keys)))}); one reward must grade the whole batch")
        self.size, self.seed = size, seed
        self.instruction = self.tasks[0].instruction if instruction is None else instruction

    def examples(self, split: str | None = None, path: str | Path | None = None,
                 limit: int | None = None) -> list[Example]:
        pools = []
        for spec, task in zip(self.specs, self.tasks):
            rows = task.examples(split=spec.get("split") or split, path=spec.get("path"), limit=spec.get("limit"))
            pools.append(rows)
        size = self.size or sum(len(p) for p in pools)
        if limit is not None:
            size = min(size, limit)
        total = sum(self.weights)
        counts = [round(size * w / total) for w in self.weights]
        counts[-1] = size - sum(counts[:-1])
        rng = random.Random(f"mixture-{self.seed}")
        out: list[Example] = []
        for i, (pool, count) in enumerate(zip(pools, counts)):
            if count > len(pool):
                raise ValueError(f"task 'mixture': sources[{i}] ({self.specs[i]['task']}) has {len(pool)} rows, "
                                 f"fewer than the {count} its weight asks for; lower size or its weight")
            out += rng.sample(pool, count)
        rng.shuffle(out)
        self._by_id = {}
        for task, pool in zip(self.tasks, pools):
            for r in pool:
                self._by_id[r.id] = task
        return out

    def load(self, split: str | None = None, path: str | Path | None = None, limit: int | None = None) -> Any:
        import datasets

        rows = self.examples(split=split, path=path, limit=limit)
        prompts = []
        for r in rows:
            task = self._by_id[r.id]
            messages = getattr(task, "_messages", {}).get(r.id)
            prompts.append(task._chat(messages) if messages is not None else task.messages(r.question))
        features = datasets.Features({
            "prompt": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
            "answer": datasets.Value("string"), "id": datasets.Value("string")})
        return datasets.Dataset.from_dict({"prompt": prompts, "answer": [r.answer for r in rows],
                                           "id": [r.id for r in rows]}, features=features)

    def extract_answer(self, text: str) -> str | None:
        return self.tasks[0].extract_answer(text)

    def score(self, text: str, answer: str) -> float:
        return self.tasks[0].score(text, answer)

    def reference_completion(self, answer: str) -> str:
        return self.tasks[0].reference_completion(answer)
