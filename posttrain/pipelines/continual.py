"""The `continual` kind: a task sequence trained stage by stage on one model with TRL's SFTTrainer (`method:
continual`: EMA-balanced LoRA and its baselines), and plain supervised fine-tuning as its one-stage case
(`method: sft`: LoRA or full, one task or several trained jointly: the multi-task upper bound).

Reads `data` (`ContinualDataSpec`: the tasks in training order, each an instruction + text -> label
classification task read from `<data.path>/<task>/{train,test}.jsonl, labels.json` or the Hub), `eval`
(`ContinualEvalSpec`) and `trainer` (fields of `ContinualConfig` / `SFTConfig`). Flow, top to bottom:

1. prepare (before the model loads): every task's rows (a bad file or label is named with its file and row),
   the stages (one per task, or one joint stage);
2. the base model on every task (the FWT base row) and, if asked, the retention suite;
3. per stage: the adapter group (retrain-or-expand by instruction similarity, `AdapterGroups`), a
   `ContinualTrainer` with the EMA / replay the recipe asks for and evaluations every `eval.every_n_steps`
   steps on the earlier tasks (the stability gap), the end-of-stage weights (the EMA), saved to
   `<output_dir>/stage<i>_<task>/` (one adapter per group + `codebook.json`), and accuracy on every task with
   per-instance routing: row i of the stage x task matrix;
4. `report/continual.json` (matrix, ACC, BWT, FWT, forgetting, min-ACC / WC-ACC), the heatmap and the
   stability-gap plot; the retention suite again after the sequence.

`posttrain train ... --resume` continues an interrupted sequence at the stage (and the checkpoint step) where
it stopped; `progress.json` in output_dir records the finished stages. Like the base module, this one imports
only the standard library at import time (recipe validation reads its dataclasses).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from posttrain.distributed import sharding_from_recipe, uses_deepspeed
from posttrain.pipelines.base import (
    COMMON_OWNED_KEYS,
    Pipeline,
    RunContext,
    RunOutcome,
    base_trainer_kwargs,
    evaluate_task_accuracy,
    peft_config,
    run_figures,
    write_report,
)
from posttrain.recipe import Recipe

__all__ = ["ContinualDataSpec", "ContinualEvalSpec", "ContinualPipeline", "ContinualTaskSpec",
           "LONG_SEQUENCE_INSTRUCTIONS", "LONG_SEQUENCE_ORDER"]

# O-LoRA's configs/instruction_config.json (Wang et al. 2023, Table 8) by task of the "long sequence" benchmark.
# O-LoRA gives COPA none (its rows carry their own question); it gets a generic one here.
_NLI = 'What is the logical relationship between the "sentence 1" and the "sentence 2"? Choose one from the option.'
_SC = "What is the sentiment of the following paragraph? Choose one from the option."
_TC = "What is the topic of the following paragraph? Choose one from the option."
LONG_SEQUENCE_INSTRUCTIONS: dict[str, str] = {
    "mnli": _NLI, "cb": _NLI, "rte": _NLI,
    "qqp": 'Whether the "first sentence" and the "second sentence" have the same meaning? Choose one from the option.',
    "sst2": _SC, "amazon": _SC, "yelp": _SC, "imdb": _SC,
    "agnews": _TC, "dbpedia": _TC, "yahoo": _TC,
    "boolq": "According to the following passage, is the question true or false? Choose one from the option.",
    "multirc": "According to the following passage and question, is the candidate answer true or false? "
               "Choose one from the option.",
    "wic": "Given a word and two sentences, whether the word is used with the same sense in both sentence? "
           "Choose one from the option.",
    "copa": "Which alternative is more plausible? Choose one from the option.",
}
# Order 4 of the 15-task long sequence (Razdaibiedina et al. 2023; O-LoRA).
LONG_SEQUENCE_ORDER = ["mnli", "cb", "wic", "copa", "qqp", "boolq", "rte", "imdb", "yelp", "amazon", "sst2",
                       "dbpedia", "agnews", "multirc", "yahoo"]
GENERIC_INSTRUCTION = "Choose one from the option."
PROGRESS_FILE = "progress.json"


@dataclass
class ContinualTaskSpec:
    """One task of the sequence. `tasks: [sst2, agnews]` is shorthand for `[{name: sst2}, {name: agnews}]`."""

    _shorthand: ClassVar[str] = "name"

    name: str  # the task's folder under data.path, its result key and stage name
    path: str | None = None  # its folder (train.jsonl, test.jsonl, labels.json); default <data.path>/<name>
    instruction: str | None = None  # default: the long-sequence benchmark's instruction for `name`
    train_limit: int | None = field(default=None, metadata={"ge": 1})  # default: data.train_limit
    test_limit: int | None = field(default=None, metadata={"ge": 1})  # default: data.test_limit
    options: dict[str, Any] = field(default_factory=dict)  # classification task options (labels, hub_id, ...)


@dataclass
class ContinualDataSpec:
    tasks: list[ContinualTaskSpec] = field(default_factory=list)  # in training order
    path: str | None = None  # folder of <task>/{train,test}.jsonl, labels.json
    schedule: Literal["sequential", "joint"] = "sequential"  # joint: one stage on all tasks (multi-task)
    train_limit: int | None = field(default=None, metadata={"ge": 1})  # first N training rows per task
    test_limit: int | None = field(default=None, metadata={"ge": 1})  # first N test rows per task
    max_chars: int | None = field(default=None, metadata={"ge": 1})  # clip each text to N characters
    instruction_first: bool = True  # O-LoRA's layout: instruction, "Option: ...", then the text
    system_prompt: str | None = None


@dataclass
class ContinualEvalSpec:
    base: bool = True  # evaluate the base model on every task first (the base row of FWT)
    batch_size: int = field(default=16, metadata={"ge": 1})
    max_new_tokens: int = field(default=8, metadata={"ge": 1})  # labels are a word or two
    temperature: float = field(default=0.0, metadata={"ge": 0})
    n: int = field(default=1, metadata={"ge": 1})
    every_n_steps: int | None = field(default=None, metadata={"ge": 1})  # continual evaluation within stages
    during: Literal["earlier", "all"] = "earlier"  # which tasks those evaluations cover
    retention: str | None = None  # an eval suite (e.g. retention) run before and after the sequence
    retention_data_dir: str | None = None  # its --data-dir
    retention_limit: int | None = field(default=None, metadata={"ge": 1})


@dataclass
class _Task:
    name: str
    instruction: str
    task: Any  # ClassificationTask
    train: Any  # datasets.Dataset in TRL's prompt-completion format
    test: Any  # datasets.Dataset (prompt, answer, id)
    suite_entry: dict[str, Any]  # the same test rows and prompts as an eval-suite entry (continual_suite.yaml)


@dataclass
class _Stage:
    name: str
    tasks: list[str]
    instructions: list[str]
    train: Any


@dataclass
class _Prepared:
    config_kwargs: dict[str, Any]
    config_class: type
    tasks: list[_Task]
    stages: list[_Stage]


class ContinualPipeline(Pipeline):
    kind: ClassVar[str] = "continual"
    data_spec: ClassVar[type] = ContinualDataSpec
    eval_spec: ClassVar[type] = ContinualEvalSpec
    fused_lm_head: ClassVar[bool] = True  # TRL's trainer scores tokens in tiles of the LM head
    sections: ClassVar[frozenset[str]] = frozenset()
    owned_trainer_keys: ClassVar[dict[str, str]] = COMMON_OWNED_KEYS

    def resume_point(self, recipe: Recipe, resume: str | bool | None, force: bool = False) -> str | bool | None:
        """A sequence resumes from its output_dir, at the stage (and that stage's last checkpoint) where it
        stopped: `--resume` is passed through to `run`, which reads the finished stages back."""
        return resume

    # --- checks before any model loads ---------------------------------------------------------------------
    def check(self, recipe: Recipe) -> list[str]:
        d, t, problems = recipe.data, recipe.trainer, []
        if not d.tasks:
            problems.append("data.tasks: list at least one task")
        names = [x.name for x in d.tasks]
        for name in sorted({n for n in names if names.count(n) > 1}):
            problems.append(f"data.tasks: task {name!r} is listed twice (names key the stages and results)")
        for i, x in enumerate(d.tasks):
            if x.path is None and d.path is None and "hub_id" not in x.options:
                problems.append(f"data.tasks[{i}] ({x.name}): no data: set data.path, data.tasks[{i}].path or "
                                f"data.tasks[{i}].options.hub_id")
            if "/" in x.name or x.name.startswith("."):
                problems.append(f"data.tasks[{i}].name: {x.name!r} names folders; no '/' and no leading '.'")
        stages = 1 if d.schedule == "joint" else len(d.tasks)
        if recipe.method == "sft" and stages > 1:
            problems.append("data.schedule: method 'sft' trains one stage; set data.schedule: joint (all tasks at "
                            "once) or use method: continual for a sequence")
        if sharding := sharding_from_recipe(t):
            source = "trainer.fsdp" if t.get("fsdp") else "trainer.deepspeed" if t.get("deepspeed") else \
                "the accelerate launch config"
            problems.append(f"{source}: {sharding} shards the parameters over ranks, but the continual runner "
                            "evaluates every task after each stage and saves each stage's weights on the main "
                            "process, which needs the whole model there (a sharded one would hang or save shards); "
                            "launch with DDP (launch/accelerate/multi_gpu.yaml)")
        elif recipe.method != "sft" and t.get("ema", "dynamic") != "none" and uses_deepspeed(t):
            source = "trainer.deepspeed" if t.get("deepspeed") else "the accelerate launch config (DeepSpeed)"
            problems.append(f"{source}: the EMA hook needs each tensor's full gradient at every optimizer step, "
                            "which DeepSpeed ZeRO partitions; use DDP or trainer.ema: none")
        if recipe.method != "sft":
            ema = t.get("ema", "dynamic")
            if recipe.model.peft is None and t.get("expand_threshold", 0.9) is not None:
                problems.append("trainer.expand_threshold: adapter groups need LoRA (model.peft); set "
                                "trainer.expand_threshold: null for full fine-tuning")
            if t.get("ema_output", "replace") == "slow" and ema == "none":
                problems.append("trainer.ema_output: 'slow' outputs the EMA; set trainer.ema to fixed or dynamic")
            if t.get("consistency_weight", 0) and (not t.get("replay_size") or ema == "none"):
                problems.append("trainer.consistency_weight: needs a replay buffer (trainer.replay_size) and an EMA "
                                "(the slow weights)")
        if t.get("packing") or t.get("padding_free"):
            problems.append("trainer.packing / trainer.padding_free: continual stages train on padded batches")
        return problems

    # --- data ------------------------------------------------------------------------------------------------
    def prepare(self, ctx: RunContext) -> _Prepared:
        import datasets

        recipe = ctx.recipe
        d = recipe.data
        kwargs = base_trainer_kwargs(recipe)
        config_class = ctx.method.config_class()
        config_class(**kwargs)  # bad trainer values fail now, before the model loads
        tasks = [self._load_task(recipe, i, spec) for i, spec in enumerate(d.tasks)]
        if d.schedule == "joint":
            joint = datasets.concatenate_datasets([t.train for t in tasks]).shuffle(seed=recipe.seed)
            instructions = list(dict.fromkeys(t.instruction for t in tasks))
            stages = [_Stage("joint", [t.name for t in tasks], instructions, joint)]
        else:
            stages = [_Stage(t.name, [t.name], [t.instruction], t.train) for t in tasks]
        return _Prepared(kwargs, config_class, tasks, stages)

    @staticmethod
    def _load_task(recipe: Recipe, i: int, spec: ContinualTaskSpec) -> _Task:
        import datasets

        from posttrain.data import get_task

        d = recipe.data
        instruction = spec.instruction or LONG_SEQUENCE_INSTRUCTIONS.get(spec.name, GENERIC_INSTRUCTION)
        options = {"instruction": f"{instruction}\nOption: {{labels}}" if d.instruction_first
                   else f"\n{instruction}\nOption: {{labels}}",
                   "instruction_first": d.instruction_first, "max_chars": d.max_chars, **spec.options}
        path = spec.path or (str(Path(d.path) / spec.name) if d.path is not None else None)
        where = f"data.tasks[{i}] ({spec.name})"
        try:
            task = get_task("classification", system_prompt=d.system_prompt, **{"dataset": spec.name, **options})
            train = task.load(split="train", path=path, limit=spec.train_limit or d.train_limit)
            test = task.load(split="test", path=path, limit=spec.test_limit or d.test_limit)
        except (FileNotFoundError, ValueError, TypeError, KeyError) as err:
            raise type(err)(f"{where}: {err.args[0] if err.args else err}") from None
        sft = datasets.Dataset.from_dict({
            "prompt": train["prompt"],
            "completion": [[{"role": "assistant", "content": a}] for a in train["answer"]],
        })
        entry = {"name": spec.name, "task": "classification", "split": "test",
                 "path": str(Path(path).resolve()) if path is not None else None, "limit": len(test),
                 "system_prompt": d.system_prompt, "options": {"dataset": spec.name, **options}}
        return _Task(spec.name, instruction, task, sft, test, entry)

    # --- the sequence ----------------------------------------------------------------------------------------
    def run(self, ctx: RunContext, p: _Prepared) -> RunOutcome:
        from posttrain.trainers.continual import ContinualConfig

        recipe = ctx.recipe
        continual = issubclass(p.config_class, ContinualConfig)
        cfg = p.config_class(**p.config_kwargs)
        progress = _Progress.load(ctx.output_dir) if ctx.resume else _Progress()
        if ctx.resume and not isinstance(ctx.resume, bool) and ctx.resume != "last":
            raise ValueError("a continual run resumes from its output_dir (posttrain train ... --resume), not from "
                             f"one checkpoint ({ctx.resume})")
        run = _Run(ctx, p, cfg, continual)
        if ctx.is_main:
            _write_suite(ctx, p)
        if recipe.eval.base and progress.base is None:
            progress.base = run.evaluate(ctx.model, None, p.tasks, ctx.report_dir / "base")
            progress.save(ctx.output_dir, ctx.is_main)
        if recipe.eval.retention and "before" not in progress.retention:
            progress.retention["before"] = run.retention(ctx.model, None, "before")
            progress.save(ctx.output_dir, ctx.is_main)
        run.barrier()  # the main process evaluated the base model alone
        run.restore(progress)
        for i, stage in enumerate(p.stages):
            if i < len(progress.stages):
                continue
            progress.stages.append(run.stage(i, stage, resume=bool(ctx.resume) and i == len(progress.stages)))
            progress.save(ctx.output_dir, ctx.is_main)
            run.barrier()
        if recipe.eval.retention and "after" not in progress.retention:
            progress.retention["after"] = run.retention(run.model, run.groups, "after")
            progress.save(ctx.output_dir, ctx.is_main)
        if not ctx.is_main:  # the evaluations and the report are the main process's
            return RunOutcome(summary={"steps": sum(s["steps"] for s in progress.stages)})
        return RunOutcome(summary=run.summary(progress), log_history=progress.log_history())

    def write_report(self, ctx: RunContext, outcome: RunOutcome) -> None:
        from posttrain.eval.plots import plot_accuracy_matrix, plot_stability_gap

        report = ctx.report_dir
        result = outcome.summary.pop("_continual")
        heatmap = plot_accuracy_matrix(result["matrix"], result["tasks"], report / "accuracy_matrix.png",
                                       stage_names=result["stages"])
        figures = [heatmap.name]
        if result["stability"]["curves"]:
            figures.append(plot_stability_gap(result["stability"]["curves"], result["stage_ends"],
                                              report / "stability_gap.png").name)
        result["plots"] = figures
        (report / "continual.json").write_text(json.dumps(result, indent=1, default=str))
        write_report(report, outcome.log_history, outcome.summary, extra_markdown=_markdown(result))


class _Progress:
    """What a run has finished (written after every stage; `--resume` reads it back)."""

    def __init__(self, data: dict[str, Any] | None = None):
        data = data or {}
        self.base: list[float | None] | None = data.get("base")
        self.stages: list[dict[str, Any]] = data.get("stages", [])
        self.retention: dict[str, Any] = data.get("retention", {})

    @classmethod
    def load(cls, output_dir: Path) -> _Progress:
        path = output_dir / PROGRESS_FILE
        return cls(json.loads(path.read_text())) if path.is_file() else cls()

    def save(self, output_dir: Path, is_main: bool) -> None:
        if is_main:
            data = {"base": self.base, "stages": self.stages, "retention": self.retention}
            (output_dir / PROGRESS_FILE).write_text(json.dumps(data, indent=1, default=str))

    def log_history(self) -> list[dict[str, Any]]:
        return [{**h, "stage": s["index"]} for s in self.stages for h in s["log_history"]]


class _Run:
    """The state one sequence carries from stage to stage: the model with its adapter groups, the EMA, the replay
    buffer; and the steps that use them."""

    def __init__(self, ctx: RunContext, p: _Prepared, cfg: Any, continual: bool):
        from posttrain.models.adapter_groups import AdapterGroups

        self.ctx, self.p, self.cfg, self.continual = ctx, p, cfg, continual
        self.recipe = ctx.recipe
        self.model, self.base = ctx.model, ctx.model
        self.lora = peft_config(self.recipe)
        threshold = getattr(cfg, "expand_threshold", None)
        # adapter groups (and their codebook) for a continual LoRA sequence; plain SFT trains PEFT's "default"
        self.groups = AdapterGroups(threshold=threshold if threshold is not None else 1.0,
                                    reduce=getattr(cfg, "similarity", "mean_pairs"),
                                    expand=threshold is not None) if self.lora is not None and continual else None
        self.ema = self.replay = None
        if continual and cfg.replay_size:
            from posttrain.trainers.continual import ReplayBuffer

            self.replay = ReplayBuffer(cfg.replay_size, seed=self.recipe.seed + _rank())

    # --- model state between stages --------------------------------------------------------------------------
    def _new_ema(self) -> Any:
        from posttrain.trainers.continual import AdapterEMA

        if not self.continual or self.cfg.ema == "none":
            return None
        if self.cfg.ema_output == "slow" and self.ema is not None:
            return self.ema  # I-LoRA's slow learner lives across stages
        return AdapterEMA(self.cfg.ema, self.cfg.ema_args(), self.cfg.ema_apply_to)

    def _persistent(self) -> dict[str, Any]:
        """Cross-stage states saved with every stage (the EMA only when it outlives a stage)."""
        from posttrain.trainers.continual import LiveWeights

        states: dict[str, Any] = {}
        if self.replay is not None:
            states["replay"] = self.replay
        if self.ema is not None and self.cfg.ema_output == "slow":
            states["ema"] = self.ema
            states["live"] = LiveWeights(self.model, list(self.ema.ema))  # the fast weights training goes on from
        return states

    def restore(self, progress: _Progress) -> None:
        """After `--resume`: the model, groups and cross-stage states as the last finished stage left them."""
        if not progress.stages:
            return
        from posttrain.models import load_model
        from posttrain.models.adapter_groups import load_adapter_groups
        from posttrain.trainers.continual import AdapterEMA
        from posttrain.trainers.state import load_states

        folder = self.ctx.output_dir / progress.stages[-1]["folder"]
        if self.groups is not None:
            self.model, groups = load_adapter_groups(self.base, folder, is_trainable=True)
            self.groups.load_state_dict(groups.state_dict())
        elif self.lora is not None:
            from posttrain.models import load_peft_model

            self.model = load_peft_model(self.base, str(folder), is_trainable=True)
        else:
            self.model = load_model(str(folder), self.recipe.model.dtype)
        if self.continual and self.cfg.ema != "none" and self.cfg.ema_output == "slow":
            self.ema = AdapterEMA(self.cfg.ema, self.cfg.ema_args(), self.cfg.ema_apply_to)
        states = self._persistent()
        if states:
            load_states(states, folder / "sequence_state")

    def _attach(self, stage: _Stage) -> dict[str, Any]:
        """Give the stage its adapter group (retrain-or-expand) and make it the one that trains."""
        from peft import get_peft_model

        if self.groups is None:
            if self.lora is not None and not hasattr(self.model, "peft_config"):
                self.model = get_peft_model(self.model, self.lora)  # plain SFT: one adapter, "default"
            return {}

        from posttrain.models.adapter_groups import warm_start_adapter

        previous = self.model.active_adapter if hasattr(self.model, "active_adapter") else None
        group, created, sims = self.groups.assign(stage.name, stage.instructions)
        if previous is None:
            self.model = get_peft_model(self.model, self.lora, adapter_name=group.name)
        elif created:
            self.model.add_adapter(group.name, self.lora)
            warm_start_adapter(self.model, previous, group.name)  # a new adapter starts from the latest one
        self.model.set_adapter(group.name)
        return {"group": group.name, "created": created, "similarities": sims}

    # --- one stage ---------------------------------------------------------------------------------------------
    def stage(self, i: int, stage: _Stage, resume: bool) -> dict[str, Any]:
        from transformers import set_seed

        from posttrain.trainers.continual import ContinualEvalCallback, EvalHistory

        ctx, recipe, p = self.ctx, self.recipe, self.p
        # one stage (plain SFT, joint multi-task): the model goes to output_dir itself, as every other kind's does
        folder = f"stage{i}_{stage.name}" if len(p.stages) > 1 else ""
        out = ctx.output_dir / folder
        record: dict[str, Any] = {"index": i, "name": stage.name, "tasks": stage.tasks, "folder": folder,
                                  **self._attach(stage)}
        self.ema = self._new_ema()
        history = EvalHistory()
        args = p.config_class(**{**p.config_kwargs, "output_dir": str(out), "seed": recipe.seed + i})
        set_seed(args.seed)
        extra: dict[str, Any] = {}
        if self.continual:
            states: dict[str, Any] = {"history": history}
            if self.groups is not None:
                states["codebook"] = self.groups
            extra = {"ema": self.ema, "replay": self.replay, "replay_active": i > 0, "states": states}
        callbacks = []
        earlier = [t for t in p.tasks if t.name not in stage.tasks and _position(p, t.name) < i]
        during = p.tasks if recipe.eval.during == "all" else earlier
        if recipe.eval.every_n_steps and during:
            def evaluate(model: Any, step: int) -> dict[str, float]:
                with self._output_weights(model):
                    return self.evaluate(model, self.groups, during, ctx.report_dir / "during" / f"stage{i}_{step}")

            callbacks.append(ContinualEvalCallback(recipe.eval.every_n_steps, evaluate, history, i))
        forward = _fused_forward_patch(self.model)
        trainer = ctx.method.trainer_class()(model=self.model, args=args, train_dataset=stage.train,
                                             processing_class=ctx.tokenizer, callbacks=callbacks, **extra)
        checkpoint = _last_checkpoint(out) if resume else None
        print(f"[posttrain] stage {i + 1}/{len(p.stages)}: {stage.name}"
              + (f" (adapter {record['group']}{', new' if record['created'] else ''})" if "group" in record else "")
              + (f", resuming from {checkpoint}" if checkpoint else ""), flush=True)
        from posttrain.trainers.perf import attach_perf

        attach_perf(trainer)
        t0 = time.perf_counter()
        trainer.train(resume_from_checkpoint=checkpoint)
        record.update(train_seconds=time.perf_counter() - t0, steps=trainer.state.global_step)
        record.update(run_figures(trainer))
        trainer.save_state()
        forward.restore()
        if ctx.is_main:
            self._save_sequence_state(out)  # the live weights (before the output weights go in), replay buffer
        with self._output_weights(self.model):
            if ctx.is_main:
                self.model.save_pretrained(str(out))  # one adapter folder per group (or the full model)
                if self.groups is not None:
                    self.groups.save(out)
                elif self.lora is None:
                    ctx.tokenizer.save_pretrained(str(out))  # a full model folder loads as a model
            accuracy = self.evaluate(self.model, self.groups, p.tasks, ctx.report_dir / "stages" / (folder or "final"))
        record.update(accuracy=accuracy, during=history.records, log_history=trainer.state.log_history)
        if self.ema is not None:
            record["ema_bytes"] = self.ema.nbytes()
        del trainer
        return record

    def _output_weights(self, model: Any) -> Any:
        """The weights the method hands over at this point: the EMA when there is one (LCIA replaces the adapter
        by it at the stage's end, I-LoRA outputs its slow learner), else the live weights."""
        from contextlib import nullcontext

        return self.ema.swapped(model) if self.ema is not None and self.ema.ema else nullcontext()

    def _save_sequence_state(self, out: Path) -> None:
        from posttrain.trainers.state import save_states

        states = self._persistent()
        if states:
            save_states(states, out / "sequence_state")

    # --- evaluation -------------------------------------------------------------------------------------------
    def evaluate(self, model: Any, groups: Any, tasks: list[_Task], folder: Path) -> dict[str, float]:
        """Greedy accuracy on each task's test rows, each prompt routed to its adapter group."""
        if not self.ctx.is_main:
            return {}
        engine = self._engine(model, groups)
        out = {}
        for t in tasks:
            res = evaluate_task_accuracy(model, self.ctx.tokenizer, self.recipe, t.task, t.test,
                                         folder / f"samples_{t.name}.jsonl", engine=engine,
                                         max_new_tokens=self.recipe.eval.max_new_tokens)
            out[t.name] = res["accuracy"]
        return out

    def _engine(self, model: Any, groups: Any) -> Any:
        from functools import partial

        from posttrain.rollout import HFEngine
        from posttrain.rollout.routed import RoutedEngine, peft_adapter

        engine = HFEngine(model, self.ctx.tokenizer, batch_size=self.recipe.eval.batch_size, progress=False)
        if groups is not None and len(groups) > 1:
            engine = RoutedEngine(engine, groups, partial(peft_adapter, model), self.ctx.tokenizer)
        return engine

    def retention(self, model: Any, groups: Any, when: str) -> dict[str, Any]:
        """The retention suite (with KL from the base model after the sequence) through the harness."""
        if not self.ctx.is_main:
            return {}
        from posttrain.eval.api import evaluate, resolve_suite

        ev = self.recipe.eval
        suite = resolve_suite(ev.retention, limit=ev.retention_limit)
        engine = self._engine(model, groups)
        kl = None
        if hasattr(model, "disable_adapter"):
            from posttrain.eval.kl import BaseKL
            from posttrain.rollout.routed import RoutedEngine, RoutedScorer

            kl = BaseKL(model)
            if isinstance(engine, RoutedEngine):
                kl = RoutedScorer(kl, engine)
        results = evaluate(engine, self.ctx.tokenizer, suite, self.ctx.report_dir / f"retention_{when}",
                           kl_scorer=kl, hf_model=model, data_dir=ev.retention_data_dir, progress=False,
                           chunk_size=ev.batch_size, plots=False)
        return {name: {k: r["metrics"].get(k) for k in ("accuracy", "kl_base")} for name, r in results["tasks"].items()}

    def barrier(self) -> None:
        """After a stage: the main process has evaluated alone; the others wait for it on the store, past the
        process group's timeout (a long evaluation would otherwise fail their next collective)."""
        from posttrain.distributed import wait_for_main

        wait_for_main("continual_stage")

    # --- summary -------------------------------------------------------------------------------------------------
    def summary(self, progress: _Progress) -> dict[str, Any]:
        from posttrain.eval.metrics import continual_metrics, stability_gap_metrics

        names = [t.name for t in self.p.tasks]
        rows = [[s["accuracy"].get(n) for n in names] for s in progress.stages]
        base = [progress.base.get(n) for n in names] if isinstance(progress.base, dict) else None
        sequential = len(rows) == len(names)
        metrics = continual_metrics(rows, base) if sequential else {
            "acc": _mean([v for v in rows[-1] if v is not None]), "bwt": None, "fwt": None,
            "forgetting": None, "forgetting_mean": None, "n_tasks": len(names)}
        evaluations = [{"stage": r["stage"], "step": r["step"],
                        "accuracy": [r["accuracy"].get(n) for n in names]} for s in progress.stages
                       for r in s["during"]]
        stability = stability_gap_metrics(rows, evaluations) if sequential else {"min_acc": [], "wc_acc": []}
        stability["curves"] = _curves(progress, names) if sequential else {}
        stage_ends, total = [], 0
        for s in progress.stages:
            total += s["steps"]
            stage_ends.append(total)
        result = {
            "tasks": names, "stages": [s["name"] for s in progress.stages],
            "stage_folders": [s["folder"] for s in progress.stages], "matrix": rows, "base": base,
            **{k: metrics[k] for k in ("acc", "bwt", "fwt", "forgetting", "forgetting_mean")},
            "stability": stability, "stage_ends": stage_ends,
            "groups": self.groups.state_dict() if self.groups is not None else None,
            "assignments": [{k: s.get(k) for k in ("name", "group", "created", "similarities")}
                            for s in progress.stages],
            "train_seconds": [s["train_seconds"] for s in progress.stages],
            "ema_bytes": [s.get("ema_bytes") for s in progress.stages],
            "retention": progress.retention,
        }
        m = self.recipe.model
        return {"method": self.recipe.method, "model": m.name_or_path, "peft": m.peft is not None,
                "n_tasks": len(names), "n_stages": len(rows), "acc": result["acc"], "bwt": result["bwt"],
                "fwt": result["fwt"], "forgetting_mean": result["forgetting_mean"],
                "min_acc_final": (stability["min_acc"] or [None])[-1],
                "wc_acc_final": (stability["wc_acc"] or [None])[-1],
                "groups": len(self.groups) if self.groups is not None else None,
                "steps": sum(s["steps"] for s in progress.stages),
                "train_minutes": sum(s["train_seconds"] for s in progress.stages) / 60,
                "launch": progress.stages[-1].get("launch") if progress.stages else None, "_continual": result}


# --- helpers ---


def _write_suite(ctx: RunContext, p: _Prepared) -> Path:
    """`<output_dir>/continual_suite.yaml`: the run's tasks, test rows and prompts as an eval suite, so that
    `posttrain eval --model BASE --adapter <output_dir>/stage<i>_<task> --suite` it reproduces row i."""
    import yaml

    ev = ctx.recipe.eval
    suite = {"name": f"continual_{ctx.output_dir.name}", "kind": "continual",
             "description": f"Tasks of the continual run in {ctx.output_dir} (recipe {ctx.recipe.source}), in "
                            "training order, with its prompts and test rows.",
             "sampling": {"n": ev.n, "temperature": ev.temperature, "max_new_tokens": ev.max_new_tokens},
             "tasks": [{k: v for k, v in t.suite_entry.items() if v is not None} for t in p.tasks]}
    path = ctx.output_dir / "continual_suite.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    header = ("# Written by posttrain train. Evaluate a stage (adapters routed per prompt by their codebook):\n"
              f"#   posttrain eval --model {ctx.recipe.model.name_or_path} --adapter {ctx.output_dir}/stage<i>_<task> "
              f"--suite {path} --output DIR\n")
    path.write_text(header + yaml.safe_dump(suite, sort_keys=False, allow_unicode=True))
    return path


def _position(p: _Prepared, task: str) -> int:
    return next(i for i, s in enumerate(p.stages) if task in s.tasks)


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _last_checkpoint(folder: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def _curves(progress: _Progress, names: list[str]) -> dict[str, list[list[float]]]:
    """Per task, (global step, accuracy) from the end of its own stage on: the stability-gap plot's lines."""
    curves: dict[str, list[list[float]]] = {n: [] for n in names}
    offset = 0
    for s in progress.stages:
        for r in s["during"]:
            for n, acc in r["accuracy"].items():
                curves[n].append([offset + r["step"], acc])
        offset += s["steps"]
        for j, n in enumerate(names):
            if j <= s["index"]:
                curves[n].append([offset, s["accuracy"][n]])
    return {n: c for n, c in curves.items() if len(c) > 1}


def _markdown(result: dict[str, Any]) -> list[str]:
    names = result["tasks"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["", "## Accuracy after each stage", "", "| after | " + " | ".join(names) + " |",
             "|---|" + "---:|" * len(names)]
    if result["base"] is not None:
        lines.append("| base | " + " | ".join(fmt(v) for v in result["base"]) + " |")
    for stage, row in zip(result["stages"], result["matrix"], strict=True):
        lines.append(f"| {stage} | " + " | ".join(fmt(v) for v in row) + " |")
    lines += ["", f"ACC {fmt(result['acc'])}, BWT {fmt(result['bwt'])}, FWT {fmt(result['fwt'])}, "
                  f"mean forgetting {fmt(result['forgetting_mean'])}."]
    if result["stability"].get("min_acc"):
        lines.append(f"min-ACC per stage: {', '.join(fmt(v) for v in result['stability']['min_acc'])}; "
                     f"WC-ACC: {', '.join(fmt(v) for v in result['stability']['wc_acc'])}.")
    lines += ["", "![accuracy matrix](accuracy_matrix.png)"]
    if "stability_gap.png" in result.get("plots", []):
        lines.append("![accuracy of earlier tasks over steps](stability_gap.png)")
    return lines


class _ForwardPatch:
    def __init__(self, module: Any):
        self.module, self.had = module, "forward" in vars(module)
        self.previous = vars(module).get("forward")

    def restore(self) -> None:
        if self.had:
            self.module.forward = self.previous
        else:
            vars(self.module).pop("forward", None)


def _fused_forward_patch(model: Any) -> _ForwardPatch:
    """TRL's SFTTrainer patches the base model's `forward` with its fused LM head each time one is built; the
    patch is undone after each stage so that stages do not stack wrappers."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _ForwardPatch(base)

