"""The HF engine's two schedulers on the same model and prompts: continuous batching (the default) against static
`model.generate` batches (`HFEngine(continuous=False)`), in one process, alternating A B A B so that drift in the
machine's speed falls on both. Prints one JSON object: seconds per run, samples/s, the ratio, and how many
greedy completions are identical.

Workloads: the evaluation harness's greedy decoding of held-out addition problems (chat template, 64 new tokens;
completions of very different lengths) and the quickstart's sampled rollouts (n = 8 per prompt, 48 new tokens).

    python bench/hf_scheduler.py                         # SmolLM2-135M-Instruct, 96 problems, 2 repeats
    python bench/hf_scheduler.py --model tiny-qwen2 --prompts 8 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from posttrain.data import format_prompt, get_task
from posttrain.models import load_model, load_tokenizer
from posttrain.rollout import HFEngine, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=96, help="addition problems for the greedy workload")
    ap.add_argument("--sampled-prompts", type=int, default=8, help="prompts (x 8 samples) for the sampled one")
    ap.add_argument("--batch-size", type=int, default=16, help="prompts per batch (the harness's --batch-size)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    tok, model = load_tokenizer(a.model), load_model(a.model, dtype="float32").eval()
    task = get_task("arithmetic", min_value=1, max_value=20, num_eval=max(a.prompts, a.sampled_prompts))
    rows = list(task.load(split="test", limit=max(a.prompts, a.sampled_prompts)))
    texts = [format_prompt(tok, r["prompt"]) for r in rows]
    workloads = {
        "greedy_eval": (texts[: a.prompts], SamplingParams(temperature=0, max_new_tokens=64, entropies=True), 1),
        "sampled_rollouts": (texts[: a.sampled_prompts], SamplingParams(n=8, temperature=1.0, max_new_tokens=48,
                                                                        seed=0, logprobs=True), 8),
    }
    engines = {"continuous": HFEngine(model, tok, batch_size=a.batch_size, progress=False),
               "static": HFEngine(model, tok, batch_size=a.batch_size, progress=False, continuous=False)}
    report: dict = {"model": a.model, "batch_size": a.batch_size, "threads": torch.get_num_threads(),
                    "repeats": a.repeats}
    for name, (prompts, sampling, n) in workloads.items():
        seconds: dict[str, list[float]] = {k: [] for k in engines}
        outputs: dict[str, list] = {}
        tokens: dict[str, int] = {}
        engines["continuous"].generate(prompts[:2], SamplingParams(max_new_tokens=4, temperature=0))  # warm-up
        for _ in range(a.repeats):
            for kind, engine in engines.items():
                t0 = time.perf_counter()
                out = engine.generate(prompts, sampling)
                seconds[kind].append(time.perf_counter() - t0)
                outputs[kind] = [[c.token_ids for c in o.completions] for o in out]
                tokens[kind] = sum(len(c.token_ids) for o in out for c in o.completions)
        med = {k: statistics.median(v) for k, v in seconds.items()}
        row = {"prompts": len(prompts), "samples": len(prompts) * n, "seconds": seconds,
               "samples_per_s": {k: len(prompts) * n / med[k] for k in engines},
               "tokens_per_s": {k: tokens[k] / med[k] for k in engines},
               "ratio_continuous_over_static": med["static"] / med["continuous"]}
        if sampling.greedy:
            row["identical_completions"] = sum(x == y for x, y in zip(outputs["continuous"], outputs["static"]))
        report[name] = row
        print(name, json.dumps(row), flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
