"""The evaluation harness: suites (eval/*.yaml), generation with the rollout engine, grading, metrics,
reports, the forgetting matrix, and the TrainerCallback that evaluates during training.

    from posttrain.eval import run_eval
    run_eval("tiny-qwen2", "eval/reasoning.yaml", "/tmp/ev", limit=5, data_dir="data/benchmarks")

Names are imported lazily so that `posttrain.eval.metrics` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "run_eval": "posttrain.eval.api",
    "run_forgetting": "posttrain.eval.api",
    "evaluate": "posttrain.eval.api",
    "make_engine": "posttrain.eval.api",
    "evaluate_suite": "posttrain.eval.harness",
    "summarize_records": "posttrain.eval.harness",
    "load_suite": "posttrain.eval.suite",
    "Suite": "posttrain.eval.suite",
    "SuiteError": "posttrain.eval.suite",
    "EvalCallback": "posttrain.eval.callback",
    "add_eval_callback": "posttrain.eval.callback",
    "BaseKL": "posttrain.eval.kl",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'posttrain.eval' has no attribute {name!r}")
