"""TRL's fused LM head on the CPU: every position scored (TRL's CPU default) against only the labelled ones
(`posttrain.trainers.fused_head.compact_lm_head_on_cpu`, which the GRPO and DPO trainers use), in one process,
alternating.

One loss forward and backward at the quickstart's shapes: --rows rows of --prompt prompt tokens and up to
--completion completion tokens (random lengths, the first row full, the rest padding), the model frozen except
one projection so the backward runs through the whole backbone. Reports each variant's times, the median ratio,
and the largest difference of the log-probs, entropies and gradient. Prints one JSON object.

    python bench/fused_head_cpu.py                         # SmolLM2-135M-Instruct, 16 x (60 + 48), 3 rounds
    python bench/fused_head_cpu.py --model tiny-qwen2      # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=60)
    ap.add_argument("--completion", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from trl.trainer.utils import add_fused_lm_head

    from posttrain.models import load_model
    from posttrain.trainers.fused_head import compact_lm_head_on_cpu

    torch.manual_seed(0)
    model = load_model(args.model, "float32")
    add_fused_lm_head(model, temperature=1.0, outputs=("log_probs", "entropy"))
    model.requires_grad_(False)
    trained = model.model.layers[0].self_attn.q_proj.weight
    trained.requires_grad_(True)
    b, p, c = args.rows, args.prompt, args.completion
    ids = torch.randint(100, min(model.config.vocab_size, 1000), (b, p + c))
    mask = torch.ones(b, p + c, dtype=torch.long)
    lengths = torch.randint(1, c + 1, (b,))
    lengths[0] = c
    for i in range(b):
        mask[i, p + lengths[i]:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :p] = -100

    def step(compact: bool) -> tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]:
        trained.grad = None
        start = time.perf_counter()
        with compact_lm_head_on_cpu(torch.device("cpu")) if compact else contextlib.nullcontext():
            out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
            (out.log_probs.sum() + out.entropy.sum()).backward()
        return time.perf_counter() - start, out.log_probs.detach(), out.entropy.detach(), trained.grad.clone()

    times: dict[str, list[float]] = {"every_position": [], "compact": []}
    results = {}
    for _ in range(args.rounds):
        for name in times:
            seconds, *results[name] = step(name == "compact")
            times[name].append(round(seconds, 3))
    diff = [(x - y).abs().max().item() for x, y in zip(results["compact"], results["every_position"], strict=True)]
    median = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"model": args.model, "rows": b, "prompt_tokens": p, "max_completion_tokens": c,
                      "scored_positions": {"every_position": b * (p + c - 1), "compact": int(lengths.sum())},
                      "seconds": times, "median_s": median,
                      "ratio_compact_over_every_position": round(median["compact"] / median["every_position"], 3),
                      "max_abs_diff": {"log_probs": diff[0], "entropy": diff[1], "grad": diff[2]}}, indent=1))


if __name__ == "__main__":
    main()
