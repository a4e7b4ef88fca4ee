"""The shared runner: every `posttrain train RECIPE` (and `posttrain quickstart`) ends here, whatever the kind.

It does the steps every kind shares, once: print the resolved recipe, seed, let the kind's pipeline build its
datasets and rewards (every data check before any model loads), save the resolved recipe, load the model,
run the pipeline (evaluate before, train, save, evaluate after), write the report folder
(`<output_dir>/report/`: the resolved recipe, `summary.json`, `metrics.jsonl`, `README.md` and the kind's
plots and per-sample files). The pipeline comes from the method's kind through the registries
(`posttrain.methods`, `posttrain.pipelines`), never from an if-chain here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.distributed import main_process_only
from posttrain.pipelines.base import RunContext, is_main_process, write_report
from posttrain.recipe import Recipe

__all__ = ["RunResult", "run_recipe", "write_report"]


@dataclass
class RunResult:
    output_dir: Path
    report_dir: Path
    summary: dict[str, Any] = field(default_factory=dict)


def run_recipe(recipe: Recipe, resume: str | bool | None = None, force_resume: bool = False) -> RunResult:
    """Train (and evaluate) as the recipe says. `resume`: a checkpoint folder, or True / "last" for the last one in
    output_dir (refused when the checkpoint's recipe differs, unless `force_resume`). Returns where the outputs and
    the report are."""
    from transformers import set_seed

    from posttrain.methods import get_method
    from posttrain.pipelines import get_pipeline

    method = get_method(recipe.method)
    pipeline = get_pipeline(method.kind)
    resume = pipeline.resume_point(recipe, resume, force_resume)
    output_dir = Path(recipe.output_dir)
    ctx = RunContext(recipe=recipe, method=method, output_dir=output_dir, report_dir=output_dir / "report",
                     is_main=is_main_process(), resume=resume)
    if ctx.is_main:
        print("[posttrain] resolved recipe:\n" + recipe.to_yaml(), flush=True)
    set_seed(recipe.seed)
    prepared = pipeline.prepare(ctx)  # data, rewards and their checks, before the (slow) model load
    if ctx.is_main:
        ctx.report_dir.mkdir(parents=True, exist_ok=True)
        recipe.save(output_dir)
        recipe.save(ctx.report_dir)
    ctx.model, ctx.tokenizer = pipeline.load(ctx)
    outcome = pipeline.run(ctx, prepared)
    # The other ranks wait (on the store, past the process group's timeout) until the main process has finished its
    # own work after training (a kind's main-process steps, such as a reward ensemble's calibration, then the report)
    # and leave together with it: a rank that exits while the main process still works can take the launcher down.
    main_process_only(lambda: pipeline.write_report(ctx, outcome), what="report")
    return RunResult(output_dir=output_dir, report_dir=ctx.report_dir, summary=outcome.summary)
