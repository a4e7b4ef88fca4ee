"""The `dpo` kind: preference training on pairs (DPO, DPO-Shift).

Reads `data` (`PreferenceData`: training pairs, held-out pairs, a task for task accuracy), `eval` and `trainer`
(fields of the method's DPO config); no `rewards`, no `rollout`. Flow: the pair files are resolved (built from a
verifiable task on first use when a `build:` is given and the file is absent; on the main process first) and
every row is checked before the model loads. Then, on the held-out pairs, the sequence log-probs of the chosen
and rejected responses under the starting model (the reference); greedy task accuracy before training through
the evaluation harness; training; and after it the same pair log-probs (their change from the start, reward
accuracy, margins, a PNG of both distributions before and after) and task accuracy again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from posttrain.data.preferences import PreferenceSource
from posttrain.distributed import main_process_only
from posttrain.pipelines.base import (
    Pipeline,
    RunContext,
    RunOutcome,
    base_trainer_kwargs,
    evaluate_task_accuracy,
    load_task,
    peft_config,
    to_accelerator,
    train_and_save,
    write_report,
)
from posttrain.recipe import EvalSpec, Recipe, TaskSpec

__all__ = ["DPOPipeline", "PreferenceData"]

PAIRS_PER_FORWARD = 8  # held-out pairs scored per forward: 16 sequences of full-vocabulary logits
# logged every step (TRL's metrics, unshifted, and DPO-Shift's f): the report plots them
_CURVES = ("logps/chosen", "logps/rejected", "rewards/margins", "rewards/accuracies", "dpo_shift/f")


@dataclass
class PreferenceData:
    """`data:` of preference recipes. `train` and `eval` are pair sources (`path`, `hub_id` or `build`; a bare
    string is a path); `eval` holds the held-out pairs; `task` is a verifiable task whose held-out accuracy is
    measured before and after training (split `test` unless set)."""

    train: PreferenceSource | None = None
    eval: PreferenceSource | None = None
    task: TaskSpec | None = None


@dataclass
class DPOPrepared:
    config: Any
    train_ds: Any
    files: dict[str, str]
    eval_rows: list[dict[str, Any]] | None = None
    task: Any = None
    task_ds: Any = None


def _main_process_first() -> Any:
    from accelerate import PartialState

    return PartialState().main_process_first()


class DPOPipeline(Pipeline):
    kind: ClassVar[str] = "dpo"
    data_spec: ClassVar[type] = PreferenceData
    eval_spec: ClassVar[type] = EvalSpec
    sections: ClassVar[frozenset[str]] = frozenset()
    fused_lm_head: ClassVar[bool] = True  # TRL's trainer scores tokens in tiles of the LM head

    def check(self, recipe: Recipe) -> list[str]:
        from posttrain.methods import get_method
        from posttrain.trainers.dpo import config_defaults

        data = recipe.data
        problems = [] if data.train is not None else [
            "data.train: required: the training pairs (a JSONL path, a hub_id, or a build from a task)"]
        for name in ("train", "eval"):
            source = getattr(data, name)
            if source is not None:
                problems += source.problems(f"data.{name}")
        config_class = get_method(recipe.method).config_class()
        check = getattr(config_class, "option_problems", None)
        if check is not None:
            problems += check({**config_defaults(config_class), **recipe.trainer}, prefix="trainer.")
        return problems

    def keeps_reference_copy(self, recipe: Recipe) -> bool:
        # TRL's DPOTrainer loads one under full fine-tuning unless the reference log-probs are precomputed; with
        # LoRA the model with its adapter disabled is the reference
        from posttrain.methods import get_method
        from posttrain.trainers.dpo import config_defaults

        options = {**config_defaults(get_method(recipe.method).config_class()), **recipe.trainer}
        return recipe.model.peft is None and not options.get("precompute_ref_log_probs", False)

    def prepare(self, ctx: RunContext) -> DPOPrepared:
        from posttrain.data.preferences import load_preferences, preference_rows, resolve_preferences

        recipe = ctx.recipe
        data, ev = recipe.data, recipe.eval
        config = ctx.method.config_class()(**base_trainer_kwargs(recipe))
        evaluate = ev.before or ev.after
        with _main_process_first():  # one process builds a missing pair file, the others then read it
            train_path = resolve_preferences(data.train, recipe.model.name_or_path)
            eval_path = (resolve_preferences(data.eval, recipe.model.name_or_path)
                         if data.eval is not None and evaluate else None)
        files = {"train": str(train_path or data.train.hub_id)}
        prepared = DPOPrepared(config, load_preferences(data.train, train_path), files)
        if data.eval is not None and evaluate:
            prepared.eval_rows = preference_rows(data.eval, eval_path)
            files["eval"] = str(eval_path or data.eval.hub_id)
        if data.task is not None and evaluate:
            spec = data.task
            prepared.task = load_task(spec, None)
            prepared.task_ds = prepared.task.load(split=spec.split or "test", path=spec.path,
                                                  limit=ev.limit or spec.limit)
        return prepared

    def run(self, ctx: RunContext, p: DPOPrepared) -> RunOutcome:
        from posttrain.eval.callback import add_eval_callback

        recipe, model, tokenizer = ctx.recipe, ctx.model, ctx.tokenizer
        m, ev = recipe.model, recipe.eval
        summary: dict[str, Any] = {"method": recipe.method, "model": m.name_or_path, "peft": m.peft is not None,
                                   "beta": p.config.beta, "pairs": {"train": len(p.train_ds), "files": p.files}}
        reference = None

        def evaluate_before() -> Any:
            start = None
            if p.eval_rows is not None:
                print(f"[posttrain] log-probs of {len(p.eval_rows)} held-out pairs under the starting model",
                      flush=True)
                start = self._pairs(ctx, model, p, "before")
                summary["pairs_before"] = start["metrics"]
            if p.task is not None and ev.before and not ctx.resume:
                summary.update(self._task_accuracy(ctx, model, p, "before"))
            return start

        # the main process evaluates; the other ranks wait for it on the store (past the process group's timeout)
        reference = main_process_only(evaluate_before, what="eval_before")

        trainer = ctx.method.trainer_class()(model=model, args=p.config, train_dataset=p.train_ds,
                                             processing_class=tokenizer, peft_config=peft_config(recipe))
        eval_callback = add_eval_callback(trainer, recipe, tokenizer, ctx.report_dir)
        train_and_save(trainer, ctx, summary)
        if eval_callback is not None:
            summary["eval_during_training"] = eval_callback.summary()

        trained = trainer.accelerator.unwrap_model(trainer.model)
        if reference is not None and ev.after:
            after = self._pairs(ctx, trained, p, "after", reference["logps"]["policy"])
            summary["pairs_after"] = after["metrics"]
            summary["pairs_after_stderr"] = after["stderr"]
            summary["pairs_plot"] = self._plot(ctx, reference, after)
        if p.task is not None and ev.after and ctx.is_main:
            summary.update(self._task_accuracy(ctx, trained, p, "after"))
        return RunOutcome(summary=summary, log_history=trainer.state.log_history)

    def _pairs(self, ctx: RunContext, model: Any, p: DPOPrepared, when: str, reference: Any = None) -> dict[str, Any]:
        from posttrain.eval.preference import evaluate_pairs

        result = evaluate_pairs(to_accelerator(model), ctx.tokenizer, p.eval_rows,
                                ctx.report_dir / f"pairs_{when}.jsonl", reference=reference,
                                batch_size=PAIRS_PER_FORWARD)
        m = result["metrics"]
        print(f"[posttrain] held-out pairs {when}: logp chosen {m['logps/chosen']:.2f}, rejected "
              f"{m['logps/rejected']:.2f}" + (f"; chosen change {m['logps/chosen_change']:+.2f}, reward accuracy "
                                               f"{m['reward_accuracy']:.3f}" if "reward_accuracy" in m else ""),
              flush=True)
        return result

    def _task_accuracy(self, ctx: RunContext, model: Any, p: DPOPrepared, when: str) -> dict[str, Any]:
        print(f"[posttrain] task accuracy {when} training on {len(p.task_ds)} {p.task.name} problems ...", flush=True)
        result = evaluate_task_accuracy(model, ctx.tokenizer, ctx.recipe, p.task, p.task_ds,
                                        ctx.report_dir / f"samples_{when}.jsonl")
        print(f"[posttrain] accuracy {when}: {result['accuracy']:.3f}", flush=True)
        return {f"accuracy_{when}": result["accuracy"], f"eval_{when}": result, "n_eval": len(p.task_ds),
                "eval_task": p.task.name}

    def _plot(self, ctx: RunContext, before: dict[str, Any], after: dict[str, Any]) -> str:
        from posttrain.eval.plots import plot_pair_logps

        panels = {"before training": before["logps"]["policy"], f"after {ctx.recipe.method}": after["logps"]["policy"]}
        return plot_pair_logps(panels, ctx.report_dir / "pair_logps.png").name

    def write_report(self, ctx: RunContext, outcome: RunOutcome) -> None:
        from posttrain.eval.plots import plot_training_curves

        s = outcome.summary
        lines = []
        keys = [k for k in _CURVES if any(k in h for h in outcome.log_history)]
        if keys:
            plot = plot_training_curves(outcome.log_history, ctx.report_dir / "training_curves.png", keys=keys,
                                        fit_law=False)
            lines += ["", f"![{', '.join(keys)} over training]({plot.name})"]
        if "pairs_after" in s:
            b, a = s["pairs_before"], s["pairs_after"]
            lines += ["", f"Held-out pairs ({a['n_pairs']}):", "",
                      "| | logp chosen | logp rejected | chosen change | rejected change | reward accuracy | margin |",
                      "|---|---:|---:|---:|---:|---:|---:|",
                      f"| before | {b['logps/chosen']:.2f} | {b['logps/rejected']:.2f} | | | | |",
                      f"| after | {a['logps/chosen']:.2f} | {a['logps/rejected']:.2f} "
                      f"| {a['logps/chosen_change']:+.2f} | {a['logps/rejected_change']:+.2f} "
                      f"| {a['reward_accuracy']:.3f} | {a['margin']:.2f} |",
                      "", f"![chosen and rejected log-probabilities before and after]({s['pairs_plot']})"]
        write_report(ctx.report_dir, outcome.log_history, s, extra_markdown=lines)
