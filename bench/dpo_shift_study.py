"""DPO against DPO-Shift (f = 0.95, f = 0.75) on SmolLM2-135M-Instruct + LoRA, from the same start, on the same
pairs, over several seeds: does the chosen response stay likely, and what does it cost in held-out reward
accuracy and task accuracy? (ALGORITHMS.md, DPO-Shift; the paper's Figure 1 and its accuracy/margin trade-off.)

Every run is `recipes/dpo/dpo.yaml` or `recipes/dpo/dpo_shift.yaml` as shipped (pairs built once by SmolLM2 from
synthetic addition and cached; 2 epochs; task accuracy on 100 held-out problems, greedy), with `seed` and
`trainer.dpo_shift_f` set. The start is the same model for every run, so task accuracy before training and the
held-out pairs' starting log-probs are measured once (the first run). Finished runs are skipped on a rerun.

    PYTHONPATH=. python bench/dpo_shift_study.py --seeds 0 1 2 --output outputs/dpo_shift_study

Writes OUTPUT/results.json, OUTPUT/results.md, OUTPUT/pair_logps.png (the held-out pairs' chosen and rejected
log-probabilities at the start and after each method, first seed) and OUTPUT/tradeoff.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "dpo"
METHODS = {"dpo": ("dpo.yaml", []), "dpo_shift_f0.95": ("dpo_shift.yaml", ["trainer.dpo_shift_f=0.95"]),
           "dpo_shift_f0.75": ("dpo_shift.yaml", ["trainer.dpo_shift_f=0.75"])}
COLUMNS = [("logps/chosen_change", "chosen logp change"), ("chosen_change_sampled", "chosen change, sampled pairs"),
           ("chosen_change_reference", "chosen change, reference pairs"),
           ("logps/rejected_change", "rejected logp change"), ("chosen_up", "pairs with chosen up"),
           ("reward_accuracy", "held-out reward acc."), ("margin", "margin")]


def run(name: str, seed: int, output: Path, first: bool, extra: list[str]) -> dict:
    from posttrain.recipe import load_recipe
    from posttrain.train import run_recipe

    out = output / f"{name}_seed{seed}"
    summary_file = out / "report" / "summary.json"
    if not summary_file.is_file():
        recipe, overrides = METHODS[name]
        r = load_recipe(RECIPES / recipe, [*overrides, f"seed={seed}", f"output_dir={out}",
                                           f"eval.before={str(first).lower()}", *extra])
        run_recipe(r)
    return json.loads(summary_file.read_text())


def reference_ids(pair_file: str) -> set[str]:
    """Ids of the held-out pairs whose chosen response is the task's reference answer (prompts where all of
    SmolLM2's samples were wrong); the others pair two of the model's own samples (on-policy)."""
    from posttrain.data import get_task

    task = get_task("arithmetic")
    rows = [json.loads(line) for line in Path(pair_file).read_text().splitlines()]
    return {r["id"] for r in rows if r["chosen"][0]["content"] == task.reference_completion(r["answer"])}


def chosen_change_by_kind(report: Path, ref_ids: set[str]) -> dict[str, float]:
    """Mean chosen log-prob change on the sampled (on-policy) and on the reference-chosen held-out pairs."""
    records = [json.loads(line) for line in (report / "pairs_after.jsonl").read_text().splitlines()]
    out = {}
    for kind, keep in (("sampled", lambda r: r["id"] not in ref_ids), ("reference", lambda r: r["id"] in ref_ids)):
        changes = [r["logp_chosen"] - r["ref_logp_chosen"] for r in records if keep(r)]
        out[f"chosen_change_{kind}"] = statistics.fmean(changes)
        out[f"n_{kind}"] = len(changes)
    return out


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--output", type=Path, default=Path("outputs/dpo_shift_study"))
    parser.add_argument("overrides", nargs="*", help="recipe overrides for every run (e.g. trainer.num_train_epochs=1)")
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)

    runs: dict[str, list[dict]] = {}
    for seed in args.seeds:  # seed-major: a partial study still compares every method
        for name in args.methods:
            first = seed == args.seeds[0] and name == args.methods[0]
            runs.setdefault(name, []).append(run(name, seed, args.output, first, args.overrides))
    start = runs[args.methods[0]][0]
    table = {"task_accuracy_before": start.get("accuracy_before"), "pairs_before": start["pairs_before"],
             "n_train_pairs": start["pairs"]["train"], "pair_files": start["pairs"]["files"], "seeds": args.seeds,
             "overrides": args.overrides, "methods": {}}
    ref_ids = reference_ids(start["pairs"]["files"]["eval"])
    for name, summaries in runs.items():
        for seed, s in zip(args.seeds, summaries):
            s["pairs_after"].update(chosen_change_by_kind(args.output / f"{name}_seed{seed}" / "report", ref_ids))
        row = {key: mean_sd([s["pairs_after"][key] for s in summaries]) for key, _ in COLUMNS}
        row["task_accuracy_after"] = mean_sd([s["accuracy_after"] for s in summaries])
        row["train_minutes"] = mean_sd([s["train_minutes"] for s in summaries])
        row["steps"] = summaries[0]["steps"]
        row["per_seed"] = [{"seed": seed, **{k: s["pairs_after"][k] for k, _ in COLUMNS},
                            "task_accuracy_after": s["accuracy_after"]} for seed, s in zip(args.seeds, summaries)]
        table["methods"][name] = row
    first_after = runs[args.methods[0]][0]["pairs_after"]
    table["n_sampled"], table["n_reference"] = first_after["n_sampled"], first_after["n_reference"]
    (args.output / "results.json").write_text(json.dumps(table, indent=2))
    (args.output / "results.md").write_text(markdown(table))
    plots(args, runs)
    print(markdown(table))


def markdown(table: dict) -> str:
    b = table["pairs_before"]
    lines = [f"Start (SmolLM2-135M-Instruct): task accuracy {table['task_accuracy_before']:.3f}; held-out pairs "
             f"({b['n_pairs']}: {table['n_sampled']} sampled, {table['n_reference']} with the reference answer as "
             f"chosen): mean logp chosen {b['logps/chosen']:.2f}, rejected {b['logps/rejected']:.2f}. "
             f"{table['n_train_pairs']} training pairs; seeds {table['seeds']}; mean +- sd over seeds.", "",
             "| method | " + " | ".join(h for _, h in COLUMNS) + " | task acc. after | steps | train min |",
             "|---|" + "---:|" * (len(COLUMNS) + 3)]
    for name, row in table["methods"].items():
        cells = [f"{row[k][0]:+.2f} +- {row[k][1]:.2f}" if "change" in k or k == "margin"
                 else f"{row[k][0]:.3f} +- {row[k][1]:.3f}" for k, _ in COLUMNS]
        acc = row["task_accuracy_after"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {acc[0]:.3f} +- {acc[1]:.3f} | {row['steps']} | "
                     f"{row['train_minutes'][0]:.1f} |")
    return "\n".join(lines) + "\n"


def _pair_logps(path: Path) -> tuple[list[float], list[float]]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [r["logp_chosen"] for r in records], [r["logp_rejected"] for r in records]


def plots(args: argparse.Namespace, runs: dict[str, list[dict]]) -> None:
    import matplotlib.pyplot as plt

    from posttrain.eval.plots import plot_pair_logps

    seed = args.seeds[0]
    first = args.output / f"{args.methods[0]}_seed{seed}" / "report"
    panels = {"start (SmolLM2-135M-Instruct)": _pair_logps(first / "pairs_before.jsonl")}
    for name in args.methods:
        report = args.output / f"{name}_seed{seed}" / "report"
        panels[f"{name} (seed {seed})"] = _pair_logps(report / "pairs_after.jsonl")
    plot_pair_logps(panels, args.output / "pair_logps.png")

    fig, ax = plt.subplots(figsize=(6.0, 4.4))
    for name, summaries in runs.items():
        xs = [s["pairs_after"]["logps/chosen_change"] for s in summaries]
        ys = [s["pairs_after"]["reward_accuracy"] for s in summaries]
        ax.scatter(xs, ys, label=name, s=30)
    ax.axvline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("held-out chosen log-prob change (nats)")
    ax.set_ylabel("held-out reward accuracy")
    ax.set_title("DPO vs DPO-Shift: one point per seed")
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.output / "tradeoff.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
