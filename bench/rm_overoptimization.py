"""Reward-model overoptimisation on CPU (Gao et al. 2023; Coste et al. 2024), end to end through the library.

A known gold reward labels preference pairs of SmolLM2-135M-Instruct's own samples on the arithmetic task, with 25%
label noise; an ensemble of K = 5 proxy reward models is trained on those noisy labels (method reward_ensemble);
then
1. best-of-n, n = 1..64 from one sampling pass (posttrain.eval.bon): the expected gold score of the pick of a
   single member, of the mean, WCO and UWO (lambda 0.5) aggregates, against d = sqrt(KL(n)), with the Gao fit;
2. GRPO (LoRA policy) on a single proxy against the WCO and UWO (lambda 0.1) ensembles, the gold reward logged
   every step with weight 0 (never optimised).

Gold: 1 if the answer is right (the task's grader) + 0.5 if it is in \\boxed{} - 0.5 * min(1, characters / 160):
correctness, a format term and a brevity term, so a proxy that learns the easy terms can disagree with gold.

    flock /tmp/posttrain-heavy.lock env OMP_NUM_THREADS=1 python bench/rm_overoptimization.py --out runs/rm_overopt
    python bench/rm_overoptimization.py --out runs/rm_overopt --stages bon grpo     # later stages reuse earlier ones
    python bench/rm_overoptimization.py --out /tmp/ov --small                       # tiny-qwen2 smoke, a minute

Each stage writes under --out and is skipped when its output exists (delete it to redo the stage); `summary.json`
collects the numbers, `grpo.png` the GRPO curves; the best-of-n outputs are in bon/ (results.json, bon.png).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

from posttrain.rewards import completion_text, has_boxed_answer, register_reward

BREVITY_CHARS = 160


def gold_score(task: Any, text: str, answer: str) -> float:
    """The study's gold reward of one completion (module docstring)."""
    return (float(task.score(text, answer)) + 0.5 * float(has_boxed_answer(text))
            - 0.5 * min(1.0, len(text) / BREVITY_CHARS))


@register_reward("overopt_gold")
def overopt_gold(task: Any):
    """The gold reward as a TRL reward function (GRPO logs it as rewards/overopt_gold/mean)."""

    def overopt_gold(prompts, completions, completion_ids=None, **kwargs):
        return [gold_score(task, completion_text(c), str(a)) for c, a in zip(completions, kwargs["answer"])]

    return overopt_gold


def _timed(summary: dict[str, Any], name: str, fn: Any) -> Any:
    t0 = time.perf_counter()
    out = fn()
    summary.setdefault("minutes", {})[name] = round((time.perf_counter() - t0) / 60, 2)
    print(f"[study] {name}: {summary['minutes'][name]} min", flush=True)
    return out


def stage_pairs(a: argparse.Namespace, out: Path, summary: dict[str, Any]) -> None:
    """Preference pairs from the policy's samples, labelled by the gold reward (noise is added at training)."""
    from posttrain.data import get_task
    from posttrain.data.preferences import PairBuildSpec, build_preference_pairs
    from posttrain.models import load_model, load_tokenizer

    task = get_task("arithmetic", **a.task_options)
    tokenizer = load_tokenizer(a.model)
    model = load_model(a.model, dtype=a.sample_dtype).eval()
    for split, prompts in (("train", a.pair_prompts), ("test", a.eval_prompts)):
        path = out / f"pairs_{split}.jsonl"
        if path.is_file():
            continue
        build = PairBuildSpec(task="arithmetic", options=a.task_options, split=split, num_prompts=prompts, n=8,
                              max_new_tokens=a.max_new_tokens, max_pairs_per_prompt=4, reference_chosen=False,
                              seed=1 if split == "test" else 0, batch_size=16)
        _timed(summary, f"pairs_{split}", lambda: build_preference_pairs(
            model, build, path, tokenizer=tokenizer, scorer=lambda t, ans: gold_score(task, t, ans)))
        summary[f"pairs_{split}"] = json.loads(path.with_name(path.stem + ".meta.json").read_text())["counts"]


def stage_members(a: argparse.Namespace, out: Path, summary: dict[str, Any], form: str) -> Path:
    """K = 5 proxy reward models on the noisy pairs (method reward_ensemble)."""
    from posttrain.recipe import recipe_from_dict
    from posttrain.train import run_recipe

    folder = out / f"rm_{form}"
    if not (folder / "ensemble.json").is_file():
        trainer = {"form": form, "num_members": 5, "per_device_train_batch_size": 16, "per_device_eval_batch_size": 32,
                   "num_train_epochs": a.epochs, "learning_rate": a.head_lr if form == "heads" else a.lora_lr,
                   "lr_scheduler_type": "constant", "gradient_checkpointing": False, "disable_tqdm": True,
                   "max_length": 512, "logging_steps": 10}
        model: dict[str, Any] = {"name_or_path": a.model, "dtype": a.rm_dtype}
        if form == "lora":
            model["peft"] = {"r": 8, "alpha": 16, "target_modules": "all-linear"}
        r = recipe_from_dict({"method": "reward_ensemble", "model": model, "trainer": trainer,
                              "data": {"train": str(out / "pairs_train.jsonl"), "eval": str(out / "pairs_test.jsonl"),
                                       "label_noise": 0.25},
                              "eval": {"batch_size": 32}, "output_dir": str(folder), "seed": 0})
        _timed(summary, f"members_{form}", lambda: run_recipe(r))
    report = json.loads((folder / "report" / "summary.json").read_text())
    summary[f"members_{form}"] = {k: report.get(k) for k in ("train_pairs", "labels_flipped", "train_minutes",
                                                              "feature_minutes", "peak_rss_gb", "eval_after")}
    return folder


def stage_bon(a: argparse.Namespace, out: Path, summary: dict[str, Any], ensemble_dir: Path, form: str) -> None:
    """Best-of-n for n = 1..N from one sampling pass, every member and aggregate, gold against sqrt(KL)."""
    from posttrain.data import get_task
    from posttrain.eval.bon import best_of_n
    from posttrain.models import load_model, load_tokenizer
    from posttrain.rewards import get_reward
    from posttrain.rewards.ensemble import RewardEnsemble
    from posttrain.rollout import HFEngine

    folder = out / f"bon_{form}"
    if not (folder / "results.json").is_file():
        task = get_task("arithmetic", **a.task_options)
        rows = list(task.load(split="test", limit=a.bon_prompts))
        tokenizer = load_tokenizer(a.model)
        engine = HFEngine(load_model(a.model, dtype=a.sample_dtype).eval(), tokenizer, batch_size=4, progress=False)
        ensemble = RewardEnsemble.from_pretrained(ensemble_dir, batch_size=32)
        _timed(summary, f"bon_{form}", lambda: best_of_n(
            engine, tokenizer, ensemble, task, rows, folder, n=a.n, aggregate="uwo", uwo_lambda=0.5,
            gold=get_reward("overopt_gold", task), temperature=1.0, max_new_tokens=a.max_new_tokens, seed=7,
            chunk_size=4, model_info={"name_or_path": a.model, "dtype": a.sample_dtype}))
    res = json.loads((folder / "results.json").read_text())
    idx = [i for i, n in enumerate(res["ns"]) if n in (1, 2, 4, 8, 16, 32, 64)]
    summary[f"bon_{form}"] = {
        "ns": [res["ns"][i] for i in idx], "sqrt_kl": [round(res["sqrt_kl"][i], 3) for i in idx],
        "gold": {s: [round(c["gold"][i], 4) for i in idx] for s, c in res["curves"].items()},
        "gold_stderr": {s: [round(c["gold_stderr"][i], 4) for i in idx] for s, c in res["curves"].items()},
        "fits": res["fits"]}


def stage_grpo(a: argparse.Namespace, out: Path, summary: dict[str, Any], ensemble_dir: Path) -> None:
    """GRPO on a single proxy, the WCO and the UWO ensemble; gold logged with weight 0."""
    from posttrain.recipe import load_recipe
    from posttrain.train import run_recipe

    runs = {"single": {"aggregate": "mean", "members": [0]}, "wco": {"aggregate": "wco"},
            "uwo": {"aggregate": "uwo", "uwo_lambda": 0.1}}
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "grpo" / "grpo_rm_ensemble.yaml"
    curves = {}
    for name, options in runs.items():
        folder = out / f"grpo_{name}"
        if not (folder / "trainer_state.json").is_file():
            overrides = [f"model.name_or_path={a.model}", f"output_dir={folder}", f"trainer.max_steps={a.grpo_steps}",
                         f"rollout.max_new_tokens={a.max_new_tokens}", "eval.before=false", "eval.after=true",
                         f"eval.limit={a.grpo_eval}", f"data.train.options={json.dumps(a.task_options)}",
                         f"data.eval.options={json.dumps(a.task_options)}",
                         "rewards=" + json.dumps([{"name": "rm_ensemble",
                                                   "options": {"path": str(ensemble_dir), **options}},
                                                  {"name": "overopt_gold", "weight": 0.0},
                                                  {"name": "accuracy", "weight": 0.0}])]
            if a.small:
                overrides += ["trainer.per_device_train_batch_size=8", "rollout.num_generations=4"]
            _timed(summary, f"grpo_{name}", lambda: run_recipe(load_recipe(recipe, overrides)))
        history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
        steps = [h for h in history if "rewards/overopt_gold/mean" in h]
        curves[name] = {key: [h.get(key) for h in steps] for key in
                        ("rewards/overopt_gold/mean", "rewards/accuracy/mean", "rewards/rm_ensemble/mean",
                         "rm_ensemble/std", "rm_ensemble/mean", "completions/mean_length")}
        after = json.loads((folder / "report" / "summary.json").read_text())
        curves[name]["accuracy_after"] = after.get("accuracy_after")
    summary["grpo"] = curves
    _plot_grpo(curves, out / "grpo.png")


def _plot_grpo(curves: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("rewards/overopt_gold/mean", "gold reward (weight 0, never optimised)"),
            ("rewards/rm_ensemble/mean", "proxy reward optimised"), ("rm_ensemble/std", "member std (alarm)")]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (key, title) in zip(axes, keys):
        for name, c in curves.items():
            ys = c[key]
            ax.plot(range(1, len(ys) + 1), ys, marker="o", markersize=3, label=name)
        ax.set_title(title)
        ax.set_xlabel("GRPO step")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/rm_overopt")
    p.add_argument("--stages", nargs="+", default=["pairs", "members", "bon", "grpo"])
    p.add_argument("--forms", nargs="+", default=["heads"], help="proxy ensemble forms (heads, lora)")
    p.add_argument("--small", action="store_true", help="tiny-qwen2 and small sizes: a smoke run of every stage")
    p.add_argument("--grpo-steps", type=int, default=None, help="GRPO steps per run (default 12; --small: 2)")
    a = p.parse_args()
    big = not a.small
    a.model = "smollm2-135m-instruct" if big else "tiny-qwen2"
    a.task_options = {"min_value": 1, "max_value": 20}
    a.sample_dtype = "float32"  # the policy as it trains; decoding is as fast in bfloat16 on these CPUs
    a.rm_dtype = "bfloat16" if big else "float32"  # scoring is prefill: several times faster in bfloat16 (avx512_bf16)
    a.max_new_tokens = 32 if big else 8
    a.pair_prompts, a.eval_prompts = (128, 32) if big else (16, 8)
    a.epochs, a.head_lr, a.lora_lr = (3, 1e-3, 1e-4) if big else (1, 1e-3, 1e-4)
    a.bon_prompts, a.n = (24, 64) if big else (4, 8)
    steps, a.grpo_eval = (12, 50) if big else (2, 4)
    a.grpo_steps = a.grpo_steps or steps
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary["config"] = {k: v for k, v in vars(a).items() if k != "stages"}
    try:
        if "pairs" in a.stages:
            stage_pairs(a, out, summary)
        for form in a.forms:
            folder = stage_members(a, out, summary, form) if "members" in a.stages else out / f"rm_{form}"
            if "bon" in a.stages:
                stage_bon(a, out, summary, folder, form)
        if "grpo" in a.stages:
            stage_grpo(a, out, summary, out / f"rm_{a.forms[0]}")
    finally:
        summary_path.write_text(json.dumps(summary, indent=2, default=lambda x: None if isinstance(x, float)
                                           and math.isnan(x) else str(x)))
    print(json.dumps({k: v for k, v in summary.items() if k != "grpo"}, indent=1)[:4000])


if __name__ == "__main__":
    main()
