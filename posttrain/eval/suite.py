"""Evaluation suites: YAML files (top-level `eval/`) -> typed, validated `Suite` objects.

A suite names its tasks; each entry says where the data comes from (a registered task loaded from the
Hub or a local path, or an lm-evaluation-harness task by name), how prompts are formatted, how answers
are extracted and graded, and how to sample. Suite-level `sampling:` is the default every entry's own
`sampling:` is merged over. Problems are collected and reported all at once, each with the file and the
key path (`tasks[2].sampling.n`), with the same checker that validates recipes.

    name: reasoning
    sampling: {n: 4, temperature: 0.6, max_new_tokens: 512}
    tasks:
      - gsm8k                                    # shorthand for {name: gsm8k}
      - {name: aime24, sampling: {n: 8}}
      - {name: sst2, task: classification, path: ../continual/sst2}
      - {name: hellaswag, lm_eval: hellaswag}    # lm-evaluation-harness, HF backend
      - {name: heldout_pairs, kind: pairs, path: pairs.jsonl}   # preference pairs: log-prob metrics
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from posttrain.recipe import RecipeError, _build, _read_yaml_file, _render  # shared YAML checking
from posttrain.resources import EVAL_DIR  # the shipped suites (package data)

__all__ = ["SamplingSpec", "SuiteTask", "Suite", "SuiteError", "load_suite", "suite_from_dict", "find_suite",
           "EVAL_DIR"]

Format = Literal["chat", "plain"]
EntryKind = Literal["generate", "pairs"]


class SuiteError(RecipeError):
    """An unusable suite file: every problem, one per line, each with its key path."""

    def __init__(self, problems: str | list[str], source: str | None = None):
        super().__init__(problems, source)
        count = len(self.problems)
        header = f"invalid eval suite {source or '<suite>'}: {count} problem{'' if count == 1 else 's'}"
        self.args = ("\n".join([header, *(f"  - {p}" for p in self.problems)]),)

    def __str__(self) -> str:
        return self.args[0]


@dataclass
class SamplingSpec:
    """How each prompt is sampled; temperature 0 is greedy (then n must be 1)."""

    n: int = field(default=1, metadata={"ge": 1})
    temperature: float = field(default=0.0, metadata={"ge": 0})
    top_p: float = field(default=1.0, metadata={"gt": 0, "le": 1})
    top_k: int | None = field(default=None, metadata={"ge": 0})
    max_new_tokens: int = field(default=512, metadata={"ge": 1})
    seed: int = field(default=0, metadata={"ge": 0})


@dataclass
class SuiteTask:
    """One entry of a suite."""

    _shorthand: ClassVar[str] = "name"

    name: str  # the result key and file name (samples_<name>.jsonl); the task's registry name by default
    # generate: sample and grade a task's prompts; pairs: the preference pairs (TRL's formats) in the JSONL file at
    # `path`: log-probs of chosen and rejected, their change from the reference, reward accuracy (eval/preference.py)
    kind: EntryKind = "generate"
    task: str | None = None  # registered task (posttrain.data); default: `name`
    lm_eval: str | None = None  # an lm-evaluation-harness task name instead of a registered task
    path: str | None = None  # local JSONL / folder; relative paths resolve against --data-dir
    split: str | None = None
    limit: int | None = field(default=None, metadata={"ge": 1})
    prompt_format: Format = "chat"  # chat: the tokenizer's chat template; plain: the message contents
    system_prompt: str | None = None
    instruction: str | None = None  # replaces the task's instruction appended to each question
    extractor: str = "task"  # answer extraction (posttrain.eval.grading.EXTRACTORS)
    grader: str = "task"  # grading of the extracted answer (posttrain.eval.grading.GRADERS)
    options: dict[str, Any] = field(default_factory=dict)  # task options (get_task)
    sampling: SamplingSpec = field(default_factory=SamplingSpec)
    kl_to_base: bool = False  # also measure KL(model || base) on this task's prompts
    lm_eval_args: dict[str, Any] = field(default_factory=dict)  # extra simple_evaluate arguments

    @property
    def task_name(self) -> str:
        return self.task or self.name


@dataclass
class Suite:
    name: str
    description: str = ""
    kind: Literal["tasks", "continual"] = "tasks"  # continual: tasks in training order (forgetting matrix)
    sampling: dict[str, Any] = field(default_factory=dict)
    tasks: list[SuiteTask] = field(default_factory=list)
    lm_eval_include: list[str] = field(default_factory=list)  # folders of local lm-eval task definitions
    data_dir: str | None = None  # default for --data-dir; relative to the suite file
    source: str | None = field(default=None, compare=False, metadata={"yaml": False})

    def default_data_dir(self) -> Path | None:
        """`data_dir:` of the file, resolved against the file's folder (None when unset)."""
        if self.data_dir is None:
            return None
        p = Path(self.data_dir).expanduser()
        return p if p.is_absolute() or self.source is None else Path(self.source).parent / p

    def task(self, name: str) -> SuiteTask:
        for entry in self.tasks:
            if entry.name == name:
                return entry
        raise KeyError(f"suite {self.name!r} has no task {name!r}; it has {[t.name for t in self.tasks]}")


def find_suite(name: str | Path) -> Path:
    """A suite path as given, else `eval/<name>` (with or without .yaml) of this checkout."""
    shipped = str(name).removeprefix("eval/")
    for candidate in (Path(name), EVAL_DIR / shipped, EVAL_DIR / f"{shipped}.yaml"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"eval suite not found: {name} (looked at the path and in {EVAL_DIR})")


def load_suite(path: str | Path) -> Suite:
    """Read and validate a suite file (a path, or a name under the top-level eval/ folder)."""
    p = find_suite(path)
    try:
        data = _read_yaml_file(p)
    except RecipeError as err:
        raise SuiteError([line.replace("recipe file", "suite file") for line in err.problems], str(p)) from None
    return suite_from_dict(data, source=str(p))


def suite_from_dict(data: dict[str, Any], source: str | None = None) -> Suite:
    errors: list[str] = []
    data = dict(data)
    defaults = data.get("sampling") or {}
    if not isinstance(defaults, dict):
        errors.append(f"sampling: expected mapping, got {type(defaults).__name__}")
        defaults = {}
    else:  # check the defaults on their own, so a bad default is reported once, at its own key
        start = len(errors)
        _build(SamplingSpec, defaults, ["sampling"], errors)
        if len(errors) > start:
            defaults = {}
    tasks = data.get("tasks")
    if isinstance(tasks, list):
        merged = []
        for entry in tasks:
            if isinstance(entry, str):
                entry = {"name": entry}
            if isinstance(entry, dict):
                own = entry.get("sampling")
                entry = {**entry, "sampling": {**defaults, **own} if isinstance(own, dict) else (own or dict(defaults))}
            merged.append(entry)
        data["tasks"] = merged
    before = len(errors)
    suite = _build(Suite, data, [], errors)
    if len(errors) == before and suite is not None:
        _check_semantics(suite, errors)
    if errors:
        raise SuiteError(errors, source)
    suite.source = source
    return suite


def _check_semantics(suite: Suite, errors: list[str]) -> None:
    """What the types cannot say: known task / extractor / grader names, unique names, greedy n."""
    from posttrain.data import TASKS
    from posttrain.eval.grading import EXTRACTORS, GRADERS
    from posttrain.rewards import suggest

    if not suite.tasks:
        errors.append("tasks: a suite needs at least one task")
    seen: set[str] = set()
    for i, t in enumerate(suite.tasks):
        where = _render(["tasks", i])
        if t.name in seen:
            errors.append(f"{where}.name: duplicate task name {t.name!r} (names key the results and sample files)")
        seen.add(t.name)
        if "/" in t.name or t.name.startswith("."):
            errors.append(f"{where}.name: {t.name!r} is used in file names; no '/' and no leading '.'")
        if t.kind == "pairs":
            if t.lm_eval is not None or t.kl_to_base:
                errors.append(f"{where}: a 'pairs' entry reads the preference pairs at its path (or --path); it takes "
                              "no lm_eval and no kl_to_base")
        elif t.lm_eval is not None:
            if t.task is not None:
                errors.append(f"{where}: set either 'task' (a posttrain task) or 'lm_eval' (an lm-eval task), not both")
            if t.kl_to_base:
                errors.append(f"{where}.kl_to_base: KL is measured on posttrain tasks only, not lm-eval ones")
        else:
            if t.task_name not in TASKS:
                errors.append(f"{where}.task: unknown task {t.task_name!r}." + suggest(t.task_name, list(TASKS)))
            for key, known in (("extractor", EXTRACTORS), ("grader", GRADERS)):
                value = getattr(t, key)
                if value not in known:
                    errors.append(f"{where}.{key}: unknown {key} {value!r}." + suggest(value, list(known)))
            if t.grader == "task" and t.extractor != "task":
                errors.append(f"{where}.grader: 'task' grades with the task's own extractor; with extractor "
                              f"{t.extractor!r} choose a grader such as 'math', 'exact' or 'choice'")
        if t.sampling.temperature == 0 and t.sampling.n > 1:
            errors.append(f"{where}.sampling: n={t.sampling.n} with temperature 0 (greedy) gives identical samples")
    if suite.kind == "continual" and any(t.lm_eval is not None or t.kind == "pairs" for t in suite.tasks):
        errors.append("kind: a continual suite's tasks must be posttrain tasks (the forgetting matrix grades them)")


def with_overrides(suite: Suite, *, n: int | None = None, temperature: float | None = None,
                   max_new_tokens: int | None = None, limit: int | None = None, seed: int | None = None) -> Suite:
    """A copy of `suite` with command-line sampling overrides applied to every task (re-validated)."""
    tasks = []
    for t in suite.tasks:
        s = t.sampling
        sampling = dataclasses.replace(
            s,
            n=s.n if n is None else n,
            temperature=s.temperature if temperature is None else temperature,
            max_new_tokens=s.max_new_tokens if max_new_tokens is None else max_new_tokens,
            seed=s.seed if seed is None else seed,
        )
        if temperature is not None and temperature == 0 and n is None:
            sampling.n = 1  # --temperature 0 alone means greedy, one sample
        if sampling.temperature == 0:
            sampling.top_p, sampling.top_k = 1.0, None
        new_limit = t.limit if limit is None else (limit if t.limit is None else min(limit, t.limit))
        tasks.append(dataclasses.replace(t, sampling=sampling, limit=new_limit))
    out = dataclasses.replace(suite, tasks=tasks)
    errors: list[str] = []
    _check_semantics(out, errors)
    if errors:
        raise SuiteError(errors, f"{suite.source} (with command-line overrides)")
    return out
