"""Preference pairs: TRL's preference formats from a local JSONL file or a Hub dataset, validated row by row,
and an offline builder that samples and grades completions of a verifiable task.

Formats (as TRL's DPOTrainer and RewardTrainer read them):
- standard: `{"prompt": str, "chosen": str, "rejected": str}`;
- conversational: `{"prompt": [messages], "chosen": [assistant messages], "rejected": [assistant messages]}`;
- implicit prompt: `{"chosen": [messages], "rejected": [messages]}` (or a string `prompt` beside conversational
  `chosen`/`rejected`, as in HuggingFaceH4/ultrafeedback_binarized): the shared leading turns become the prompt.
Every row is checked before training: a missing field, an empty response, or a chosen response identical to the
rejected one stops the run with the file (or dataset) and row number. Nothing is dropped silently.

The builder (`build_preference_pairs`, `posttrain data preferences`) samples `n` completions per prompt of a
task (arithmetic, gsm8k, ...) with the rollout engine, grades them with the task's grader (or any `scorer`),
and pairs a higher-scored completion (chosen) with a lower-scored one (rejected) of the same prompt. Prompts
whose samples are all wrong can take the task's reference answer as the chosen response
(`reference_chosen`), so that a weak model still yields pairs. A sidecar `<file>.meta.json` records the model,
task, seed, sampling and the counts.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from posttrain.data.sources import read_jsonl, write_jsonl

if TYPE_CHECKING:
    import datasets

__all__ = ["PairBuildSpec", "PreferenceSource", "build_preference_pairs", "check_preference_row",
           "load_preferences", "pairs_cache_path", "preference_rows", "resolve_preferences"]


@dataclass
class PairBuildSpec:
    """How to build pairs offline from a verifiable task (recipe: `data.<split>.build`)."""

    task: str = "arithmetic"
    options: dict[str, Any] = field(default_factory=dict)  # the task's own options
    split: str = "train"  # the task split whose prompts are sampled
    path: str | None = None  # the task's local data (a JSONL file or folder), as in data.train.path of GRPO
    num_prompts: int = field(default=64, metadata={"ge": 1})
    n: int = field(default=8, metadata={"ge": 2})  # samples per prompt
    temperature: float = field(default=1.0, metadata={"gt": 0})
    top_p: float = field(default=1.0, metadata={"gt": 0, "le": 1})
    max_new_tokens: int = field(default=64, metadata={"ge": 1})
    max_pairs_per_prompt: int = field(default=2, metadata={"ge": 1})
    reference_chosen: bool = True  # all-wrong prompts: the task's reference answer is the chosen response
    seed: int = 0
    model: str | None = None  # the sampling model; None: the recipe's model
    system_prompt: str | None = None
    batch_size: int = field(default=16, metadata={"ge": 1})


@dataclass
class PreferenceSource:
    """Where preference pairs come from (recipe: `data.train`, `data.eval` of preference kinds).

    `path`: a local JSONL file. With `build` set, a missing file at `path` is built on first use and reused
    afterwards (`path: null` caches it under ~/.cache/posttrain/pairs, keyed by model and build settings).
    `hub_id` (+ `hub_config`, `split`): a Hub dataset instead. `limit`: the first N pairs.
    """

    _shorthand: ClassVar[str] = "path"  # YAML `train: pairs.jsonl` means `train: {path: pairs.jsonl}`

    path: str | None = None
    hub_id: str | None = None
    hub_config: str | None = None
    split: str | None = None
    limit: int | None = field(default=None, metadata={"ge": 1})
    build: PairBuildSpec | None = None

    def problems(self, where: str) -> list[str]:
        """Recipe problems of this source (`where` is its key path, e.g. "data.train")."""
        given = [k for k in ("path", "hub_id") if getattr(self, k) is not None]
        if self.hub_id is not None and (self.path is not None or self.build is not None):
            return [f"{where}: give hub_id or path/build, not both"]
        if not given and self.build is None:
            return [f"{where}: needs path (a JSONL file), hub_id (a Hub dataset) or build (pairs from a task)"]
        return []


# --- validation -----------------------------------------------------------------------------------------


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) for m in value)


def _text_of(value: Any) -> str:
    if isinstance(value, str):
        return value
    return "".join(str(m.get("content") or "") for m in value)


def check_preference_row(row: dict[str, Any], where: str) -> dict[str, Any]:
    """The row in explicit-prompt form (`prompt`, `chosen`, `rejected`), other columns kept; ValueError naming
    `where` (file:line or dataset row) for a missing field, an empty response, or chosen == rejected."""
    missing = [k for k in ("chosen", "rejected") if row.get(k) is None]
    if missing:
        raise ValueError(f"{where}: missing field {' and '.join(map(repr, missing))} (row has {sorted(row)})")
    chosen, rejected = row["chosen"], row["rejected"]
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if not (isinstance(value, str) or _is_messages(value)):
            raise ValueError(f"{where}: {key!r} must be a string or a list of chat messages, "
                             f"got {type(value).__name__}")
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise ValueError(f"{where}: 'chosen' and 'rejected' must both be strings or both be message lists")
    out = dict(row)
    prompt = row.get("prompt")
    if _is_messages(chosen) and not _is_messages(prompt):
        # implicit prompt: the shared leading turns (a string prompt beside conversations is a duplicate of them)
        from trl.data_utils import extract_prompt

        out.update(extract_prompt({"chosen": chosen, "rejected": rejected}))
        if not out["prompt"]:
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"{where}: no prompt: no 'prompt' field and 'chosen'/'rejected' share no "
                                 "leading turns")
            out["prompt"] = [{"role": "user", "content": prompt}]
    elif prompt is None:
        raise ValueError(f"{where}: missing field 'prompt' (row has {sorted(row)})")
    elif isinstance(prompt, str) != isinstance(chosen, str):
        raise ValueError(f"{where}: 'prompt' and 'chosen' mix the standard (string) and conversational formats")
    if not _text_of(out["prompt"]).strip():
        raise ValueError(f"{where}: empty 'prompt'")
    for key in ("chosen", "rejected"):
        if not _text_of(out[key]).strip():
            raise ValueError(f"{where}: empty {key!r} response")
    if out["chosen"] == out["rejected"]:
        raise ValueError(f"{where}: 'chosen' and 'rejected' are identical")
    return out


# --- loading --------------------------------------------------------------------------------------------


def _hub_rows(source: PreferenceSource) -> Iterator[tuple[str, dict[str, Any]]]:
    import datasets

    split = source.split or "train"
    ds = datasets.load_dataset(source.hub_id, source.hub_config, split=split)
    for i, row in enumerate(ds):
        if source.limit is not None and i >= source.limit:
            return
        yield f"{source.hub_id}[{split}] row {i + 1}", dict(row)


def preference_rows(source: PreferenceSource, path: str | Path | None = None) -> list[dict[str, Any]]:
    """Every row of the source (a local file at `path`, default `source.path`, or the Hub), checked."""
    local = path if path is not None else source.path
    if local is not None:
        p = Path(local).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"preference file not found: {p}")
        rows = ((where, row) for where, _, row in read_jsonl(p, limit=source.limit))
    elif source.hub_id is not None:
        rows = _hub_rows(source)
    else:
        raise ValueError("preference source has neither path nor hub_id")
    out = [check_preference_row(row, where) for where, row in rows]
    if not out:
        raise ValueError(f"no preference pairs in {local or source.hub_id}")
    formats = {isinstance(r["chosen"], str) for r in out}
    if len(formats) > 1:
        raise ValueError(f"{local or source.hub_id}: rows mix the standard and conversational formats")
    return out


def load_preferences(source: PreferenceSource, path: str | Path | None = None) -> datasets.Dataset:
    """A Dataset with `prompt`, `chosen`, `rejected` (TRL's explicit-prompt format) and any other columns."""
    import datasets

    rows = preference_rows(source, path)
    return datasets.Dataset.from_list(rows)


# --- building pairs from a task ------------------------------------------------------------------------

Scorer = Callable[[str, str], float]


def pairs_cache_path(build: PairBuildSpec, model: str) -> Path:
    """Where pairs built with `build` from `model` are cached when the recipe gives no path."""
    from posttrain.models.registry import cache_dir

    key = json.dumps({"build": asdict(build), "model": model}, sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_dir().parent / "pairs" / f"{build.task}-{build.split}-{digest}.jsonl"


def _meta_path(path: Path) -> Path:
    return path.with_name(path.name.removesuffix(".jsonl") + ".meta.json")


def resolve_preferences(source: PreferenceSource, model: str, *,
                        build_fn: Callable[..., Path] | None = None) -> Path | None:
    """The local pair file of a source, built first when `build` is set and the file is absent; None for a
    Hub source. An existing file built with other settings is an error (delete it, or point `path` elsewhere).

    `model` is the recipe's model (the sampler unless `build.model` names another)."""
    if source.build is None:
        return None if source.path is None else Path(source.path).expanduser()
    sampler = source.build.model or model
    path = Path(source.path).expanduser() if source.path else pairs_cache_path(source.build, sampler)
    meta = _meta_path(path)
    wanted = {"build": asdict(source.build), "model": sampler}
    if path.is_file():
        if meta.is_file():
            old = json.loads(meta.read_text())
            if {"build": old.get("build"), "model": old.get("model")} != json.loads(json.dumps(wanted)):
                raise ValueError(f"{path} was built with other settings ({meta}); delete it to rebuild, or set "
                                 "another path")
        return path
    (build_fn or build_preference_pairs)(sampler, source.build, path)
    return path


def _reference_rows(task: Any, rows: Sequence[dict[str, Any]]) -> list[str]:
    return [task.reference_completion(r["answer"]) for r in rows]


def build_preference_pairs(model: str | Any, build: PairBuildSpec, output: str | Path, *, tokenizer: Any = None,
                           engine: Any = None, scorer: Scorer | None = None,
                           progress: bool = True) -> Path:
    """Sample `build.n` completions for `build.num_prompts` prompts of `build.task`, grade them and write
    conversational pairs (prompt, chosen, rejected, plus id, answer and both scores) to `output` with a
    `.meta.json` sidecar. `model` is a name/path (loaded here) or a loaded model with its `tokenizer`;
    `engine` (any rollout engine) replaces the HF engine built around it; `scorer(text, answer)` replaces the
    task's grader. Returns the path. Raises when no pair can be formed."""
    from posttrain.data import format_prompt, get_task
    from posttrain.rollout import HFEngine, SamplingParams

    task = get_task(build.task, system_prompt=build.system_prompt, **build.options)
    rows = [dict(r) for r in task.load(split=build.split, path=build.path, limit=build.num_prompts)]
    model_name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path",
                                                               type(model).__name__)
    if engine is None:
        if isinstance(model, str):
            from posttrain.models import load_model, load_tokenizer

            tokenizer = tokenizer or load_tokenizer(model)
            model = load_model(model).eval()
        engine = HFEngine(model, tokenizer, batch_size=build.batch_size, progress=progress)
    prompts = [format_prompt(tokenizer, r["prompt"]) for r in rows]
    sampling = SamplingParams(n=build.n, temperature=build.temperature, top_p=build.top_p,
                              max_new_tokens=build.max_new_tokens, seed=build.seed)
    outputs = engine.generate(prompts, sampling)
    score = scorer or task.score
    rng = random.Random(f"pairs-{build.seed}")
    references = _reference_rows(task, rows) if build.reference_chosen else [None] * len(rows)
    pairs, counts = [], {"prompts": len(rows), "samples": len(rows) * build.n, "sampled_pairs": 0,
                         "reference_pairs": 0, "prompts_without_pair": 0, "correct_samples": 0}
    for row, out, reference in zip(rows, outputs, references, strict=True):
        graded = {}  # distinct texts only: two identical samples make no pair
        for c in out.completions:
            if c.text.strip():
                graded.setdefault(c.text, float(score(c.text, row["answer"])))
        counts["correct_samples"] += sum(float(score(c.text, row["answer"])) >= 0.5 for c in out.completions)
        made = _pairs_of(graded, reference, build.max_pairs_per_prompt, rng)
        if reference is not None:
            graded.setdefault(reference, float(score(reference, row["answer"])))
        for chosen, rejected, from_reference in made:
            counts["reference_pairs" if from_reference else "sampled_pairs"] += 1
            pairs.append({
                "id": f"{row['id']}-{len(pairs)}", "prompt": row["prompt"],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
                "answer": row["answer"],
                "chosen_score": graded[chosen], "rejected_score": graded[rejected],
            })
        counts["prompts_without_pair"] += not made
    if not pairs:
        raise ValueError(f"no preference pairs from {len(rows)} prompts of task {build.task!r}: every prompt's "
                         f"{build.n} samples got one score; raise n or temperature, or set reference_chosen: true")
    path = write_jsonl(output, pairs)
    meta = {"build": asdict(build), "model": model_name,
            "pairs": len(pairs), "counts": counts, "file": path.name}
    _meta_path(path).write_text(json.dumps(meta, indent=2, default=str))
    return path


def _pairs_of(graded: dict[str, float], reference: str | None, limit: int,
              rng: random.Random) -> list[tuple[str, str, bool]]:
    """Up to `limit` (chosen, rejected, chosen_is_reference) pairs of one prompt: every (higher, lower) score
    pair of distinct texts, drawn at random; when no sample beats another and a reference is given, the
    reference against the lowest-scored samples."""
    texts = sorted(graded)  # a fixed order, so the draw depends on the seed only
    candidates = [(a, b, False) for a in texts for b in texts if graded[a] > graded[b]]
    if candidates:
        return rng.sample(candidates, min(limit, len(candidates)))
    if reference is None or not texts:
        return []
    worst = [t for t in texts if t != reference and graded[t] < 0.5]
    return [(reference, b, True) for b in rng.sample(worst, min(limit, len(worst)))]
