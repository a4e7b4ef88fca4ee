"""The library entry points behind `posttrain eval`: evaluate a model (optionally with a PEFT adapter) on
a suite, or a sequence of checkpoints on a continual suite (the forgetting matrix).

    from posttrain.eval import run_eval
    results = run_eval("tiny-qwen2", "eval/reasoning.yaml", "/tmp/ev", limit=5, data_dir="data/benchmarks")

Both write results.json, results.md, samples_<task>.jsonl and the PNG plots into the output folder and
return the results dict. `evaluate` does the same for a model, tokenizer and engine already in memory.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from posttrain.eval.harness import evaluate_suite
from posttrain.eval.report import read_log_history, write_plots, write_results
from posttrain.eval.suite import Suite, load_suite, with_overrides

__all__ = ["EvalUsageError", "make_engine", "evaluate", "resolve_device", "run_eval", "run_forgetting",
           "resolve_suite"]


class EvalUsageError(ValueError):
    """Arguments that do not fit together (reported without a traceback by the CLI)."""


def make_engine(kind: str, model: Any, tokenizer: Any, batch_size: int = 16, progress: bool = False) -> Any:
    """A rollout engine of backend `kind` ("hf" or "vllm") around a loaded model (posttrain.rollout.make_engine),
    with usage errors (unknown backend, vLLM not installed) as EvalUsageError."""
    from posttrain.rollout import make_engine as make_rollout_engine

    if kind not in ("hf", "vllm"):
        raise EvalUsageError(f"unknown engine {kind!r}; expected 'hf' or 'vllm'")
    options = {"batch_size": batch_size, "progress": progress} if kind == "hf" else {}
    try:
        return make_rollout_engine(kind, model, tokenizer, **options)
    except ImportError as err:
        raise EvalUsageError(f"--engine {kind}: {err}") from err


def resolve_suite(suite: str | Path | Suite, **overrides: Any) -> Suite:
    s = suite if isinstance(suite, Suite) else load_suite(suite)
    return with_overrides(s, **overrides) if any(v is not None for v in overrides.values()) else s


def evaluate(
    engine: Any,
    tokenizer: Any,
    suite: Suite,
    output_dir: str | Path,
    *,
    model_info: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    kl_scorer: Any = None,
    hf_model: Any = None,
    log_history: Sequence[dict[str, Any]] | None = None,
    plots: bool = True,
    **kwargs: Any,
) -> dict[str, Any]:
    """Evaluate a suite with an engine already built, and write every output. kwargs go to `evaluate_suite`."""
    results = evaluate_suite(engine, tokenizer, suite, output_dir, model_info=model_info, kl_scorer=kl_scorer,
                             hf_model=hf_model, **kwargs)
    results = {"suite": {"name": suite.name, "source": suite.source}, "model": model_info or {},
               "config": config or {}, **results}
    if plots:
        results["plots"] = [p.name for p in write_plots(output_dir, results, log_history)]
    write_results(output_dir, results)
    return results


def resolve_device(device: str = "auto") -> str:
    """`auto`: the current CUDA device when there is one, else the CPU; anything else as given ("cpu", "cuda:1")."""
    import torch

    if device == "auto":
        return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvalUsageError(f"--device {device}: no CUDA device is available")
    return device


def _load(model: str, adapter: str | None, dtype: str, device: str = "cpu") -> tuple[Any, Any, Any]:
    """(model, tokenizer, adapter groups or None): a continual checkpoint (a folder with codebook.json) brings
    one adapter per group, routed per prompt."""
    from posttrain.models import load_model, load_peft_model, load_tokenizer
    from posttrain.models.adapter_groups import is_adapter_groups_dir, load_adapter_groups

    tokenizer = load_tokenizer(model)
    net = load_model(model, dtype=dtype).to(device)
    groups = None
    if is_adapter_groups_dir(adapter):
        net, groups = load_adapter_groups(net, adapter)
    elif adapter is not None:
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"no PEFT adapter (adapter_config.json) in {adapter}")
        net = load_peft_model(net, adapter)
    net.eval()
    return net, tokenizer, groups


def _routed(engine: Any, kind: str, net: Any, adapter: str, groups: Any, tokenizer: Any) -> Any:
    """Per-prompt routing over a continual checkpoint's adapter groups (posttrain.rollout.routed)."""
    from functools import partial

    from posttrain.rollout.routed import RoutedEngine, peft_adapter

    if kind == "vllm":
        select = lambda name: engine.lora_adapter(name, Path(adapter) / name)  # noqa: E731
    else:
        select = partial(peft_adapter, net)
    return RoutedEngine(engine, groups, select, tokenizer)


def run_eval(
    model: str,
    suite: str | Path | Suite,
    output_dir: str | Path,
    *,
    adapter: str | None = None,
    base_model: str | None = None,
    engine: str = "hf",
    n: int | None = None,
    temperature: float | None = None,
    max_new_tokens: int | None = None,
    limit: int | None = None,
    seed: int | None = None,
    data_dir: str | Path | None = None,
    paths: dict[str, str] | None = None,
    batch_size: int = 16,
    dtype: str = "auto",
    device: str = "auto",
    resume: bool = True,
    progress: bool = True,
    training_log: str | Path | None = None,
    tasks: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Load `model` (+ `adapter`, unmerged) onto `device` (`auto`: the GPU when there is one) and evaluate it on
    `suite`; see the module docstring.

    KL from the base model (suite entries with `kl_to_base: true`) and the log-prob changes of preference pairs
    (`kind: pairs` entries) compare with `base_model`, or, for an adapter, with the same model with its adapter
    disabled."""
    s = resolve_suite(suite, n=n, temperature=temperature, max_new_tokens=max_new_tokens, limit=limit, seed=seed)
    device = resolve_device(device)
    net, tokenizer, groups = _load(model, adapter, dtype, device)
    base = None  # the reference of KL and of preference pairs (else: the adapter disabled)
    if base_model is not None and any(t.kl_to_base or t.kind == "pairs" for t in s.tasks):
        from posttrain.models import load_model

        base = load_model(base_model, dtype=dtype).to(device).eval()
    kl = None
    if any(t.kl_to_base for t in s.tasks):
        from posttrain.eval.kl import BaseKL

        if base is not None:
            kl = BaseKL(net, base)
        elif adapter is not None:
            kl = BaseKL(net)
    eng = make_engine(engine, net, tokenizer, batch_size=batch_size)
    info = {"name_or_path": model, "adapter": adapter, "base_model": base_model, "engine": engine, "dtype": dtype}
    if groups is not None:
        eng = _routed(eng, engine, net, adapter, groups, tokenizer)
        if kl is not None:
            from posttrain.rollout.routed import RoutedScorer

            kl = RoutedScorer(kl, eng)
        info["adapter_groups"] = groups.names
    config = {"limit": limit, "n": n, "temperature": temperature, "max_new_tokens": max_new_tokens, "seed": seed,
              "device": device,
              "data_dir": str(data_dir) if data_dir else None, "paths": paths, "batch_size": batch_size,
              "tasks": list(tasks) if tasks else None}
    history = read_log_history(training_log) if training_log else None
    results = evaluate(eng, tokenizer, s, output_dir, model_info=info, config=config, kl_scorer=kl, hf_model=net,
                       log_history=history, data_dir=data_dir, paths=paths, resume=resume, progress=progress,
                       chunk_size=batch_size, tasks=tasks, reference_model=base)
    if groups is not None:  # prompts routed to each group (this call's generations; resumed ones not counted)
        results["model"]["routing"] = dict(sorted(eng.counts.items()))
        write_results(output_dir, results)
    return results


def run_forgetting(
    models: Sequence[str],
    suite: str | Path | Suite,
    output_dir: str | Path,
    *,
    adapters: Sequence[str] | None = None,
    base_model: str | None = None,
    stage_names: Sequence[str] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """The stage x task accuracy matrix of a continual run and its ACC / BWT / FWT / forgetting.

    Stages are `models` (one checkpoint per stage, optionally each with its adapter in `adapters`), or,
    with one model and several `adapters`, that model with each adapter in turn. `matrix[i][j]` is the
    accuracy on the suite's task j after stage i; the suite lists tasks in training order. The base row
    (for FWT) is evaluated when there is a base: `base_model`, or the adapters' base model. Every stage
    is a full evaluation in `output_dir/stage<i>_<name>/` (resumable); kwargs go to `run_eval`.
    """
    from posttrain.eval.metrics import continual_metrics
    from posttrain.eval.plots import plot_accuracy_matrix

    adapters = list(adapters or [])
    if len(models) > 1:
        if adapters and len(adapters) != len(models):
            raise EvalUsageError(f"{len(models)} models but {len(adapters)} adapters: "
                                 "give one adapter per model, or none")
        stages = [(m, adapters[i] if adapters else None) for i, m in enumerate(models)]
        base = base_model
    elif len(models) == 1 and adapters:
        stages = [(models[0], a) for a in adapters]
        base = base_model or models[0]
    else:
        raise EvalUsageError("a forgetting evaluation needs several --model checkpoints, "
                             "or one --model and several --adapter")
    s = resolve_suite(suite, **{k: kwargs.pop(k, None)
                                for k in ("n", "temperature", "max_new_tokens", "limit", "seed")})
    names = [t.name for t in s.tasks]
    if len(stages) > len(names):
        raise EvalUsageError(f"{len(stages)} stages but the suite has {len(names)} tasks; the matrix is stage x task")
    labels = list(stage_names) if stage_names else [Path(a or m).name for m, a in stages]
    out = Path(output_dir)
    kwargs.pop("training_log", None)

    def accuracies(results: dict[str, Any]) -> list[float | None]:
        return [results["tasks"][t]["metrics"].get("accuracy") for t in names]

    rows, stage_dirs = [], []
    for i, ((model, adapter), label) in enumerate(zip(stages, labels)):
        folder = out / f"stage{i}_{label}"
        res = run_eval(model, s, folder, adapter=adapter, **kwargs)
        rows.append(accuracies(res))
        stage_dirs.append(folder.name)
        gc.collect()
    base_row = None
    if base is not None:
        base_row = accuracies(run_eval(base, s, out / "base", **kwargs))
    matrix = rows + [[None] * len(names) for _ in range(len(names) - len(rows))]
    metrics = continual_metrics(matrix, base_row)
    heatmap = plot_accuracy_matrix(matrix, names, out / "accuracy_matrix.png")
    results = {
        "suite": {"name": s.name, "source": s.source},
        "model": {"name_or_path": list(models), "adapters": adapters or None, "base_model": base},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in kwargs.items()},
        "tasks": {},
        "continual": {"tasks": names, "stages": labels, "stage_dirs": stage_dirs, "matrix": rows,
                      "base": base_row, "metrics": metrics},
        "plots": [heatmap.name],
    }
    write_results(out, results)
    return results
