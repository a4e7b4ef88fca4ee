"""The suite harness: generate with a rollout engine, grade, write per-sample files, summarise.

`evaluate_suite(engine, tokenizer, suite, output_dir)` runs every task of a suite and returns the
results dict that `posttrain.eval.report` writes out. Per-sample records are appended to
`samples_<task>.jsonl` chunk by chunk, so an interrupted run resumes where it stopped: finished prompts
are read back, not generated again (a fingerprint beside the file, `samples_<task>.meta.json`, makes
sure they were made with the same model, task and sampling).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from dataclasses import replace as _replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from posttrain.eval.grading import make_grader
from posttrain.eval.metrics import (
    entropy_stats,
    group_outcome_fractions,
    maj_at_k,
    mean_stderr,
    pass_at_k_all,
    ratio_mean_stderr,
    unique_answers,
)
from posttrain.eval.suite import SamplingSpec, Suite, SuiteTask
from posttrain.rollout.base import GenerationOutput, RolloutEngine, SamplingParams

__all__ = ["evaluate_suite", "evaluate_entry", "evaluate_task", "load_entry", "summarize_records", "read_records",
           "ResumeMismatch"]

logger = logging.getLogger(__name__)

_ENTROPY_DECIMALS = 5
KLScorer = Callable[[list[GenerationOutput]], list[list[tuple[float, int]]]]


class ResumeMismatch(ValueError):
    """Existing sample files were made with a different configuration."""


# --- data -----------------------------------------------------------------------------------------------


def resolve_path(entry: SuiteTask, data_dir: str | Path | None, paths: dict[str, str] | None = None) -> str | None:
    """Where the entry's data is: a per-task override, else its `path` (relative ones against
    `data_dir`), else `data_dir` itself (a folder of `<task>.jsonl`), else None (the Hub)."""
    if paths and entry.name in paths:
        return str(Path(paths[entry.name]).expanduser())
    if entry.path is not None:
        p = Path(entry.path).expanduser()
        if not p.is_absolute() and data_dir is not None:
            p = Path(data_dir).expanduser() / p
        return str(p)
    return None if data_dir is None else str(Path(data_dir).expanduser())


def load_entry(entry: SuiteTask, data_dir: str | Path | None = None, paths: dict[str, str] | None = None):
    """(task, rows) for a suite entry: the registered task built with the entry's options and its first
    `limit` rows as dicts (prompt messages, answer, id)."""
    from posttrain.data import get_task

    options = dict(entry.options)
    for key in ("system_prompt", "instruction"):
        if getattr(entry, key) is not None:
            options[key] = getattr(entry, key)
    task = get_task(entry.task_name, **options)
    path = resolve_path(entry, data_dir, paths)
    dataset = task.load(split=entry.split, path=path, limit=entry.limit)
    return task, [dict(r) for r in dataset], path


# --- per-sample files -------------------------------------------------------------------------------------


def _fingerprint(entry: SuiteTask, path: str | None, model_info: dict[str, Any] | None, kl: bool) -> dict[str, Any]:
    spec = asdict(entry)
    spec.pop("limit")  # a larger --limit extends a finished run instead of starting over
    return {"task": spec, "data": path, "model": model_info or {}, "kl_to_base": kl}


def read_records(path: Path) -> list[dict[str, Any]]:
    """The complete records of a samples file; a torn last line (the run was killed mid-write) is dropped."""
    if not path.is_file():
        return []
    records = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1}: corrupt sample record (not the last line); delete the file") from None
    return records


def _prepare_resume(samples: Path, fingerprint: dict[str, Any], rows: list[dict[str, Any]], resume: bool):
    meta = samples.with_suffix(".meta.json")
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]
    done: dict[int, dict[str, Any]] = {}
    if resume and samples.is_file() and meta.is_file():
        old = json.loads(meta.read_text())
        if old.get("digest") != digest:
            raise ResumeMismatch(
                f"{samples} was made with a different model, task or sampling configuration "
                f"(fingerprint {old.get('digest')} != {digest}); use another --output folder or --overwrite")
        for rec in read_records(samples):
            i = rec.get("index")
            if isinstance(i, int) and i < len(rows) and rec.get("id") == rows[i]["id"]:
                done[i] = rec
    samples.parent.mkdir(parents=True, exist_ok=True)
    meta.write_text(json.dumps({"digest": digest, "fingerprint": fingerprint}, indent=1, default=str))
    # rewrite the kept records: drops a torn last line and rows beyond a smaller --limit
    with samples.open("w", encoding="utf-8") as f:
        for i in sorted(done):
            f.write(json.dumps(done[i], ensure_ascii=False) + "\n")
    return done


def _record(index: int, row: dict[str, Any], out: GenerationOutput, grade, kl: list[tuple[float, int]] | None):
    texts = [c.text for c in out.completions]
    graded = [grade(t, row["answer"]) for t in texts]
    rec: dict[str, Any] = {
        "index": index,
        "id": row["id"],
        "prompt": out.prompt,
        "gold": row["answer"],
        "completions": texts,
        "answers": [a for a, _ in graded],
        "scores": [s for _, s in graded],
        "lengths": [len(c.token_ids) for c in out.completions],
        "finish_reasons": [c.finish_reason for c in out.completions],
    }
    if all(c.entropies is not None for c in out.completions):
        rec["entropies"] = [[round(float(h), _ENTROPY_DECIMALS) for h in c.entropies] for c in out.completions]
    if kl is not None:
        rec["kl"] = [[float(s), int(n)] for s, n in kl]
    return rec


# --- evaluation -------------------------------------------------------------------------------------------


def sampling_params(entry: SuiteTask, entropies: bool = True, logprobs: bool = False) -> SamplingParams:
    s = entry.sampling
    return SamplingParams(n=s.n, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                          max_new_tokens=s.max_new_tokens, seed=s.seed, entropies=entropies, logprobs=logprobs)


def evaluate_entry(
    engine: RolloutEngine,
    tokenizer: Any,
    entry: SuiteTask,
    task: Any,
    rows: list[dict[str, Any]],
    samples_path: str | Path,
    *,
    data_path: str | None = None,
    model_info: dict[str, Any] | None = None,
    chunk_size: int = 16,
    resume: bool = True,
    progress: bool = True,
    kl_scorer: KLScorer | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Generate and grade `rows` (skipping the prompts already in `samples_path`), appending one record
    per prompt. Returns (records in row order, run info: generated / resumed counts and seconds)."""
    from posttrain.data import format_prompt

    samples = Path(samples_path)
    kl = kl_scorer is not None and entry.kl_to_base
    done = _prepare_resume(samples, _fingerprint(entry, data_path, model_info, kl), rows, resume)
    todo = [i for i in range(len(rows)) if i not in done]
    grade = make_grader(task, entry.extractor, entry.grader)
    base = sampling_params(entry)
    t0 = time.perf_counter()
    n_tokens = capped = 0
    # an engine that batches internally (vLLM) wants many prompts per call; resume granularity is a chunk
    chunk_size = max(chunk_size, int(getattr(engine, "preferred_chunk_size", chunk_size)))
    bar = tqdm(total=len(rows), initial=len(done), desc=f"eval {entry.name}", unit="prompt", disable=not progress,
               dynamic_ncols=True)
    try:
        for start in range(0, len(todo), chunk_size):
            chunk = todo[start : start + chunk_size]
            prompts = [_prompt(tokenizer, rows[i]["prompt"], entry.prompt_format, format_prompt) for i in chunk]
            # tokenised once: for the context check here and for generation (engines that take ids)
            ids = None if tokenizer is None else [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
            # the seed depends on where the chunk starts, so a resumed run samples its chunks as a fresh run would;
            # engines give prompt i of a call seeds seed + i*n .. seed + i*n + n-1, so a chunk starting at row r
            # starts at seed + r*n and no two prompts of the task share a seed
            seed = None if entry.sampling.temperature == 0 else entry.sampling.seed + chunk[0] * entry.sampling.n
            sampling = _fit_context(engine, ids, _with_seed(base, seed), entry.name)
            if sampling.max_new_tokens < base.max_new_tokens:
                capped += len(chunk)
            if ids is not None and hasattr(engine, "generate_ids"):
                outputs = engine.generate_ids(ids, sampling, prompts=prompts)
            else:
                outputs = engine.generate(prompts, sampling)
            kls = kl_scorer(outputs) if kl else [None] * len(outputs)
            with samples.open("a", encoding="utf-8") as f:
                for i, out, k in zip(chunk, outputs, kls, strict=True):
                    rec = _record(i, rows[i], out, grade, k)
                    n_tokens += sum(rec["lengths"])
                    done[i] = rec
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            bar.update(len(chunk))
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    info = {"generated": len(todo), "resumed": len(rows) - len(todo), "seconds": seconds,
            "samples_per_s": len(todo) * entry.sampling.n / seconds if todo and seconds > 0 else None,
            "tokens_per_s": n_tokens / seconds if todo and seconds > 0 else None}
    if capped:
        info["max_new_tokens_capped"] = capped  # prompts whose completion cap was cut to fit the context
    return [done[i] for i in range(len(rows))], info


def evaluate_task(engine: RolloutEngine, tokenizer: Any, task: Any, rows: Sequence[dict[str, Any]],
                  sampling: SamplingParams, samples_path: str | Path, *, chunk_size: int = 32,
                  progress: bool = True) -> dict[str, Any]:
    """One task object's rows (e.g. a recipe's held-out split) through the same generation, grading, record and
    metric code as a suite entry; what the training report's before/after evaluation uses.

    Returns the task's `metrics` and `stderr` (as in results.json) and, at the top level, the figures the run
    report shows: accuracy, accuracy_stderr, n_prompts, n_samples, mean_length, entropy (stats of the answer
    tokens, when the engine returns them).
    """
    entry = SuiteTask(name=task.name, task=task.name, sampling=SamplingSpec(
        n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
        max_new_tokens=sampling.max_new_tokens, seed=sampling.seed or 0))
    records, info = evaluate_entry(engine, tokenizer, entry, task, list(rows), samples_path, chunk_size=chunk_size,
                                   resume=False, progress=progress)
    metrics, stderr = summarize_records(records)
    result: dict[str, Any] = {"accuracy": metrics["accuracy"], "accuracy_stderr": stderr["accuracy"],
                              "n_prompts": metrics["n_prompts"], "n_samples": metrics["n_samples"],
                              "mean_length": metrics["length/mean"], "metrics": _clean_dict(metrics),
                              "stderr": _clean_dict(stderr), "info": info}
    tokens = [h for r in records for seq in r.get("entropies", []) for h in seq]
    if tokens:
        result["entropy"] = entropy_stats(tokens)
    return result


def _clean_dict(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _clean(v) for k, v in d.items()}


def _fit_context(engine: Any, prompt_ids: list[list[int]] | None, sampling: SamplingParams,
                 name: str) -> SamplingParams:
    """Cut max_new_tokens so the longest prompt of the chunk still fits the engine's context (a small model's
    1-2k context cannot hold a long prompt plus 512 new tokens); counted in the run info. The context is the
    engine's `context_length` (the HF model's max_position_embeddings, vLLM's max_model_len), so every backend
    gets the same cut instead of vLLM aborting the suite mid-run."""
    limit = getattr(engine, "context_length", None)
    if limit is None:  # an engine without the attribute: fall back to its model's config
        limit = getattr(getattr(getattr(engine, "model", None), "config", None), "max_position_embeddings", None)
    if not limit or prompt_ids is None:
        return sampling
    longest = max(len(ids) for ids in prompt_ids)
    room = int(limit) - longest
    if room < 1:
        raise ValueError(f"task {name!r}: a prompt has {longest} tokens, more than the model's context of {limit}")
    if sampling.max_new_tokens <= room:
        return sampling
    logger.warning("task %s: max_new_tokens %d cut to %d so that a %d-token prompt fits the %d-token context",
                   name, sampling.max_new_tokens, room, longest, limit)
    return _replace(sampling, max_new_tokens=room)


def _with_seed(sampling: SamplingParams, seed: int | None) -> SamplingParams:
    return _replace(sampling, seed=seed)


def _prompt(tokenizer: Any, messages: Any, fmt: str, format_prompt: Callable[..., str]) -> str:
    if fmt == "plain" and not isinstance(messages, str):
        return "\n\n".join(m["content"] for m in messages)
    return format_prompt(tokenizer, messages)


# --- metrics from records ---------------------------------------------------------------------------------


def _maj_ks(n: int) -> list[int]:
    ks, k = [], 2
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n] if n > 1 else []


def summarize_records(records: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, float]]:
    """(metrics, stderr) of one task from its per-sample records, as flat `name -> value` dicts.

    accuracy is avg@n (mean over prompts of each prompt's mean score; = pass@1); every standard error is
    over prompts (the samples of one prompt are correlated), token-level means (entropy, KL) use the
    cluster-robust ratio estimator (`ratio_mean_stderr`).
    """
    if not records:
        raise ValueError("no records to summarise")
    scores = [[float(s) for s in r["scores"]] for r in records]
    correct = [[s >= 0.5 for s in group] for group in scores]
    answers = [r["answers"] for r in records]
    metrics: dict[str, Any] = {"n_prompts": len(records), "n_samples": sum(len(g) for g in scores)}
    stderr: dict[str, float] = {}

    def put(name: str, pair: tuple[float, float]) -> None:
        metrics[name], stderr[name] = pair

    put("accuracy", mean_stderr([sum(g) / len(g) for g in scores]))
    n_min = min(len(g) for g in scores)
    metrics["n"] = n_min
    for k, pair in pass_at_k_all(correct).items():
        put(f"pass@{k}", pair)
    for k in _maj_ks(n_min):
        put(f"maj@{k}", mean_stderr([maj_at_k([a], [c], k) for a, c in zip(answers, correct)]))
    if n_min > 1:
        metrics[f"pass@{n_min}-pass@1"] = metrics[f"pass@{n_min}"] - metrics["pass@1"]
        for key, value in group_outcome_fractions(correct).items():
            metrics[f"groups/{key}"] = value
    put("unique_answers", mean_stderr(unique_answers(answers)))
    put("no_answer", mean_stderr([sum(a is None for a in g) / len(g) for g in answers]))
    put("length/mean", mean_stderr([sum(r["lengths"]) / len(r["lengths"]) for r in records]))
    metrics["length/max"] = max(max(r["lengths"]) for r in records)
    put("truncated", mean_stderr([sum(f == "length" for f in r["finish_reasons"]) / len(r["finish_reasons"])
                                  for r in records]))
    if all("entropies" in r for r in records):
        tokens = [h for r in records for seq in r["entropies"] for h in seq]
        stats = entropy_stats(tokens)
        for key in ("mean", "p50", "p80", "p95", "top20_mean"):
            metrics[f"entropy/{key}"] = stats[key]
        if stats["count"]:
            _, stderr["entropy/mean"] = ratio_mean_stderr(
                [sum(sum(seq) for seq in r["entropies"]) for r in records],
                [sum(len(seq) for seq in r["entropies"]) for r in records])
    if all("kl" in r for r in records):
        sums = [sum(s for s, _ in r["kl"]) for r in records]
        counts = [sum(c for _, c in r["kl"]) for r in records]
        if sum(counts):
            put("kl_base", ratio_mean_stderr(sums, counts))
    return metrics, stderr


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def evaluate_suite(
    engine: RolloutEngine | None,
    tokenizer: Any,
    suite: Suite,
    output_dir: str | Path,
    *,
    data_dir: str | Path | None = None,
    paths: dict[str, str] | None = None,
    model_info: dict[str, Any] | None = None,
    resume: bool = True,
    progress: bool = True,
    chunk_size: int = 16,
    kl_scorer: KLScorer | None = None,
    hf_model: Any = None,
    tasks: Sequence[str] | None = None,
    reference_model: Any = None,
) -> dict[str, Any]:
    """Evaluate every task of `suite` (or only `tasks`), writing `samples_<task>.jsonl` into `output_dir`.

    Returns `{"tasks": {name: {"metrics", "stderr", "info", ...}}, "entropies": {name: [...]}}`; the
    token entropies are kept for the histograms and left out of results.json. lm-evaluation-harness
    entries need `hf_model` (the transformers model, PEFT adapter attached or not), and so do `kind: pairs`
    entries, whose reference is `reference_model`, else `hf_model` with its adapter disabled (their per-pair
    log-probs go to `results["pair_logps"]`, for the plots).
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = data_dir if data_dir is not None else suite.default_data_dir()
    results: dict[str, Any] = {"tasks": {}, "entropies": {}}
    for entry in suite.tasks:
        if tasks is not None and entry.name not in tasks:
            continue
        samples = out / f"samples_{entry.name}.jsonl"
        if entry.kind == "pairs":
            from posttrain.eval.preference import evaluate_pair_entry

            res = evaluate_pair_entry(hf_model, tokenizer, entry, resolve_path(entry, data_dir, paths), samples,
                                      reference_model=reference_model, batch_size=chunk_size)
            results.setdefault("pair_logps", {})[entry.name] = res.pop("logps")
            results["tasks"][entry.name] = res
            continue
        if entry.lm_eval is not None:
            from posttrain.eval.lm_eval_backend import evaluate_lm_eval_task

            results["tasks"][entry.name] = evaluate_lm_eval_task(
                hf_model, tokenizer, entry, samples, include=suite.lm_eval_include, suite_source=suite.source)
            continue
        if engine is None:
            raise ValueError(f"task {entry.name!r} needs a rollout engine")
        task, rows, path = load_entry(entry, data_dir, paths)
        records, info = evaluate_entry(
            engine, tokenizer, entry, task, rows, samples, data_path=path, model_info=model_info,
            chunk_size=chunk_size, resume=resume, progress=progress, kl_scorer=kl_scorer)
        metrics, stderr = summarize_records(records)
        if entry.kl_to_base and kl_scorer is None:
            info["kl_base"] = "skipped: no base model to compare with (give --base-model, or an --adapter)"
        results["tasks"][entry.name] = {
            "backend": "posttrain",
            "task": entry.task_name,
            "data": path or "hub",
            "sampling": asdict(entry.sampling),
            "metrics": {k: _clean(v) for k, v in metrics.items()},
            "stderr": {k: _clean(v) for k, v in stderr.items()},
            "info": info,
            "samples_file": samples.name,
        }
        if all("entropies" in r for r in records):
            results["entropies"][entry.name] = [h for r in records for seq in r["entropies"] for h in seq]
    return results
