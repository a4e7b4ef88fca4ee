"""`posttrain eval` against lm-evaluation-harness: accuracy and throughput on the same model and prompts.

Two sets, greedy, the same chat-formatted prompts and the same grader on both sides (the local lm-eval
task definitions in eval/lm_eval_tasks/ call posttrain's prompt and grader code):
  - GSM8K, first 200 problems (SmolLM2-135M-Instruct is near the floor, about 2%);
  - 200 held-out problems of the synthetic addition task (near 50%, so disagreements show).
Reports both accuracies (they should agree within 2 points), per-problem agreement of the graded
answers, and samples/s of each harness on the same HF (transformers) backend. Needs the `lm-eval`
extra (pip install 'posttrain[lm-eval]'); with --skip-lm-eval only posttrain's side runs. Run from the
repository root (the lm-eval task files name their data relative to it). Measured results: docs/eval.md.

    python bench/eval_lm_eval_compare.py                      # SmolLM2, 200 + 200 problems (2 CPU cores: ~13 min)
    python bench/eval_lm_eval_compare.py --sets arithmetic    # the addition set only (~2 min)
    python bench/eval_lm_eval_compare.py --model tiny-qwen2 --limit 5 --skip-lm-eval   # smoke test
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from posttrain.data import export_jsonl, get_task
from posttrain.eval.harness import evaluate_suite
from posttrain.eval.suite import suite_from_dict
from posttrain.models import load_model, load_tokenizer
from posttrain.rollout import HFEngine

ROOT = Path(__file__).resolve().parents[1]
TASKS_DIR = ROOT / "eval" / "lm_eval_tasks"
ARITH_JSONL = ROOT / "outputs" / "lm_eval_data" / "arithmetic_test.jsonl"
GSM8K_JSONL = ROOT / "outputs" / "lm_eval_data" / "gsm8k.jsonl"  # where eval/lm_eval_tasks/posttrain_gsm8k.yaml reads
SETS = {  # our task name -> (lm-eval task, max new tokens)
    "gsm8k": ("posttrain_gsm8k", 256),
    "arithmetic": ("posttrain_arithmetic", 64),
}


def ours(model, tokenizer, limit: int, data_dir: Path, out: Path, batch_size: int, sets: list[str]) -> dict:
    paths = {"gsm8k": GSM8K_JSONL, "arithmetic": ARITH_JSONL}
    suite = suite_from_dict({
        "name": "lm_eval_compare",
        "sampling": {"n": 1, "temperature": 0.0},
        "tasks": [{"name": name, "path": str(paths[name]), "sampling": {"max_new_tokens": SETS[name][1]}}
                  for name in sets],
    })
    for t in suite.tasks:
        t.limit = limit
    engine = HFEngine(model, tokenizer, batch_size=batch_size, progress=False)
    res = evaluate_suite(engine, tokenizer, suite, out / "posttrain", resume=False, chunk_size=batch_size)
    return {name: {"accuracy": r["metrics"]["accuracy"], "stderr": r["stderr"]["accuracy"],
                   "seconds": r["info"]["seconds"], "samples_per_s": r["info"]["samples_per_s"]}
            for name, r in res["tasks"].items()}


def theirs(model, tokenizer, limit: int, out: Path, batch_size: int, sets: list[str]) -> dict:
    from posttrain.eval.lm_eval_backend import run_lm_eval

    results = {}
    for name in sets:
        task = SETS[name][0]
        t0 = time.perf_counter()
        raw = run_lm_eval(model, tokenizer, task, limit=limit, include=[str(TASKS_DIR)], batch_size=batch_size,
                          apply_chat_template=True)
        seconds = time.perf_counter() - t0
        metrics = raw["results"][task]
        samples = raw["samples"][task]
        (out / f"lm_eval_samples_{name}.jsonl").write_text(
            "".join(json.dumps(s, default=str) + "\n" for s in samples))
        results[name] = {"accuracy": metrics["exact_match,none"], "stderr": metrics.get("exact_match_stderr,none"),
                         "seconds": seconds, "samples_per_s": len(samples) / seconds,
                         "scores": {int(s["doc_id"]): float(s["exact_match"]) for s in samples},
                         "texts": {int(s["doc_id"]): s["resps"][0][0] for s in samples},
                         "prompts": {int(s["doc_id"]): s["arguments"][0][0] for s in samples}}
    return results


def agreement(out: Path, lm: dict, sets: list[str]) -> dict:
    """Per-problem agreement of the two harnesses: identical prompt text, identical generated text (up to
    surrounding whitespace: lm-eval strips at its stop string), and identical 0/1 grades."""
    report = {}
    for name in sets:
        ours_recs = {}
        for line in (out / "posttrain" / f"samples_{name}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            ours_recs[rec["index"]] = rec
        theirs_scores, texts, prompts = lm[name].pop("scores"), lm[name].pop("texts"), lm[name].pop("prompts")
        common = sorted(set(ours_recs) & set(theirs_scores))
        same = sum(ours_recs[i]["scores"][0] == theirs_scores[i] for i in common)
        same_text = sum(ours_recs[i]["completions"][0].strip() == texts[i].strip() for i in common)
        same_prompt = sum(ours_recs[i]["prompt"] == prompts[i] for i in common)
        report[name] = {"problems": len(common), "same_prompt": same_prompt, "same_text": same_text,
                        "same_grade": same, "differ": len(common) - same,
                        "differing_ids": [i for i in common if ours_recs[i]["scores"][0] != theirs_scores[i]]}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "benchmarks"))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--output", default=str(ROOT / "outputs" / "bench" / "eval_lm_eval_compare"))
    parser.add_argument("--skip-lm-eval", action="store_true", help="only posttrain's side (no lm-eval installed)")
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    args = parser.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    # the 200 held-out addition problems (the quickstart's test distribution), as JSONL for both harnesses
    if "gsm8k" in args.sets:  # both harnesses read the same copy
        GSM8K_JSONL.parent.mkdir(parents=True, exist_ok=True)
        GSM8K_JSONL.write_text((Path(args.data_dir) / "gsm8k.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    export_jsonl(get_task("arithmetic", min_value=1, max_value=20, num_eval=max(args.limit, 100)), "test", ARITH_JSONL,
                 limit=args.limit)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer, model = load_tokenizer(args.model), load_model(args.model, dtype="float32").to(device).eval()
    report = {"model": args.model, "limit": args.limit, "decoding": "greedy", "backend": "transformers (HF)",
              "device": torch.cuda.get_device_name() if device == "cuda"
              else f"cpu ({torch.get_num_threads()} threads)",
              "posttrain": ours(model, tokenizer, args.limit, Path(args.data_dir), out, args.batch_size, args.sets)}
    if not args.skip_lm_eval:
        lm = theirs(model, tokenizer, args.limit, out, args.batch_size, args.sets)
        report["agreement"] = agreement(out, lm, args.sets)
        report["lm_eval"] = lm
        report["accuracy_gap_points"] = {n: 100 * (report["posttrain"][n]["accuracy"] - lm[n]["accuracy"])
                                         for n in args.sets}
        report["throughput_ratio"] = {n: report["posttrain"][n]["samples_per_s"] / lm[n]["samples_per_s"]
                                      for n in args.sets}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
