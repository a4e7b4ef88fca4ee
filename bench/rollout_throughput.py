"""Rollout engines compared: generation throughput (tokens/s) of the vllm backend against the hf backend on the
same model, prompts and sampling, and the time of one weight sync (full and LoRA) against one training step.
Prints one JSON object (ratios under "ratios").

    python bench/rollout_throughput.py --prompts 2 --n 8 --max-new-tokens 48   # the quickstart's shapes, CPU
    python bench/rollout_throughput.py --prompts 64 --n 8 --max-new-tokens 48 --syncs 1 --repeats 2

Needs vLLM (`make install-vllm`). The training step is one AdamW step on the rollout batch (forward and
backward of prompt + completion, the sampled tokens' mean log-probability as the loss): the work a GRPO
step does besides generation and rewards. Everything runs in one process, as colocated training does;
both engines run at the process's torch threads (vLLM on CPU keeps them; see posttrain/rollout/vllm.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import torch  # noqa: E402

from posttrain.models import load_model, load_tokenizer, lora_config, resolve_model_path  # noqa: E402
from posttrain.rollout import HFEngine, SamplingParams, make_engine  # noqa: E402


def prompts(tokenizer, count: int) -> list[str]:
    return [tokenizer.apply_chat_template(
        [{"role": "user", "content": f"What is {3 + 2 * i} + {11 + i}? Put the final answer in \\boxed{{}}."}],
        tokenize=False, add_generation_prompt=True) for i in range(count)]


def timed_generate(engine, texts, sampling, repeats: int) -> tuple[dict, list]:
    """A 4-token warm-up, then `repeats` timed calls on the same prompts; tokens/s of each call and their median.
    The first timed call of an engine can still pay one-time costs at the new batch shapes (the warm-up has one
    prompt); a training run generates every step, so the later calls are what a step pays."""
    engine.generate(texts[:1], SamplingParams(n=sampling.n, max_new_tokens=4, temperature=1.0, seed=1))  # warm-up
    runs, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = engine.generate(texts, sampling)
        seconds = time.perf_counter() - t0
        tokens = sum(len(c.token_ids) for o in out for c in o.completions)
        runs.append({"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1)})
    return {"runs": runs, "first_tokens_per_s": runs[0]["tokens_per_s"],
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs[1:] or runs),
            "torch_threads": torch.get_num_threads()}, out


def train_step_seconds(model, outputs, micro_batch: int) -> float:
    """One AdamW step on the rollout batch (right-padded; forward and backward in micro-batches of
    `micro_batch` rows with the gradients accumulated, as a trainer's per-device batch does)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    rows = [(o.prompt_token_ids, c.token_ids) for o in outputs for c in o.completions]
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    target = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (p, c) in enumerate(rows):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        mask[i, : len(p) + len(c)] = 1
        target[i, len(p) : len(p) + len(c)] = True
    model.train()
    t0 = time.perf_counter()
    total = target.sum()
    for start in range(0, len(rows), micro_batch):
        part = slice(start, start + micro_batch)
        logits = model(input_ids=ids[part], attention_mask=mask[part]).logits[:, :-1]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[part, 1:, None]).squeeze(-1)
        (-(logp * target[part, 1:]).sum() / total).backward()
    opt.step()
    opt.zero_grad()
    seconds = time.perf_counter() - t0
    model.eval()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--n", type=int, default=4, help="completions per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--syncs", type=int, default=3, help="weight syncs timed (median reported)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed generate calls per engine; tokens_per_s is the median of all but the first")
    ap.add_argument("--train-micro-batch", type=int, default=16, help="rows per forward/backward of the timed step")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for everything (default: as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from peft import get_peft_model

    path = resolve_model_path(args.model)
    tok = load_tokenizer(path)
    model = load_model(path, "float32")
    texts = prompts(tok, args.prompts)
    sampling = SamplingParams(n=args.n, temperature=1.0, max_new_tokens=args.max_new_tokens, seed=0, logprobs=True)
    result: dict = {"model": args.model, "prompts": args.prompts, "n": args.n, "max_new_tokens": args.max_new_tokens,
                    "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name()}

    hf = HFEngine(model, tok, batch_size=args.prompts, progress=False)
    result["hf"], _ = timed_generate(hf, texts, sampling, args.repeats)
    default_threads = torch.get_num_threads()

    t0 = time.perf_counter()
    engine = make_engine("vllm", path, tok, dtype="float32", max_model_len=1024, seed=0, enable_lora=True,
                         max_lora_rank=args.lora_r, torch_threads=args.threads)
    result["vllm_startup_s"] = round(time.perf_counter() - t0, 2)
    result["vllm"], outputs = timed_generate(engine, texts, sampling, args.repeats)
    if torch.get_num_threads() != default_threads:  # timed again at the same threads as vLLM
        result["hf_same_threads"], _ = timed_generate(hf, texts, sampling, args.repeats)

    print("partial:", json.dumps(result), flush=True)
    result["sync_full_s"] = round(statistics.median(engine.sync_weights(model) for _ in range(args.syncs)), 4)
    result["train_step_full_s"] = round(train_step_seconds(model, outputs, args.train_micro_batch), 3)
    print("partial:", json.dumps(result), flush=True)
    peft_model = get_peft_model(model, lora_config(r=args.lora_r, alpha=2 * args.lora_r))
    result["sync_lora_s"] = round(statistics.median(engine.sync_weights(peft_model) for _ in range(args.syncs)), 4)
    result["vllm_lora"], _ = timed_generate(engine, texts, sampling, args.repeats)
    result["train_step_lora_s"] = round(train_step_seconds(peft_model, outputs, args.train_micro_batch), 3)
    engine.close()

    hf_same = result.get("hf_same_threads", result["hf"])
    result["ratios"] = {
        "vllm_over_hf_tokens_per_s": round(result["vllm"]["tokens_per_s"] / result["hf"]["tokens_per_s"], 2),
        "vllm_over_hf_first_call": round(result["vllm"]["first_tokens_per_s"] / result["hf"]["first_tokens_per_s"], 2),
        "vllm_over_hf_same_threads": round(result["vllm"]["tokens_per_s"] / hf_same["tokens_per_s"], 2),
        "vllm_lora_over_hf_tokens_per_s": round(result["vllm_lora"]["tokens_per_s"] / result["hf"]["tokens_per_s"], 2),
        "sync_full_over_train_step": round(result["sync_full_s"] / result["train_step_full_s"], 4),
        "sync_lora_over_train_step": round(result["sync_lora_s"] / result["train_step_lora_s"], 4),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
