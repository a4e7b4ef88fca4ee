"""The pipeline interface and the steps several kinds share.

A pipeline is the data flow of one method kind (`grpo`, `dpo`, `reward`, `continual`): which recipe sections
it reads (their dataclasses, checked when the recipe loads), how it builds datasets and rewards (before any
model loads), how it loads the model, builds and runs the trainer, and what it evaluates before and after.
The runner (`posttrain.train.run_recipe`) calls the same few methods on every kind:

    prepared = pipeline.prepare(ctx)         # datasets, rewards, eval data: every check before the model loads
    ctx.model, ctx.tokenizer = pipeline.load(ctx)
    outcome = pipeline.run(ctx, prepared)    # evaluate before, train, save, evaluate after
    pipeline.write_report(ctx, outcome)      # report/ folder (main process)

This module imports only the standard library at import time: recipe validation reads the section classes
of a pipeline without loading torch.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from posttrain.recipe import DataSpec, EvalSpec, Recipe

if TYPE_CHECKING:
    from posttrain.methods import MethodSpec

__all__ = ["Pipeline", "RunContext", "RunOutcome", "COMMON_OWNED_KEYS", "base_trainer_kwargs", "load_task",
           "evaluate_task_accuracy", "peft_config", "run_figures", "to_accelerator", "train_and_save", "write_report",
           "on_gpu"]

# Trainer keys every kind owns elsewhere in the recipe.
COMMON_OWNED_KEYS: dict[str, str] = {"output_dir": "output_dir (top level)", "seed": "seed (top level)"}


@dataclass
class RunContext:
    """What every step of a run sees: the recipe, where outputs go, the process's role, the loaded model."""

    recipe: Recipe
    method: MethodSpec
    output_dir: Path
    report_dir: Path
    is_main: bool
    resume: str | bool | None = None
    model: Any = None
    tokenizer: Any = None


@dataclass
class RunOutcome:
    """What a pipeline's run hands back to the runner: the summary (summary.json) and the trainer's log."""

    summary: dict[str, Any] = field(default_factory=dict)
    log_history: list[dict[str, Any]] = field(default_factory=list)


class Pipeline:
    """One method kind's data flow. Subclasses set the class attributes and implement `prepare` and `run`.

    Class attributes (read by recipe validation, so a subclass module must stay cheap to import):
    - `kind`: the kind's name, as in the method registry.
    - `data_spec`, `eval_spec`: dataclasses of the recipe's `data:` and `eval:` sections for this kind.
    - `sections`: the optional top-level sections it reads besides those (`rewards`, `rollout`); a recipe
      that sets any other one gets an error naming the section.
    - `owned_trainer_keys`: `trainer:` keys that another recipe section sets (key -> that section).
    - `fused_lm_head`: its trainer scores tokens with TRL's fused LM head, which never builds the [tokens, vocabulary]
      logits (`posttrain plan` then counts one tile of them, not all).
    """

    kind: ClassVar[str] = ""
    data_spec: ClassVar[type] = DataSpec
    eval_spec: ClassVar[type] = EvalSpec
    sections: ClassVar[frozenset[str]] = frozenset()
    owned_trainer_keys: ClassVar[dict[str, str]] = COMMON_OWNED_KEYS
    fused_lm_head: ClassVar[bool] = False

    def check(self, recipe: Recipe) -> list[str]:
        """Problems that span sections (each naming its key path), found when the recipe loads. Default: none."""
        return []

    def evaluates_its_own_copy(self, recipe: Recipe) -> bool:
        """Whether the evaluation before training generates with an engine that loads its own copy of the weights
        (vLLM), rather than with the model about to be trained. Under ZeRO-3 that model is partitioned over the
        ranks from the moment it loads, so only an own copy lets the main process evaluate alone. Default: no."""
        return False

    def keeps_reference_copy(self, recipe: Recipe) -> bool:
        """Whether its trainer keeps a frozen copy of the model beside the trained one (the reference of a KL term
        or a preference loss); `posttrain plan` counts its weights. Default: no."""
        return False

    def resume_point(self, recipe: Recipe, resume: str | bool | None, force: bool = False) -> str | bool | None:
        """What `--resume` means for this kind, checked before anything loads. Default: one trainer's checkpoints
        (`posttrain.checkpoints.resolve_resume`: the last or a given checkpoint-N, refused when the recipe
        changed). Kinds that resume their own way (several models, stages) override it."""
        from posttrain.checkpoints import resolve_resume

        return resolve_resume(recipe, resume, force)

    def describe(self, recipe: Recipe) -> dict[str, Any]:
        """The effective settings a user should see before a run (`posttrain validate`), e.g. the batch shapes the
        TRL config derives. Default: none."""
        return {}

    def prepare(self, ctx: RunContext) -> Any:
        """Datasets, rewards and evaluation data; raises on bad data before any model loads."""
        raise NotImplementedError

    def load(self, ctx: RunContext) -> tuple[Any, Any]:
        """(model, tokenizer) for the run. Default: the recipe's causal LM and its tokenizer."""
        from posttrain.models import load_model, load_tokenizer

        m = ctx.recipe.model
        tokenizer = load_tokenizer(m.name_or_path, m.gguf_file, m.revision, m.trust_remote_code)
        model = load_model(m.name_or_path, m.dtype, m.gguf_file, m.revision, m.trust_remote_code,
                           m.attn_implementation)
        return model, tokenizer

    def run(self, ctx: RunContext, prepared: Any) -> RunOutcome:
        """Evaluate before, train, save, evaluate after."""
        raise NotImplementedError

    def write_report(self, ctx: RunContext, outcome: RunOutcome) -> None:
        """The report folder (main process only). Default: the shared `write_report`."""
        write_report(ctx.report_dir, outcome.log_history, outcome.summary)


# --- shared steps ---------------------------------------------------------------------------------------


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def base_trainer_kwargs(recipe: Recipe) -> dict[str, Any]:
    """Keyword arguments of any TRL config from the recipe: posttrain's defaults, then `trainer:`, then what the
    top level owns (output_dir, seed), and float32 on CPU (TRL raises with bf16 there)."""
    from posttrain.checkpoints import CHECKPOINT_DEFAULTS

    kwargs: dict[str, Any] = {
        # Defaults that suit this library's users; any of them can be set in `trainer:`.
        "logging_steps": 1,
        "report_to": [],
        "disable_tqdm": False,
        **CHECKPOINT_DEFAULTS,  # checkpoints unless told not to (posttrain.checkpoints)
    }
    kwargs.update(recipe.trainer)
    kwargs.update(output_dir=recipe.output_dir, seed=recipe.seed)
    if not on_gpu():
        kwargs.setdefault("use_cpu", True)
        kwargs["bf16"] = False
    return kwargs


def load_task(spec: Any, system_prompt: str | None) -> Any:
    """The registered task of a `TaskSpec` (`task`, `options`), with the recipe's system prompt."""
    import posttrain.envs  # noqa: F401 - registers the multi-turn environments' tasks (guessing)
    from posttrain.data import get_task

    return get_task(spec.task, system_prompt=system_prompt, **spec.options)


def peft_config(recipe: Recipe) -> Any:
    """The recipe's LoRA config (`model.peft`), or None for full fine-tuning."""
    from posttrain.models import lora_config

    p = recipe.model.peft
    return None if p is None else lora_config(p.r, p.alpha, p.dropout, p.target_modules, p.modules_to_save)


def evaluate_task_accuracy(model: Any, tokenizer: Any, recipe: Recipe, task: Any, dataset: Any, path: Path,
                           engine: Any = None, max_new_tokens: int | None = None) -> dict[str, Any]:
    """Accuracy (and entropy, lengths) of `model` on a task's rows, with the recipe's `eval:` sampling, through
    the harness (`posttrain.eval.harness.evaluate_task`); per-sample records go to `path`."""
    from posttrain.eval.harness import evaluate_task
    from posttrain.rollout import HFEngine, SamplingParams

    ev = recipe.eval
    top_p = 1.0 if ev.temperature == 0 else recipe.rollout.top_p
    sampling = SamplingParams(n=ev.n, temperature=ev.temperature,
                              max_new_tokens=ev.max_new_tokens or max_new_tokens or recipe.rollout.max_new_tokens,
                              top_p=top_p, seed=recipe.seed, entropies=True)
    if engine is None:
        engine = HFEngine(to_accelerator(model), tokenizer, batch_size=ev.batch_size)
    return evaluate_task(engine, tokenizer, task, dataset, sampling, path, chunk_size=ev.batch_size)


def to_accelerator(model: Any) -> Any:
    """The model on the GPU when there is one. Before training it is still where from_pretrained left it; the
    trainer moves it to the accelerator anyway, so evaluate there (same numerics as the evaluation after)."""
    import torch

    if torch.cuda.is_available() and model.device.type == "cpu":
        model.to(f"cuda:{torch.cuda.current_device()}")
    return model


def run_figures(trainer: Any) -> dict[str, Any]:
    """A trained run's speed and memory (`perf`, when its steps logged them) and how it was launched (`launch`:
    processes, distributed type, sharding, offload, device)."""
    from posttrain.distributed import launch_summary
    from posttrain.trainers.perf import perf_summary

    perf = perf_summary(trainer.state.log_history)
    return {**({"perf": perf} if perf else {}), "launch": launch_summary(trainer.accelerator)}


def train_and_save(trainer: Any, ctx: RunContext, summary: dict[str, Any], save_dir: Path | None = None) -> None:
    """`trainer.train()` (resuming as asked), then the final model (or adapter) and trainer state in `save_dir`
    (default: output_dir); records train_minutes, steps and `run_figures` in `summary`."""
    from posttrain.checkpoints import RecipeCheckpointCallback
    from posttrain.trainers.perf import attach_perf

    trainer.add_callback(RecipeCheckpointCallback(ctx.recipe))
    attach_perf(trainer)
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=ctx.resume)
    summary["train_minutes"] = (time.perf_counter() - t0) / 60
    summary["steps"] = trainer.state.global_step
    summary.update(run_figures(trainer))
    trainer.save_model(str(save_dir or ctx.output_dir))
    trainer.save_state()


# --- the report folder ----------------------------------------------------------------------------------


def write_report(report_dir: Path, log_history: list[dict[str, Any]], summary: dict[str, Any],
                 extra_markdown: list[str] | None = None) -> None:
    """summary.json, metrics.jsonl (one line per logged step), training_curves.png (GRPO logs), README.md."""
    from posttrain.eval.plots import plot_training_curves

    report_dir.mkdir(parents=True, exist_ok=True)
    steps = [h for h in log_history if "reward" in h]
    if steps:
        last = steps[-1]
        summary["final_train"] = {k: last[k] for k in ("reward", "entropy/mean", "entropy/top20_mean",
                                                        "groups/frac_all_correct", "groups/unique_answers")
                                  if k in last}
        entropy = [h["entropy/mean"] for h in steps if "entropy/mean" in h]
        if entropy:
            summary["entropy_min"] = min(entropy)
    with open(report_dir / "metrics.jsonl", "w") as f:
        for h in log_history:
            f.write(json.dumps(h) + "\n")
    (report_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=_jsonable))
    plot = None
    if steps:
        plot = plot_training_curves(log_history, report_dir / "training_curves.png")
    (report_dir / "README.md").write_text(_report_markdown(summary, plot, extra_markdown or []))


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    return str(x)


def _report_markdown(summary: dict[str, Any], plot: Path | None, extra: list[str]) -> str:
    lines = [f"# Run report: {summary.get('method')} on {summary.get('model')}", ""]
    if "accuracy_before" in summary or "accuracy_after" in summary:
        lines += ["| | accuracy | stderr |", "|---|---:|---:|"]
        for when in ("before", "after"):
            ev = summary.get(f"eval_{when}")
            if ev:
                lines.append(f"| {when} | {ev['accuracy']:.3f} | {ev['accuracy_stderr']:.3f} |")
        lines += ["", f"Held-out problems: {summary.get('n_eval')} ({summary.get('eval_task')}), greedy decoding.", ""]
    if "train_minutes" in summary:
        lines.append(f"Training: {summary.get('steps')} steps in {summary['train_minutes']:.1f} min.")
    if perf := summary.get("perf"):
        from posttrain.trainers.perf import describe_perf

        lines.append(describe_perf(perf))
    if launch := summary.get("launch"):
        from posttrain.distributed import describe_launch

        lines.append(describe_launch(launch))
    if "entropy_min" in summary:
        lines.append(f"Lowest token entropy during training: {summary['entropy_min']:.3f}.")
    if summary.get("entropy_collapse"):
        lines.append(f"**Entropy collapse warning**: {summary['entropy_collapse']}.")
    if plot is not None:
        lines += ["", f"![reward and entropy over steps]({Path(plot).name})"]
    lines += extra
    return "\n".join(lines) + "\n"


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
