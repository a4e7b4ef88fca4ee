"""GRPO against the entropy-control methods from the same start, data and seeds: token entropy, training reward
and held-out accuracy over steps, the lowest entropy reached and the final held-out accuracy, per method and
seed. The CPU-scale version of the papers' central claim.

Each (method, seed) runs its own recipe (recipes/grpo/<method>.yaml: SmolLM2-135M-Instruct + LoRA on synthetic
addition) with the same overrides, in its own process (`--jobs N` runs N at a time: on a GPU they share it;
on a CPU give each one thread). Held-out greedy accuracy on 100 problems is measured before training, every
`--eval-every` steps (eval/arithmetic.yaml through the eval callback) and after training. Writes into --output:
results.json (every run, its curves and the per-method aggregate), results.md (the table), curves.png.
A finished run is not redone (its row.json is kept), so an interrupted study resumes where it stopped.

    python bench/entropy_collapse.py --lr 5e-4 --seeds 1 2 3          # the collapse setting (ENVIRONMENT.md)
    python bench/entropy_collapse.py --lr 2e-4 --seeds 1 2 3 --output outputs/bench/compare_lr2e-4
    python bench/entropy_collapse.py --methods grpo steer --steps 2 --model tiny-qwen2 --eval-limit 8   # smoke
About 9-11 minutes per run on 2 CPU cores for SmolLM2 (20 steps); about 1-2 minutes on one GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes" / "grpo"
TRACK_SUITE = ROOT / "eval" / "arithmetic.yaml"
METHODS = ("grpo", "steer", "epo", "dcpo", "bnpo")
EXTRA = ("qae", "clip_cov")  # registry components with their own recipes (method: entropy_control)


def run_dir(args: argparse.Namespace, method: str, seed: int) -> Path:
    return args.output / method / f"seed{seed}"


def run_one(method: str, seed: int, args: argparse.Namespace) -> dict:
    """Train one (method, seed) in this process; returns (and saves as row.json) its summary and curves."""
    from posttrain.recipe import load_recipe
    from posttrain.train import run_recipe

    out = run_dir(args, method, seed)
    overrides = [f"model.name_or_path={args.model}", f"trainer.learning_rate={args.lr}",
                 f"trainer.max_steps={args.steps}", f"seed={seed}", f"output_dir={out}", "eval.before=true",
                 "eval.after=true", f"eval.limit={args.eval_limit}"]
    if args.eval_every:
        overrides += [f"eval.suites=[{TRACK_SUITE}]", f"eval.every_n_steps={args.eval_every}"]
    result = run_recipe(load_recipe(RECIPES / f"{method}.yaml", [*overrides, *args.override]))
    log = json.loads((out / "trainer_state.json").read_text())["log_history"]
    train = [h for h in log if "entropy/mean" in h]
    held_out = [{"step": h["step"], "accuracy": h["eval/arithmetic/accuracy"]} for h in log
                if "eval/arithmetic/accuracy" in h]
    entropy = [h["entropy/mean"] for h in train]
    row = {
        "method": method, "seed": seed,
        "accuracy_before": result.summary.get("accuracy_before"),
        "accuracy_after": result.summary["accuracy_after"],
        "accuracy_after_stderr": result.summary["eval_after"]["accuracy_stderr"],
        "entropy_min": min(entropy),
        "entropy_min_step": train[entropy.index(min(entropy))]["step"],
        "entropy_final": entropy[-1],
        "train_minutes": result.summary.get("train_minutes"),
        "curve": [{"step": h["step"], "entropy": h["entropy/mean"], "reward": h.get("reward")} for h in train],
        "held_out_curve": held_out,
    }
    (out / "row.json").write_text(json.dumps(row, indent=2))
    return row


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(rows: list[dict], methods: list[str]) -> list[dict]:
    """Per method over seeds: mean and sd of the lowest entropy, final entropy and final accuracy, and in how
    many seeds the method's lowest entropy stayed above GRPO's lowest entropy on the same seed."""
    grpo_min = {r["seed"]: r["entropy_min"] for r in rows if r["method"] == "grpo"}
    table = []
    for m in methods:
        mine = sorted((r for r in rows if r["method"] == m), key=lambda r: r["seed"])
        if not mine:
            continue
        agg = {"method": m, "seeds": [r["seed"] for r in mine]}
        for key in ("entropy_min", "entropy_final", "accuracy_after"):
            agg[key], agg[f"{key}_sd"] = _mean_sd([r[key] for r in mine])
            agg[f"{key}_per_seed"] = [r[key] for r in mine]
        paired = [r for r in mine if r["seed"] in grpo_min]
        if m != "grpo" and paired:
            agg["entropy_above_grpo"] = f"{sum(r['entropy_min'] > grpo_min[r['seed']] for r in paired)}/{len(paired)}"
        table.append(agg)
    return table


def write_outputs(rows: list[dict], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = aggregate(rows, args.methods)
    before = [r["accuracy_before"] for r in rows if r.get("accuracy_before") is not None]
    (args.output / "results.json").write_text(json.dumps({
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "command": " ".join(["python", "bench/entropy_collapse.py", *sys.argv[1:]]),
        "accuracy_before": before[0] if before else None, "methods": table, "runs": rows}, indent=2))
    lines = [f"Held-out greedy accuracy before training: {before[0]:.2f} ({args.eval_limit} problems)."
             if before else "",
             f"LR {args.lr:g}, {args.steps} steps, seeds {' '.join(map(str, args.seeds))}; mean ± sd over seeds "
             "(per-seed values in results.json).", "",
             "| method | lowest entropy | final entropy | lowest entropy above GRPO's (same seed) "
             "| held-out accuracy after |",
             "|---|---:|---:|---:|---:|"]
    for a in table:
        lines.append(f"| {a['method']} | {a['entropy_min']:.3f} ± {a['entropy_min_sd']:.3f} "
                     f"| {a['entropy_final']:.3f} ± {a['entropy_final_sd']:.3f} | {a.get('entropy_above_grpo', '-')} "
                     f"| {a['accuracy_after']:.2f} ± {a['accuracy_after_sd']:.2f} |")
    (args.output / "results.md").write_text("\n".join(lines) + "\n")

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    colors = {m: f"C{i}" for i, m in enumerate(METHODS + EXTRA)}
    for m in args.methods:
        mine = [r for r in rows if r["method"] == m]
        for k, (key, curve, ax) in enumerate((("entropy", "curve", axes[0]), ("reward", "curve", axes[1]),
                                               ("accuracy", "held_out_curve", axes[2]))):
            for r in mine:  # each seed thin, the mean over seeds thick
                pts = [(c["step"], c[key]) for c in r[curve] if c.get(key) is not None]
                ax.plot(*zip(*pts), color=colors[m], alpha=0.25, lw=0.8) if pts else None
            steps = sorted({c["step"] for r in mine for c in r[curve]})
            mean = [statistics.fmean(v) if (v := [c[key] for r in mine for c in r[curve]
                                                   if c["step"] == s and c.get(key) is not None]) else math.nan
                    for s in steps]
            if steps:
                ax.plot(steps, mean, color=colors[m], lw=2, marker="." if k < 2 else "o", label=m)
    axes[0].set(title=f"token entropy of the rollouts (LR {args.lr:g})", xlabel="step", ylabel="entropy/mean (nats)")
    axes[1].set(title="training reward (fraction correct)", xlabel="step", ylabel="reward")
    axes[2].set(title="held-out greedy accuracy", xlabel="step", ylabel="accuracy")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{args.model}, LoRA, {len(args.seeds)} seed(s): thin lines per seed, thick the mean")
    fig.tight_layout()
    fig.savefig(args.output / "curves.png", dpi=110)
    plt.close(fig)
    print("\n".join(lines), flush=True)


def _child_command(method: str, seed: int, args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--methods", method, "--seeds", str(seed), "--jobs", "1",
           "--model", args.model, "--lr", str(args.lr), "--steps", str(args.steps),
           "--eval-limit", str(args.eval_limit),
           "--eval-every", str(args.eval_every), "--output", str(args.output), "--no-summary"]
    return cmd + (["--override", *args.override] if args.override else [])


def run_parallel(todo: list[tuple[str, int]], args: argparse.Namespace) -> None:
    """Each (method, seed) in a child process, `args.jobs` at a time; logs go to <run dir>/train.log."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs)))
    pending, running, failed = list(todo), [], []
    while pending or running:
        while pending and len(running) < args.jobs:
            method, seed = pending.pop(0)
            run_dir(args, method, seed).mkdir(parents=True, exist_ok=True)
            log = open(run_dir(args, method, seed) / "train.log", "w")
            running.append((method, seed, subprocess.Popen(_child_command(method, seed, args), stdout=log,
                                                           stderr=subprocess.STDOUT, env=env), log))
            print(f"[entropy_collapse] started {method} seed {seed}", flush=True)
        time.sleep(2)
        for item in list(running):
            method, seed, proc, log = item
            if proc.poll() is not None:
                running.remove(item)
                log.close()
                status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see {log.name})"
                if proc.returncode:
                    failed.append((method, seed))
                print(f"[entropy_collapse] {method} seed {seed}: {status}", flush=True)
    if failed:
        print(f"[entropy_collapse] {len(failed)} run(s) failed: {failed}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS + EXTRA)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process")
    parser.add_argument("--eval-limit", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=5, help="held-out evaluation every N steps (0: off)")
    parser.add_argument("--output", type=Path, default=Path("outputs/bench/entropy_collapse"))
    parser.add_argument("--override", nargs="*", default=[], help="extra key=value recipe overrides for every run")
    parser.add_argument("--no-summary", action="store_true", help=argparse.SUPPRESS)  # child processes
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    todo = [(m, s) for s in args.seeds for m in args.methods if not (run_dir(args, m, s) / "row.json").is_file()]
    if args.jobs > 1 and len(todo) > 1:
        run_parallel(todo, args)
    else:
        for i, (method, seed) in enumerate(todo):
            print(f"[entropy_collapse] {method} seed {seed} ({i + 1}/{len(todo)})", flush=True)
            run_one(method, seed, args)
    if args.no_summary:
        return
    rows = [json.loads(p.read_text()) for m in args.methods for s in args.seeds
            if (p := run_dir(args, m, s) / "row.json").is_file()]
    if rows:
        write_outputs(rows, args)


if __name__ == "__main__":
    main()
