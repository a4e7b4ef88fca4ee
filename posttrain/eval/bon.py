"""Best-of-n with a reward-model ensemble (`posttrain bon`): sample N completions per prompt once with the rollout
engine, score every completion with each member of the ensemble (the proxy) and with a gold reward, and pick.

From that one sampling pass, for every n <= N and every scorer (each aggregate of the ensemble, and each member
alone), the expected gold and proxy score of the best-of-n pick: the unbiased estimator over all n-subsets
(`posttrain.algos.ensembles.best_of_n_expected`), against KL(n) = log n - (n - 1)/n, with Gao et al.'s fit
gold(d) = d (a - b d), d = sqrt(KL), of the gold gain over n = 1. A conservative aggregate (WCO, UWO) that holds gold
up where the mean or one member falls is Coste et al.'s result.

Outputs in the harness's conventions: `results.json` (config, model, ensemble, the curves with standard errors over
prompts, the fits, the picks, versions), `results.md`, `samples_bon.jsonl` (one record per prompt: completions,
every member's score of each, the gold scores, the pick of each aggregate at n = N) and `bon.png`.

    from posttrain.eval.bon import run_bon
    run_bon("smollm2-135m-instruct", "outputs/rm_ensemble_heads", "/tmp/bon", task="arithmetic", limit=16, n=16)
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["best_of_n", "bon_curves", "run_bon"]

GoldFn = Callable[..., list[float | None]]  # a TRL reward function: fn(prompts, completions, **columns)


def bon_curves(scores: Any, gold: Any, aggregates: Sequence[str], uwo_lambda: float = 0.5) -> dict[str, Any]:
    """Best-of-n curves for n = 1..N from member scores ``[K, M, N]`` and gold ``[M, N]`` (M prompts, N samples).

    For each scorer (each aggregate, then ``member_k``): per-n mean and stderr over prompts of the expected gold of
    the pick, and its expected proxy (the scorer's own value); plus a Gao BoN fit of gold - gold(n = 1) against
    sqrt(KL(n))."""
    import torch

    from posttrain.algos.ensembles import aggregate, best_of_n_expected, best_of_n_kl, gao_fit

    k, m, n_samples = scores.shape
    ns = list(range(1, n_samples + 1))
    kl = [best_of_n_kl(n) for n in ns]
    proxies = {how: aggregate(scores.reshape(k, m * n_samples), how, uwo_lambda).reshape(m, n_samples)
               for how in aggregates}
    proxies.update({f"member_{i}": scores[i] for i in range(k)})
    d = torch.tensor(kl, dtype=torch.float64).sqrt()
    curves, fits = {}, {}
    for name, proxy in proxies.items():
        g = torch.stack([best_of_n_expected(proxy, gold, n) for n in ns], dim=1).double()  # [M, len(ns)]
        p = torch.stack([best_of_n_expected(proxy, proxy, n) for n in ns], dim=1).double()
        stderr = g.std(dim=0) / math.sqrt(m) if m > 1 else torch.zeros(len(ns), dtype=torch.float64)
        curves[name] = {"gold": g.mean(0).tolist(), "gold_stderr": stderr.tolist(), "proxy": p.mean(0).tolist()}
        if len(ns) >= 3:
            fit = gao_fit(d, g.mean(0) - g.mean(0)[0], "bon")
            fits[name] = {"a": fit.a, "b": fit.b, "r2": fit.r2, "peak_sqrt_kl": fit.peak}
    return {"ns": ns, "kl": kl, "sqrt_kl": d.tolist(), "curves": curves, "fits": fits}


def _picks(scores: Any, how: str, uwo_lambda: float) -> Any:
    """[M] index of the best-of-N sample under `how`; ties go to the later sample, as in best_of_n_expected."""
    import torch

    from posttrain.algos.ensembles import aggregate

    k, m, n = scores.shape
    agg = aggregate(scores.reshape(k, m * n), how, uwo_lambda).reshape(m, n)
    return torch.sort(agg, dim=1, stable=True).indices[:, -1]


def best_of_n(engine: Any, tokenizer: Any, ensemble: Any, task: Any, rows: Sequence[dict[str, Any]],
              output_dir: str | Path, *, n: int = 16, aggregate: str = "mean", uwo_lambda: float = 0.5,
              gold: GoldFn | None = None, temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 256,
              seed: int = 0, chunk_size: int = 8, progress: bool = True, model_info: dict[str, Any] | None = None,
              plot: bool = True) -> dict[str, Any]:
    """Sample `n` completions for each row's prompt, score them with `ensemble` (a RewardEnsemble) and with `gold`
    (a TRL reward function of the task's columns; default: the task's grader, reward `accuracy`), pick the best
    under `aggregate`, and write the outputs (module docstring) into `output_dir`. Returns the results dict."""
    import torch
    from tqdm.auto import tqdm

    from posttrain.algos import AGGREGATES
    from posttrain.data import format_prompt
    from posttrain.eval.report import write_results
    from posttrain.rewards import get_reward
    from posttrain.rollout import SamplingParams

    AGGREGATES.get(aggregate)  # an unknown aggregate fails before anything is generated
    rows = list(rows)
    if not rows:
        raise ValueError("best_of_n: no prompts")
    gold = gold or get_reward("accuracy", task)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns = [c for c in rows[0] if c != "prompt"]
    all_scores, all_gold, records = [], [], []
    for start in tqdm(range(0, len(rows), chunk_size), desc="best-of-n", disable=not progress):
        chunk = rows[start : start + chunk_size]
        sampling = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                  seed=seed + start)  # seeded by position, as the harness does
        outputs = engine.generate([format_prompt(tokenizer, r["prompt"]) for r in chunk], sampling)
        prompts = [r["prompt"] for r in chunk for _ in range(n)]
        completions = [[{"role": "assistant", "content": c.text}] for o in outputs for c in o.completions]
        scores = ensemble.scores(prompts, completions).reshape(ensemble.k, len(chunk), n)  # one batched call
        kwargs = {col: [r[col] for r in chunk for _ in range(n)] for col in columns}
        golds = torch.tensor([math.nan if v is None else float(v) for v in gold(prompts, completions, **kwargs)],
                             dtype=torch.float64).reshape(len(chunk), n)
        all_scores.append(scores)
        all_gold.append(golds)
        for i, (row, o) in enumerate(zip(chunk, outputs)):
            records.append({"index": start + i, "id": row.get("id"), "prompt": o.prompt,
                            "gold_answer": row.get("answer"),
                            "completions": [c.text for c in o.completions],
                            "lengths": [len(c.token_ids) for c in o.completions],
                            "member_scores": scores[:, i].tolist(), "gold": golds[i].tolist()})
    raw, golds = torch.cat(all_scores, dim=1), torch.cat(all_gold, dim=0)
    if torch.isnan(golds).any():
        raise ValueError("best_of_n: the gold reward returned None for some completions")
    # aggregates of standardised member scores (RewardEnsemble.standardize); a member's own ranking is unchanged
    standardize = getattr(ensemble, "standardize", None)
    scores = standardize(raw) if standardize is not None else raw
    names = AGGREGATES.names()
    picks = {how: _picks(scores, how, uwo_lambda) for how in names}
    with open(out / "samples_bon.jsonl", "w", encoding="utf-8") as f:
        for i, rec in enumerate(records):
            rec["picks"] = {how: int(p[i]) for how, p in picks.items()}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    chosen = picks[aggregate]
    rows_idx = torch.arange(len(records))
    results: dict[str, Any] = {
        "suite": {"name": "best-of-n"},
        "model": model_info or {},
        "ensemble": {"path": str(getattr(ensemble, "path", "")), "form": ensemble.form, "k": ensemble.k,
                     "seeds": ensemble.seeds, "standardized": scores is not raw},
        "config": {"task": task.name, "n": n, "aggregate": aggregate, "uwo_lambda": uwo_lambda,
                   "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed,
                   "prompts": len(records), "gold": getattr(gold, "__name__", str(gold))},
        "picks": {"aggregate": aggregate, "n": n, "kl": math.log(n) - (n - 1) / n,
                  "gold_mean": golds[rows_idx, chosen].mean().item(), "gold_mean_n1": golds.mean().item()},
        **bon_curves(scores, golds, names, uwo_lambda),
    }
    if plot:
        from posttrain.eval.plots import plot_best_of_n

        results["plots"] = [plot_best_of_n(results, out / "bon.png").name]
    write_results(out, results, markdown=_markdown(results))
    return results


def _markdown(results: dict[str, Any]) -> str:
    cfg, picks = results["config"], results["picks"]
    lines = [f"# Best-of-n on {cfg['task']} ({cfg['prompts']} prompts x {cfg['n']} samples)", "",
             f"Ensemble: {results['ensemble']['form']}, K = {results['ensemble']['k']}. Picks by "
             f"`{picks['aggregate']}` at n = {picks['n']} (KL {picks['kl']:.3f} nats): gold "
             f"{picks['gold_mean']:.3f} (n = 1: {picks['gold_mean_n1']:.3f}).", ""]
    ns = results["ns"]
    shown = [i for i, n in enumerate(ns) if n & (n - 1) == 0 or n == ns[-1]]  # powers of two and N
    lines += ["Expected gold score of the best-of-n pick (mean over prompts):", "",
              "| scorer | " + " | ".join(f"n={ns[i]}" for i in shown) + " | Gao fit a, b (r2) |",
              "|---|" + "---:|" * (len(shown) + 1)]
    for name, curve in results["curves"].items():
        fit = results["fits"].get(name)
        fitted = f"{fit['a']:.3f}, {fit['b']:.3f} ({fit['r2']:.2f})" if fit else "-"
        lines.append(f"| {name} | " + " | ".join(f"{curve['gold'][i]:.3f}" for i in shown) + f" | {fitted} |")
    lines += ["", "sqrt(KL) at these n: " + ", ".join(f"{results['sqrt_kl'][i]:.2f}" for i in shown)]
    if results.get("plots"):
        lines += [""] + [f"![{Path(p).stem}]({p})" for p in results["plots"]]
    return "\n".join(lines) + "\n"


def run_bon(model: str, ensemble: str | Path, output_dir: str | Path, *, task: str = "arithmetic",
            options: dict[str, Any] | None = None, split: str = "test", path: str | None = None,
            limit: int | None = 32, adapter: str | None = None, engine: str = "hf", gold: str = "accuracy",
            system_prompt: str | None = None, batch_size: int = 8, dtype: str = "auto",
            members: list[int] | None = None, progress: bool = True, normalize: bool = True,
            **kwargs: Any) -> dict[str, Any]:
    """Load the policy `model` (+ `adapter`), the ensemble at `ensemble`, the task's `split` rows, and run
    `best_of_n` (kwargs: n, aggregate, uwo_lambda, temperature, top_p, max_new_tokens, seed). `gold` names a
    registered reward (posttrain.rewards.REWARDS) built for the task. `normalize=False` aggregates raw member
    scores instead of standardised ones."""
    import torch

    from posttrain.data import get_task
    from posttrain.eval.api import _load, make_engine
    from posttrain.rewards import get_reward
    from posttrain.rewards.ensemble import RewardEnsemble

    t = get_task(task, system_prompt=system_prompt, **(options or {}))
    rows = list(t.load(split=split, path=path, limit=limit))
    gold_fn = get_reward(gold, t)
    ens = RewardEnsemble.from_pretrained(ensemble, members=members, batch_size=batch_size * 4, normalize=normalize)
    net, tokenizer, _ = _load(model, adapter, dtype)
    if torch.cuda.is_available():
        net.to("cuda")
        ens.to("cuda")
    eng = make_engine(engine, net, tokenizer, batch_size=batch_size, progress=False)
    info = {"name_or_path": model, "adapter": adapter, "engine": engine, "dtype": dtype}
    return best_of_n(eng, tokenizer, ens, t, rows, output_dir, gold=gold_fn, chunk_size=batch_size,
                     progress=progress, model_info=info, **kwargs)
