"""Evaluation during training: a TrainerCallback that runs suites every N steps and watches for entropy collapse.

Works with every Trainer (all posttrain trainers are TRL subclasses). Every `every_n_steps` optimizer steps
(and once before the first step, as the reference) it evaluates its suites with the trainer's model,
through the shared rollout engine when one is given (no second copy of the model), and merges
`eval/<task>/<metric>` into that step's entry of `trainer.state.log_history` (so reporters, the
report plots and `trainer_state.json` all see it).

Entropy collapse: when the token entropy (of the evaluation generations, and of the training
rollouts' `entropy/mean` when the trainer logs it) falls below `collapse_fraction` x its first value, a
warning is raised once per source and recorded in `callback.collapse` (the run report says so).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from posttrain.eval.harness import evaluate_suite
from posttrain.eval.suite import Suite, load_suite, with_overrides

__all__ = ["EvalCallback", "EntropyCollapseWarning", "add_eval_callback"]

logger = logging.getLogger(__name__)

# the metrics logged per task (the rest stays in the per-step results files)
_LOGGED = ("accuracy", "pass@1", "entropy/mean", "entropy/top20_mean", "length/mean", "unique_answers", "kl_base",
           "logps/chosen", "logps/rejected", "logps/chosen_change", "reward_accuracy")  # the last: `kind: pairs`


class EntropyCollapseWarning(UserWarning):
    pass


class EvalCallback(TrainerCallback):
    """Evaluate `suites` every `every_n_steps` steps; see the module docstring.

    engine: a rollout engine shared with the trainer; None builds an HFEngine around the trainer's model
    at each evaluation (cheap: it holds references only). output_dir: when given, per-sample files and
    results go to `output_dir/step_<N>/<suite>/`. limit caps the prompts per task (evaluation during
    training is a tracking signal, keep it small).
    """

    def __init__(self, suites: Sequence[str | Path | Suite], every_n_steps: int, *, tokenizer: Any = None,
                 engine: Any = None, limit: int | None = None, output_dir: str | Path | None = None,
                 data_dir: str | Path | None = None, collapse_fraction: float = 0.5, eval_on_start: bool = True,
                 max_new_tokens: int | None = None, batch_size: int = 16, main_process_only: bool = True):
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an integer >= 1, got {every_n_steps!r}")
        if not 0 < collapse_fraction < 1:
            raise ValueError(f"collapse_fraction must be in (0, 1), got {collapse_fraction!r}")
        loaded = [s if isinstance(s, Suite) else load_suite(s) for s in suites]
        if limit is not None or max_new_tokens is not None:
            loaded = [with_overrides(s, limit=limit, max_new_tokens=max_new_tokens) for s in loaded]
        self.suites = loaded
        _check_tasks(loaded)  # a bad task option fails now, not at the first evaluation mid-training
        self.every_n_steps, self.tokenizer, self.engine = every_n_steps, tokenizer, engine
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.data_dir, self.collapse_fraction, self.eval_on_start = data_dir, collapse_fraction, eval_on_start
        self.batch_size, self.main_process_only = batch_size, main_process_only
        self.reference: dict[str, float] = {}  # first entropy seen per source
        self.collapse: list[dict[str, Any]] = []  # one entry per source that collapsed
        self.history: list[dict[str, Any]] = []  # every evaluation's logged metrics, with its step
        self._pending: dict[str, float] | None = None

    # --- evaluation ---------------------------------------------------------------------------------------

    def evaluate(self, model: Any, tokenizer: Any, step: int) -> dict[str, float]:
        """Run every suite now; returns the flat `eval/<task>/<metric>` dict (also kept in self.history)."""
        engine = self.engine
        if engine is None:
            from posttrain.rollout import HFEngine

            engine = HFEngine(model, tokenizer, batch_size=self.batch_size, progress=False)
        logs: dict[str, float] = {}
        for suite in self.suites:
            out = (self.output_dir / f"step_{step}" / suite.name) if self.output_dir else _scratch()
            results = evaluate_suite(engine, tokenizer, suite, out, data_dir=self.data_dir, resume=False,
                                     progress=False, chunk_size=self.batch_size, hf_model=model)
            for task, res in results["tasks"].items():
                for key in _LOGGED:
                    value = res["metrics"].get(key)
                    if isinstance(value, (int, float)) and value is not None and math.isfinite(value):
                        logs[f"eval/{task}/{key}"] = float(value)
            if self.output_dir is None:
                import shutil

                shutil.rmtree(out, ignore_errors=True)
        entropies = [v for k, v in logs.items() if k.endswith("/entropy/mean")]
        if entropies:
            logs["eval/entropy/mean"] = sum(entropies) / len(entropies)
            self._check_collapse("eval/entropy/mean", logs["eval/entropy/mean"], step)
        self.history.append({"step": step, **logs})
        return logs

    def _check_collapse(self, source: str, value: float, step: int) -> None:
        if not math.isfinite(value):
            return
        ref = self.reference.setdefault(source, value)
        if ref <= 0 or any(c["source"] == source for c in self.collapse):
            return
        if value < self.collapse_fraction * ref:
            event = {"source": source, "step": step, "value": value, "reference": ref,
                     "fraction": self.collapse_fraction}
            self.collapse.append(event)
            message = (f"entropy collapse at step {step}: {source} = {value:.4f} fell below "
                       f"{self.collapse_fraction:g} x its starting value {ref:.4f}")
            logger.warning(message)
            warnings.warn(message, EntropyCollapseWarning, stacklevel=2)

    # --- checkpointed state (a resumed run keeps its collapse reference, events and evaluation history) ------

    def state_dict(self) -> dict[str, Any]:
        return {"reference": dict(self.reference), "collapse": list(self.collapse), "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reference = {str(k): float(v) for k, v in state["reference"].items()}
        self.collapse = list(state["collapse"])
        self.history = list(state["history"])

    def summary(self) -> dict[str, Any]:
        """What the run report shows: the collapse events (empty when none) and the evaluations made."""
        return {"collapse": list(self.collapse), "collapse_fraction": self.collapse_fraction,
                "evaluations": list(self.history)}

    def collapse_message(self) -> str | None:
        if not self.collapse:
            return None
        return "; ".join(f"{c['source']} fell to {c['value']:.3f} (< {c['fraction']:g} x {c['reference']:.3f}) "
                         f"at step {c['step']}" for c in self.collapse)

    # --- TrainerCallback hooks ------------------------------------------------------------------------------

    def _run(self, model: Any, tokenizer: Any, step: int) -> dict[str, float] | None:
        """Evaluate now: on the main process only (the others wait for it on torch.distributed's store, past the
        process group's timeout, so a long evaluation does not fail their next collective), or on every rank when
        main_process_only is False. None on the ranks that did not evaluate."""
        if not self.main_process_only:
            return self.evaluate(model, tokenizer, step)
        from posttrain.distributed import main_process_only

        return main_process_only(lambda: self.evaluate(model, tokenizer, step), what="eval_callback")

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, processing_class: Any = None,
                       **kwargs: Any):
        if self.eval_on_start and state.global_step == 0:
            logs = self._run(model, self.tokenizer or processing_class, 0)
            if logs is not None:
                state.log_history.append({**logs, "step": 0})

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, processing_class: Any = None,
                    **kwargs: Any):
        if state.global_step % self.every_n_steps:
            return control
        logs = self._run(model, self.tokenizer or processing_class, state.global_step)
        if logs is not None:
            self._pending = logs
            control.should_log = True  # merge into this step's log entry (on_log below)
        return control

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any):
        if "entropy/mean" in (logs or {}):  # the training rollouts' token entropy (posttrain's GRPO trainers)
            value = logs["entropy/mean"]
            if isinstance(value, (int, float)):
                self._check_collapse("train/entropy/mean", float(value), state.global_step)
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        if logs is not None:
            logs.update(pending)  # reporters after this callback see the eval metrics too
        entry = state.log_history[-1] if state.log_history else None
        if entry is not None and entry.get("step") == state.global_step:
            entry.update(pending)
        else:
            state.log_history.append({**pending, "step": state.global_step})

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any):
        if self._pending is not None:  # logged nowhere (no log call followed): keep it anyway
            state.log_history.append({**self._pending, "step": state.global_step})
            self._pending = None


def _check_tasks(suites: Sequence[Suite]) -> None:
    from posttrain.data import get_task

    for suite in suites:
        for t in suite.tasks:
            if t.lm_eval is None and t.kind != "pairs":
                options = {**t.options, **{k: getattr(t, k) for k in ("system_prompt", "instruction") if getattr(t, k)}}
                get_task(t.task_name, **options)


def _scratch() -> Path:
    import tempfile

    return Path(tempfile.mkdtemp(prefix="posttrain-eval-"))


def add_eval_callback(trainer: Any, recipe: Any, tokenizer: Any,
                      report_dir: str | Path | None = None) -> EvalCallback | None:
    """Attach an EvalCallback built from the recipe's `eval.suites` and `eval.every_n_steps` (None when unset).

    Uses the trainer's shared rollout engine when it has one (`trainer.rollout_engine`). With a trainer that
    checkpoints method state (`posttrain.trainers.state.MethodStateMixin`), the callback's collapse reference,
    events and history are saved in every checkpoint and restored on resume."""
    ev = recipe.eval
    if not ev.suites or not ev.every_n_steps:
        return None
    from posttrain.distributed import ShardedTrainingError, sharded_training

    sharding = sharded_training(getattr(trainer, "accelerator", None))
    if sharding is not None:
        raise ShardedTrainingError(
            f"eval.every_n_steps with {sharding} training: the evaluation runs on the main process, and a forward "
            "pass there needs the parameter shards of every rank (it would hang); evaluate the saved checkpoints "
            "with `posttrain eval` instead (unset eval.every_n_steps), or train with DDP or ZeRO-1/2")
    callback = EvalCallback(
        ev.suites, ev.every_n_steps, tokenizer=tokenizer, engine=getattr(trainer, "rollout_engine", None),
        limit=ev.limit, max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size,
        output_dir=Path(report_dir) / "eval_during_training" if report_dir is not None else None,
    )
    trainer.add_callback(callback)
    if isinstance(getattr(trainer, "method_states", None), dict):
        trainer.method_states["eval_callback"] = callback
    return callback
