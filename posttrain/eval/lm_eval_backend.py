"""lm-evaluation-harness tasks by name, through its HF backend, on the in-memory model.

A suite entry with `lm_eval: <task>` runs `lm_eval.simple_evaluate` on the transformers model we already
hold (a PEFT adapter stays attached, unmerged) instead of rewriting the task. lm-eval is an optional
extra (`pip install 'posttrain[lm-eval]'`): it is imported only here, only when such an entry runs.
Local task definitions (YAML folders, e.g. eval/lm_eval_tasks/) are found through the suite's
`lm_eval_include` list. lm-eval keeps its own metrics (names such as `acc,none`); they are reported
with their stderr as lm-eval computes it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["LMEvalMissing", "require_lm_eval", "evaluate_lm_eval_task", "run_lm_eval"]

INSTALL_HINT = "pip install 'posttrain[lm-eval]'  (the `lm-eval` extra, lm-eval==0.4.13)"


class LMEvalMissing(ImportError):
    pass


def require_lm_eval() -> Any:
    """The `lm_eval` module, or LMEvalMissing naming the extra to install."""
    try:
        import lm_eval
    except ImportError as err:
        raise LMEvalMissing(
            f"lm-evaluation-harness is not installed ({err}); suite entries with `lm_eval:` need it: {INSTALL_HINT}"
        ) from None
    return lm_eval


def _include_paths(include: list[str], suite_source: str | None) -> list[str]:
    root = Path(suite_source).parent if suite_source else Path.cwd()
    return [str(p if (p := Path(x).expanduser()).is_absolute() else root / p) for x in include]


def run_lm_eval(model: Any, tokenizer: Any, task: str, *, limit: int | None = None, include: list[str] | None = None,
                batch_size: int = 8, apply_chat_template: bool = True, gen_kwargs: dict[str, Any] | None = None,
                **kwargs: Any) -> dict[str, Any]:
    """`lm_eval.simple_evaluate` on an in-memory transformers model: the raw lm-eval output dict."""
    lm_eval = require_lm_eval()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if model is None:
        raise ValueError(f"lm-eval task {task!r} needs the transformers model (the HF backend)")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    manager = TaskManager(include_path=include or None)
    gen = ",".join(f"{k}={v}" for k, v in (gen_kwargs or {}).items()) or None
    return lm_eval.simple_evaluate(model=lm, tasks=[task], limit=limit, task_manager=manager, log_samples=True,
                                   apply_chat_template=apply_chat_template, gen_kwargs=gen, **kwargs)


def evaluate_lm_eval_task(model: Any, tokenizer: Any, entry: Any, samples_path: Path, include: list[str] | None = None,
                          suite_source: str | None = None) -> dict[str, Any]:
    """One suite entry through lm-eval: metrics and stderr in our results layout, samples to `samples_path`."""
    import time

    args = dict(entry.lm_eval_args)
    s = entry.sampling
    gen = args.pop("gen_kwargs", None)
    if gen is None:
        gen = {"max_gen_toks": s.max_new_tokens, "do_sample": s.temperature > 0}
        if s.temperature > 0:
            gen["temperature"] = s.temperature
    chat = args.pop("apply_chat_template", entry.prompt_format == "chat")
    t0 = time.perf_counter()
    raw = run_lm_eval(model, tokenizer, entry.lm_eval, limit=entry.limit,
                      include=_include_paths(include or [], suite_source), apply_chat_template=chat, gen_kwargs=gen,
                      **args)
    seconds = time.perf_counter() - t0
    metrics, stderr = {}, {}
    for key, value in (raw.get("results", {}).get(entry.lm_eval) or {}).items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        name, _, flt = key.partition(",")
        label = name if flt in ("", "none") else f"{name}[{flt}]"
        if name.endswith("_stderr"):
            stderr[label.replace("_stderr", "", 1)] = value
        else:
            metrics[label] = value
    samples = (raw.get("samples") or {}).get(entry.lm_eval, [])
    with samples_path.open("w", encoding="utf-8") as f:
        for rec in samples:
            f.write(json.dumps(rec, ensure_ascii=False, default=str) + "\n")
    if "exact_match" in metrics and "accuracy" not in metrics:
        metrics["accuracy"], stderr["accuracy"] = metrics["exact_match"], stderr.get("exact_match")
    elif "acc" in metrics and "accuracy" not in metrics:
        metrics["accuracy"], stderr["accuracy"] = metrics["acc"], stderr.get("acc")
    metrics.setdefault("n_prompts", len(samples))
    return {"backend": "lm-eval", "task": entry.lm_eval, "metrics": metrics, "stderr": stderr,
            "info": {"seconds": seconds, "samples_per_s": len(samples) / seconds if seconds > 0 and samples else None},
            "samples_file": samples_path.name, "lm_eval_config": (raw.get("configs") or {}).get(entry.lm_eval)}
