"""GRPO against the entropy-control methods from the same start, data and seed: token entropy and reward
over steps, lowest entropy, final held-out accuracy. The CPU-scale version of the papers' central claim.

Each method runs its own recipe (recipes/grpo/<method>.yaml: SmolLM2-135M-Instruct + LoRA on synthetic
addition) with the same overrides; the base model's held-out accuracy is measured once. Writes
results.json, results.md (table) and curves.png into --output.

    python bench/entropy_collapse.py --lr 5e-4                    # the collapse setting (ENVIRONMENT.md)
    python bench/entropy_collapse.py --lr 2e-4 --output outputs/bench/compare
    python bench/entropy_collapse.py --methods grpo steer --steps 4 --model tiny-qwen2   # smoke test
About 8-9 minutes per method on 2 CPU cores for SmolLM2 (20 steps).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "grpo"
METHODS = ("grpo", "steer", "epo", "dcpo", "bnpo")


def run_method(method: str, args: argparse.Namespace, first: bool) -> dict:
    from posttrain.recipe import load_recipe
    from posttrain.train import run_recipe

    overrides = [f"model.name_or_path={args.model}", f"trainer.learning_rate={args.lr}", f"trainer.max_steps={args.steps}",
                 f"seed={args.seed}", f"output_dir={args.output / method}", f"eval.before={str(first).lower()}",
                 "eval.after=true", f"eval.limit={args.eval_limit}", *args.override]
    result = run_recipe(load_recipe(RECIPES / f"{method}.yaml", overrides))
    history = [h for h in json.loads((args.output / method / "trainer_state.json").read_text())["log_history"]
               if "entropy/mean" in h]
    entropy = [h["entropy/mean"] for h in history]
    return {
        "method": method,
        "accuracy_before": result.summary.get("accuracy_before"),
        "accuracy_after": result.summary["accuracy_after"],
        "accuracy_after_stderr": result.summary["eval_after"]["accuracy_stderr"],
        "entropy_min": min(entropy),
        "entropy_min_step": history[entropy.index(min(entropy))]["step"],
        "entropy_final": entropy[-1],
        "curve": [{"step": h["step"], "entropy": h["entropy/mean"], "reward": h.get("reward")} for h in history],
    }


def write_outputs(rows: list[dict], args: argparse.Namespace, before: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (args.output / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                          "accuracy_before": before, "methods": rows}, indent=2))
    lines = [f"Held-out accuracy before training: {before:.2f} (greedy, {args.eval_limit} problems).", "",
             "| method | lowest entropy (step) | final entropy | held-out accuracy after |",
             "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['entropy_min']:.3f} ({r['entropy_min_step']}) | {r['entropy_final']:.3f} "
                     f"| {r['accuracy_after']:.2f} ± {r['accuracy_after_stderr']:.2f} |")
    (args.output / "results.md").write_text("\n".join(lines) + "\n")
    fig, (ax_h, ax_r) = plt.subplots(1, 2, figsize=(12, 4))
    for r in rows:
        steps = [c["step"] for c in r["curve"]]
        ax_h.plot(steps, [c["entropy"] for c in r["curve"]], marker=".", label=r["method"])
        ax_r.plot(steps, [c["reward"] if c["reward"] is not None else math.nan for c in r["curve"]], marker=".",
                  label=f"{r['method']} (acc {r['accuracy_after']:.2f})")
    ax_h.set(title=f"token entropy (LR {args.lr})", xlabel="step", ylabel="entropy/mean")
    ax_r.set(title="training reward", xlabel="step", ylabel="reward")
    for ax in (ax_h, ax_r):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.output / "curves.png", dpi=120)
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--eval-limit", type=int, default=100)
    parser.add_argument("--output", type=Path, default=Path("outputs/bench/entropy_collapse"))
    parser.add_argument("--override", nargs="*", default=[], help="extra key=value recipe overrides for every method")
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, method in enumerate(args.methods):
        print(f"[entropy_collapse] {method} ({i + 1}/{len(args.methods)})", flush=True)
        rows.append(run_method(method, args, first=i == 0))
        write_outputs(rows, args, rows[0]["accuracy_before"])  # after each method, so partial runs keep results


if __name__ == "__main__":
    main()
