"""Quickstart GRPO step time: this checkout against an earlier revision, and the OpenMP/thread settings, in one run.

Each variant trains the quickstart recipe (SmolLM2-135M-Instruct + LoRA, 2 prompts x 8 completions, up to 48
tokens) for --steps steps in its own fresh process, after the other, and reports TRL's logged `step_time` of every
step but the first (warm-up) with its median; ratios are against the first variant. `--before REV` adds the same
run from a git worktree of REV (e.g. the commit before this work), so before/after come from the same machine in
one invocation. Variants differ in environment or in one recipe key:

  default   the recipe as shipped, torch's own threads (all cores) and libgomp's default spin-waiting
  passive   OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads sleep instead of spinning
  threads1  OMP_NUM_THREADS=1
  ckpt      trainer.gradient_checkpointing=true (TRL's GRPOConfig default)
  no_ckpt   trainer.gradient_checkpointing=false
  static    trainer.hf_continuous_batching=false: rollouts through TRL's static model.generate

--rounds R runs every variant R times, interleaved (A B A B ...), and pools each variant's timed steps, so a
drift in the machine's speed falls on all variants alike.

    python bench/grpo_step_time.py --steps 5                       # ~15 minutes on 2 cores
    python bench/grpo_step_time.py --steps 5 --before e25cada --variants default passive
    python bench/grpo_step_time.py --steps 6 --rounds 3 --variants static default   # the rollout scheduler
    python bench/grpo_step_time.py --model tiny-qwen2 --steps 3    # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# name -> (environment, recipe overrides)
VARIANTS = {"default": ({}, []), "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, []),
            "threads1": ({"OMP_NUM_THREADS": "1"}, []),
            "ckpt": ({}, ["trainer.gradient_checkpointing=true"]),
            "no_ckpt": ({}, ["trainer.gradient_checkpointing=false"]),
            "static": ({}, ["trainer.hf_continuous_batching=false"])}


def run(tree: Path, variant: tuple[dict[str, str], list[str]], model: str, steps: int, out: Path) -> dict:
    env_extra, overrides = variant
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env.update(env_extra, PYTHONPATH=str(tree))
    cmd = [sys.executable, "-m", "posttrain", "train", str(tree / "recipes" / "quickstart.yaml"),
           f"model.name_or_path={model}", f"trainer.max_steps={steps}", "eval.before=false", "eval.after=false",
           f"output_dir={out}", "trainer.disable_tqdm=true", *overrides]
    subprocess.run(cmd, check=True, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    times = [h["step_time"] for h in history if "step_time" in h][1:]
    lengths = [h["completions/mean_length"] for h in history if "completions/mean_length" in h][1:]
    return {"step_times_s": [round(t, 2) for t in times], "median_step_s": round(statistics.median(times), 2),
            "mean_completion_tokens": round(statistics.mean(lengths), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--before", metavar="REV", help="also run this git revision (default settings)")
    ap.add_argument("--rounds", type=int, default=1, help="run every variant this many times, interleaved")
    args = ap.parse_args()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="posttrain-steptime-") as tmp:
        trees = [(name, ROOT, VARIANTS[name]) for name in args.variants]
        if args.before:
            before = Path(tmp) / "before"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before), args.before],
                           check=True, capture_output=True)
            trees.insert(0, (f"before:{args.before}", before, VARIANTS["default"]))
        try:
            for r in range(args.rounds):
                for name, tree, env in trees:
                    result = run(tree, env, args.model, args.steps, Path(tmp) / f"{name.replace(':', '_')}_{r}")
                    print(name, f"round {r}", json.dumps(result), flush=True)
                    pooled = results.setdefault(name, {"step_times_s": [], "mean_completion_tokens": []})
                    pooled["step_times_s"] += result["step_times_s"]
                    pooled["mean_completion_tokens"].append(result["mean_completion_tokens"])
            for pooled in results.values():
                pooled["median_step_s"] = round(statistics.median(pooled["step_times_s"]), 2)
        finally:
            if args.before:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)],
                               capture_output=True)
    first = next(iter(results))
    report = {"model": args.model, "steps_timed_per_run": args.steps - 1, "rounds": args.rounds,
              "cores": os.cpu_count(), "variants": results,
              "ratio_to_" + first: {k: round(v["median_step_s"] / results[first]["median_step_s"], 3)
                                    for k, v in results.items()}}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
