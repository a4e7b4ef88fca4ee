"""One pipeline per method kind, behind the shared runner (`posttrain.train.run_recipe`).

`PIPELINES` maps a kind (the `kind` of a method in `posttrain.methods`) to its pipeline class, named by import
path and loaded lazily. A new kind is a new module here plus one entry below and its methods' entries in
`posttrain.methods`: no other kind's module changes. See `posttrain.pipelines.base` for the interface.
"""

from __future__ import annotations

import importlib

from posttrain.pipelines.base import Pipeline, RunContext, RunOutcome

__all__ = ["PIPELINES", "Pipeline", "RunContext", "RunOutcome", "get_pipeline", "register_pipeline"]

PIPELINES: dict[str, str] = {}


def register_pipeline(kind: str, path: str) -> None:
    """Register the pipeline class at `path` ("module:Class") for method kind `kind`."""
    PIPELINES[kind] = path


def get_pipeline(kind: str) -> Pipeline:
    """A pipeline instance for method kind `kind`; KeyError when no pipeline is registered for it."""
    if kind not in PIPELINES:
        raise KeyError(f"no pipeline for method kind {kind!r} (known kinds: {', '.join(sorted(PIPELINES))})")
    module, _, name = PIPELINES[kind].partition(":")
    return getattr(importlib.import_module(module), name)()


register_pipeline("grpo", "posttrain.pipelines.grpo:GRPOPipeline")
register_pipeline("dpo", "posttrain.pipelines.dpo:DPOPipeline")
register_pipeline("reward", "posttrain.pipelines.reward:RewardPipeline")
register_pipeline("continual", "posttrain.pipelines.continual:ContinualPipeline")
