"""Run a recipe: load model and data, evaluate before, train, evaluate after, write a report folder.

`posttrain train RECIPE [key=value ...]` and `posttrain quickstart` both end here. The report folder
(`<output_dir>/report/`) holds the resolved recipe, `summary.json`, the per-step log history, per-sample
evaluation files and a PNG plot of reward and token entropy over steps.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.recipe import Recipe


@dataclass
class RunResult:
    output_dir: Path
    report_dir: Path
    summary: dict[str, Any] = field(default_factory=dict)


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def trainer_config(recipe: Recipe, config_class: type) -> Any:
    """The method's TRL config from the recipe: `trainer:` fields plus what `rollout:` and `rewards:` own."""
    rollout = recipe.rollout
    kwargs: dict[str, Any] = {
        # Defaults that suit this library's users; any of them can be set in `trainer:`.
        "logging_steps": 1,
        "report_to": [],
        "save_strategy": "no",
        "disable_tqdm": False,
    }
    kwargs.update(recipe.trainer)
    kwargs.update(
        output_dir=recipe.output_dir,
        seed=recipe.seed,
        num_generations=rollout.num_generations,
        max_completion_length=rollout.max_new_tokens,
        temperature=rollout.temperature,
        top_p=rollout.top_p,
        top_k=rollout.top_k or 0,
        min_p=rollout.min_p,
        repetition_penalty=rollout.repetition_penalty,
    )
    if recipe.rewards:
        kwargs["reward_weights"] = [r.weight for r in recipe.rewards]
    if rollout.engine == "vllm":
        # posttrain's vLLM engine generates (run_recipe passes it as rollout_engine, so use_vllm stays False);
        # TRL keeps only its importance-sampling knobs from `rollout.vllm:`.
        kwargs.update({f"vllm_{k}": v for k, v in _vllm_options(rollout)[1].items()})
    if not _on_gpu():
        # TRL raises on CPU with bf16 enabled; on CPU we train in float32.
        kwargs.setdefault("use_cpu", True)
        kwargs["bf16"] = False
    return config_class(**kwargs)


def _vllm_options(rollout: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """`rollout.vllm:` split into (engine options, TRL importance-sampling options); `vllm_` prefixes dropped."""
    options = {k.removeprefix("vllm_"): v for k, v in rollout.vllm.items()}
    trl_side = {k: v for k, v in options.items() if k.startswith("importance_sampling")}
    return {k: v for k, v in options.items() if k not in trl_side}, trl_side


def _rollout_engine(recipe: Recipe, tokenizer: Any) -> Any:
    """The vLLM engine training, best-of-n and evaluation share (`rollout.engine: vllm`)."""
    from posttrain.rollout import make_engine

    m = recipe.model
    options: dict[str, Any] = {"dtype": m.dtype, "seed": recipe.seed}
    if m.peft is not None:
        options.update(enable_lora=True, max_lora_rank=m.peft.r)
    options.update(_vllm_options(recipe.rollout)[0])
    return make_engine("vllm", m.name_or_path, tokenizer, **options)


def _load_task(spec: Any, system_prompt: str | None) -> Any:
    import posttrain.envs  # noqa: F401 - registers the multi-turn environments' tasks (guessing)
    from posttrain.data import get_task

    return get_task(spec.task, system_prompt=system_prompt, **spec.options)


def _evaluate(model: Any, tokenizer: Any, recipe: Recipe, task: Any, dataset: Any, path: Path,
              engine: Any = None) -> dict[str, Any]:
    from posttrain.eval.harness import evaluate_task
    from posttrain.rollout import HFEngine, SamplingParams

    ev = recipe.eval
    sampling = SamplingParams(n=ev.n, temperature=ev.temperature,
                              max_new_tokens=ev.max_new_tokens or recipe.rollout.max_new_tokens,
                              top_p=1.0 if ev.temperature == 0 else recipe.rollout.top_p, seed=recipe.seed,
                              entropies=True)
    if engine is None:
        import torch

        if torch.cuda.is_available() and model.device.type == "cpu":
            # before training the model is still where from_pretrained left it; the trainer moves it to the
            # accelerator anyway, so evaluate there (same numerics as the evaluation after training)
            model.to(f"cuda:{torch.cuda.current_device()}")
        engine = HFEngine(model, tokenizer, batch_size=ev.batch_size)
    return evaluate_task(engine, tokenizer, task, dataset, sampling, path, chunk_size=ev.batch_size)


def run_recipe(recipe: Recipe, resume: str | bool | None = None) -> RunResult:
    """Train (and evaluate) as the recipe says. Returns where the outputs and the report are."""
    from transformers import set_seed

    from posttrain.methods import get_method
    from posttrain.models import load_model, load_tokenizer, lora_config
    from posttrain.rewards import get_reward

    output_dir = Path(recipe.output_dir)
    report_dir = output_dir / "report"
    is_main = int(os.environ.get("RANK", "0")) == 0
    if is_main:
        print("[posttrain] resolved recipe:\n" + recipe.to_yaml(), flush=True)
        report_dir.mkdir(parents=True, exist_ok=True)
        recipe.save(output_dir)
        recipe.save(report_dir)
    set_seed(recipe.seed)

    method = get_method(recipe.method)
    config = trainer_config(recipe, method.config_class())
    m = recipe.model
    # Tasks, options and reward names are checked before the (slow) model load.
    if recipe.data.train is None:
        raise ValueError(f"recipe {recipe.source}: data.train is required to train")
    train_spec = recipe.data.train
    train_task = _load_task(train_spec, recipe.data.system_prompt)
    train_ds = train_task.load(split=train_spec.split or "train", path=train_spec.path, limit=train_spec.limit)
    rewards = [get_reward(r.name, train_task, **r.options) for r in recipe.rewards] or train_task.reward_funcs()

    eval_task = eval_ds = None
    summary: dict[str, Any] = {"method": recipe.method, "model": m.name_or_path, "peft": m.peft is not None}
    if recipe.data.eval is not None and (recipe.eval.before or recipe.eval.after):
        es = recipe.data.eval
        eval_task = _load_task(es, recipe.data.system_prompt)
        eval_ds = eval_task.load(split=es.split or "test", path=es.path, limit=recipe.eval.limit or es.limit)
        summary["n_eval"] = len(eval_ds)
        summary["eval_task"] = es.task
    tokenizer = load_tokenizer(m.name_or_path, m.gguf_file, m.revision, m.trust_remote_code)
    model = load_model(m.name_or_path, m.dtype, m.gguf_file, m.revision, m.trust_remote_code, m.attn_implementation)
    rollout_engine = _rollout_engine(recipe, tokenizer) if recipe.rollout.engine == "vllm" else None
    if eval_task is not None and recipe.eval.before and is_main and not resume:
        print(f"[posttrain] evaluating before training on {len(eval_ds)} {eval_task.name} problems ...", flush=True)
        before = _evaluate(model, tokenizer, recipe, eval_task, eval_ds, report_dir / "samples_before.jsonl",
                           rollout_engine)
        summary["accuracy_before"] = before["accuracy"]
        summary["eval_before"] = before
        print(f"[posttrain] accuracy before: {before['accuracy']:.3f}", flush=True)

    peft_config = None
    if m.peft is not None:
        p = m.peft
        peft_config = lora_config(p.r, p.alpha, p.dropout, p.target_modules, p.modules_to_save)
    trainer = method.trainer_class()(
        model=model, reward_funcs=rewards, args=config, train_dataset=train_ds, processing_class=tokenizer,
        peft_config=peft_config, answer_extractor=train_task.extract_answer,
        **({"rollout_engine": rollout_engine} if rollout_engine is not None else {}),
        # Multi-turn environments (posttrain.envs) drive generation through TRL's rollout_func.
        **({"rollout_func": train_task.rollout_func(train_ds)} if hasattr(train_task, "rollout_func") else {}),
    )
    from posttrain.eval.callback import add_eval_callback  # eval.suites every eval.every_n_steps (None if unset)

    eval_callback = add_eval_callback(trainer, recipe, tokenizer, report_dir)
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    summary["train_minutes"] = (time.perf_counter() - t0) / 60
    summary["steps"] = trainer.state.global_step
    if eval_callback is not None:
        summary["eval_during_training"] = eval_callback.summary()
        summary["entropy_collapse"] = eval_callback.collapse_message()
    trainer.save_model(str(output_dir))
    trainer.save_state()

    if is_main:
        if eval_task is not None and recipe.eval.after:
            print(f"[posttrain] evaluating after training on {len(eval_ds)} problems ...", flush=True)
            trained = trainer.accelerator.unwrap_model(trainer.model)
            after = _evaluate(trained, tokenizer, recipe, eval_task, eval_ds, report_dir / "samples_after.jsonl",
                              rollout_engine)  # synced to the trained weights before it generates
            summary["accuracy_after"] = after["accuracy"]
            summary["eval_after"] = after
            print(f"[posttrain] accuracy after: {after['accuracy']:.3f}", flush=True)
        write_report(report_dir, trainer.state.log_history, summary)
    return RunResult(output_dir=output_dir, report_dir=report_dir, summary=summary)


def write_report(report_dir: Path, log_history: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """summary.json, metrics.jsonl (one line per logged step), training_curves.png, README.md."""
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
    (report_dir / "README.md").write_text(_report_markdown(summary, plot))


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    return str(x)


def _report_markdown(summary: dict[str, Any], plot: Path | None) -> str:
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
    if "entropy_min" in summary:
        lines.append(f"Lowest token entropy during training: {summary['entropy_min']:.3f}.")
    if summary.get("entropy_collapse"):
        lines.append(f"**Entropy collapse warning**: {summary['entropy_collapse']}.")
    if plot is not None:
        lines += ["", f"![reward and entropy over steps]({Path(plot).name})"]
    return "\n".join(lines) + "\n"
