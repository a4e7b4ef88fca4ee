"""Step time of posttrain's DPO and SFT trainers against TRL's, on the same recipe, data and batches, in one process.

posttrain's trainers differ from TRL's in one thing here: on the CPU they score only the labelled positions (the
responses, the completions) with TRL's fused LM head (`posttrain.trainers.fused_head.compact_lm_head_on_cpu`),
where TRL's score every prompt and padding position as well. Each round trains a fresh trainer of each kind for
--steps optimizer steps from the recipe's model (the same weights, data order and seed), one after the other, and
times every step but the first; the rounds alternate the order (A B, B A, ...), so a drift in the machine's speed
falls on both. Reports the per-step times, their medians and ratio, and the largest difference of the logged
losses of the first two steps. Prints one JSON object.

    python bench/lm_head_step_time.py                                   # recipes/dpo/dpo.yaml, 4 steps x 2 rounds
    python bench/lm_head_step_time.py --recipe recipes/continual/ema_lora.yaml data.path=DIR   # a continual stage
    python bench/lm_head_step_time.py model.name_or_path=tiny-qwen2 --steps 3 --rounds 1      # smoke test

Any `key=value` argument overrides the recipe. DPO recipes (`dpo`, `dpo_shift`): TRL's DPOTrainer against the
recipe's trainer, on the training pairs resolved as the recipe resolves them (the cached file if present, else built
from `data.train.build`: 75 s with SmolLM2 on 2 cores). With `dpo_shift`, TRL's side trains DPO (f = 1): the same
forwards, a different loss after the first step. Continual recipes (`continual`, `sft`): TRL's SFTTrainer against
posttrain's SFTTrainer (the base of every continual stage's trainer; the EMA, replay and routing do not touch the
LM head), on the first task's training rows (`--task` picks another), with the recipe's `trainer:` options that
TRL's SFTConfig has.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
from pathlib import Path

from grpo_overhead import StepTimer  # bench/ is sys.path[0] when this file runs as a script

ROOT = Path(__file__).resolve().parents[1]
DPO, SFT = ("dpo", "dpo_shift"), ("continual", "sft")


def trainers(recipe, kind: str):
    """(trainer class, config class, config kwargs) for `kind` ("trl" or "posttrain")."""
    import trl

    from posttrain.methods import get_method
    from posttrain.pipelines.base import base_trainer_kwargs

    kwargs = base_trainer_kwargs(recipe)
    if recipe.method in DPO:
        if kind == "trl":
            return trl.DPOTrainer, trl.DPOConfig, {k: v for k, v in kwargs.items() if not k.startswith("dpo_shift_")}
        method = get_method(recipe.method)
        return method.trainer_class(), method.config_class(), kwargs
    from posttrain.trainers.continual import SFTConfig, SFTTrainer

    fields = {f.name for f in dataclasses.fields(trl.SFTConfig)}
    kwargs = {k: v for k, v in kwargs.items() if k in fields}
    return (trl.SFTTrainer, trl.SFTConfig, kwargs) if kind == "trl" else (SFTTrainer, SFTConfig, kwargs)


def train_once(kind: str, recipe, dataset, steps: int, out: Path) -> dict:
    from posttrain.models import load_model, load_tokenizer, resolve_model_path
    from posttrain.pipelines.base import peft_config

    trainer_cls, config_cls, kwargs = trainers(recipe, kind)
    kwargs = {**kwargs, "max_steps": steps, "output_dir": str(out), "save_strategy": "no", "disable_tqdm": True,
              "eval_strategy": "no"}
    path = resolve_model_path(recipe.model.name_or_path)
    timer = StepTimer()
    trainer = trainer_cls(model=load_model(path, recipe.model.dtype), args=config_cls(**kwargs), train_dataset=dataset,
                          processing_class=load_tokenizer(path), peft_config=peft_config(recipe), callbacks=[timer])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"step_times_s": [round(t, 2) for t in timer.times[1:]], "losses": losses}


def training_rows(recipe, task: int):
    if recipe.method in DPO:
        from posttrain.data.preferences import load_preferences, resolve_preferences

        source = recipe.data.train
        return load_preferences(source, resolve_preferences(source, recipe.model.name_or_path)), "data.train"
    from posttrain.pipelines.continual import ContinualPipeline

    spec = recipe.data.tasks[task]
    return ContinualPipeline._load_task(recipe, task, spec).train, f"data.tasks[{task}] ({spec.name})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "dpo" / "dpo.yaml"))
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per run (the first is not timed)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--task", type=int, default=0, help="continual recipes: which task's rows (index in data.tasks)")
    ap.add_argument("overrides", nargs="*", help="recipe overrides, key=value")
    args = ap.parse_args()

    from posttrain.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.method not in DPO + SFT:
        raise SystemExit(f"{args.recipe}: method {recipe.method!r} is neither a DPO method {DPO} nor SFT {SFT}")
    dataset, rows = training_rows(recipe, args.task)
    kinds = ["trl", "posttrain"]
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for kind in kinds if r % 2 == 0 else kinds[::-1]:
                runs[kind].append(train_once(kind, recipe, dataset, args.steps, Path(tmp) / f"{kind}{r}"))
    times = {k: [t for run in v for t in run["step_times_s"]] for k, v in runs.items()}
    median = {k: round(statistics.median(v), 2) for k, v in times.items()}
    first = {k: v[0]["losses"][:2] for k, v in runs.items()}
    print(json.dumps({
        "recipe": args.recipe, "overrides": args.overrides, "method": recipe.method, "model": recipe.model.name_or_path,
        "peft": recipe.model.peft is not None, "rows": rows, "batch": recipe.trainer.get("per_device_train_batch_size"),
        "steps": args.steps, "rounds": args.rounds, "step_times_s": times, "median_step_s": median,
        "ratio_posttrain_over_trl": round(median["posttrain"] / median["trl"], 3),
        "first_losses": first,
        "max_abs_loss_diff": max(abs(a - b) for a, b in zip(first["posttrain"], first["trl"], strict=True)),
    }, indent=1))


if __name__ == "__main__":
    main()
