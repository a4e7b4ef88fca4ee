"""The continual study of docs/methods/continual.md: EMA-balanced LoRA against its baselines on the 5-task SmolLM2
sequence of recipes/continual/ (cb -> qqp -> amazon -> sst2 -> agnews), several seeds, same steps per stage.

Each (method, seed) is one `posttrain train recipes/continual/<method>.yaml` run in its own process, started under
`flock LOCK` (one heavy job at a time on a shared machine) and skipped when its report already exists, so the study
resumes after an interruption. The base model's row (for FWT) is evaluated once, in the first run: every run
evaluates the same test rows greedily, so it is the same for all. Then the table (mean and standard deviation over
seeds of ACC, BWT, FWT, mean forgetting, final min-ACC and WC-ACC), the mean accuracy matrix of each method as a
heatmap and the stability-gap curves of seed 0 are written to --out (and the figures to --figures).

    python bench/continual_study.py --data ../shared/data/continual --out outputs/bench/continual \
        --figures docs/methods --seeds 0 1 2
    python bench/continual_study.py --aggregate-only --out outputs/bench/continual --figures docs/methods
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ["ema_lora", "seq_lora", "fixed_ema", "ilora", "multitask"]
LABELS = {"ema_lora": "EMA-balanced LoRA (LCIA)", "seq_lora": "sequential LoRA", "fixed_ema": "fixed-EMA LoRA",
          "ilora": "I-LoRA", "replay": "replay only", "multitask": "multi-task (upper bound)"}


def run_one(method: str, seed: int, args: argparse.Namespace, base: bool) -> Path:
    out = Path(args.out) / method / f"seed{seed}"
    if (out / "report" / "continual.json").is_file():
        return out
    cmd = [sys.executable, "-m", "posttrain", "train", f"recipes/continual/{method}.yaml",
           f"data.path={Path(args.data).resolve()}",
           f"seed={seed}", f"output_dir={out.resolve()}", f"eval.base={'true' if base else 'false'}", *args.override]
    resume = (out / "progress.json").is_file()
    if resume:
        cmd.append("--resume")
    if args.lock:
        cmd = ["flock", args.lock, *cmd]
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    print(f"[study] {method} seed {seed}{' (resuming)' if resume else ''}: {' '.join(cmd)}", flush=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    with open(out / "train.log", "a") as log:
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    print(f"[study] {method} seed {seed}: exit {proc.returncode} after {(time.time() - t0) / 60:.1f} min", flush=True)
    if proc.returncode:
        raise SystemExit(f"run failed, see {out / 'train.log'}")
    return out


def _mean_sd(values: list[float | None]) -> tuple[float | None, float | None, int]:
    xs = [v for v in values if v is not None]
    if not xs:
        return None, None, 0
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0), len(xs)


def aggregate(args: argparse.Namespace) -> dict:
    from posttrain.eval.metrics import continual_metrics
    from posttrain.eval.plots import plot_accuracy_matrix, plot_stability_gap

    root = Path(args.out)
    reports = {m: sorted(root.glob(f"{m}/seed*/report/continual.json")) for m in args.methods}
    base = None
    for paths in reports.values():
        for p in paths:
            base = base or json.loads(p.read_text()).get("base")
    figures = Path(args.figures) if args.figures else root
    figures.mkdir(parents=True, exist_ok=True)
    table: dict[str, dict] = {}
    for method, paths in reports.items():
        if not paths:
            continue
        runs = [json.loads(p.read_text()) for p in paths]
        rows = {k: [] for k in ("acc", "bwt", "fwt", "forgetting_mean", "min_acc", "wc_acc", "seconds_per_stage",
                                "groups", "ema_bytes")}
        for r in runs:
            sequential = len(r["matrix"]) == len(r["tasks"])
            m = continual_metrics(r["matrix"], base) if sequential else {"acc": r["acc"]}
            rows["acc"].append(m["acc"])
            rows["bwt"].append(m.get("bwt"))
            rows["fwt"].append(m.get("fwt"))
            rows["forgetting_mean"].append(m.get("forgetting_mean"))
            rows["min_acc"].append((r["stability"].get("min_acc") or [None])[-1])
            rows["wc_acc"].append((r["stability"].get("wc_acc") or [None])[-1])
            rows["seconds_per_stage"].append(statistics.fmean(r["train_seconds"]))
            rows["groups"].append(len(r["groups"]["groups"]) if r.get("groups") else None)
            rows["ema_bytes"].append(max((b for b in r.get("ema_bytes", []) if b), default=None))
        table[method] = {k: _mean_sd(v) for k, v in rows.items()}
        table[method]["seeds"] = [p.parent.parent.name for p in paths]
        n_stage = len(runs[0]["matrix"])
        mean_matrix = [[statistics.fmean(r["matrix"][i][j] for r in runs) for j in range(len(runs[0]["tasks"]))]
                       for i in range(n_stage)]
        table[method]["mean_matrix"] = mean_matrix
        plot_accuracy_matrix(mean_matrix, runs[0]["tasks"], figures / f"continual_{method}_matrix.png",
                             stage_names=runs[0]["stages"])
        curves = runs[0]["stability"].get("curves")
        if curves:
            plot_stability_gap(curves, runs[0]["stage_ends"], figures / f"continual_{method}_stability.png")
    summary = {"base": base, "tasks": runs[0]["tasks"] if table else [], "methods": table}
    (root / "summary.json").write_text(json.dumps(summary, indent=1))
    (root / "summary.md").write_text(_markdown(summary))
    print(_markdown(summary))
    return summary


def _fmt(cell: tuple[float | None, float | None, int], digits: int = 3) -> str:
    mean, sd, n = cell
    if mean is None:
        return "-"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def _markdown(summary: dict) -> str:
    lines = ["| method | seeds | ACC | BWT | FWT | forgetting | min-ACC (final) | WC-ACC (final) | s / stage |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for method, row in summary["methods"].items():
        lines.append(f"| {LABELS.get(method, method)} | {len(row['seeds'])} | {_fmt(row['acc'])} | {_fmt(row['bwt'])} "
                     f"| {_fmt(row['fwt'])} | {_fmt(row['forgetting_mean'])} | {_fmt(row['min_acc'])} "
                     f"| {_fmt(row['wc_acc'])} | {_fmt(row['seconds_per_stage'], 0)} |")
    if summary.get("base"):
        lines += ["", "Base model: " + ", ".join(f"{t} {v:.3f}" for t, v in zip(summary["tasks"], summary["base"]))]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/continual", help="folder of <task>/{train,test}.jsonl, labels.json")
    parser.add_argument("--out", default="outputs/bench/continual")
    parser.add_argument("--figures", default=None, help="where the heatmaps and stability plots go (default --out)")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--lock", default="/tmp/posttrain-heavy.lock", help="flock this file around each run ('' off)")
    parser.add_argument("--override", nargs="*", default=[], help="more key=value overrides for every run")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS of each run (0: leave it). On the shared 2-core machine one thread "
                             "evaluated SmolLM2 2.3x faster than two (22 s against 50 s for 30 prompts)")
    parser.add_argument("--aggregate-only", action="store_true")
    args = parser.parse_args()
    if not args.aggregate_only:
        first = True
        for seed in args.seeds:
            for method in args.methods:
                run_one(method, seed, args, base=first)
                first = False
    aggregate(args)


if __name__ == "__main__":
    main()
