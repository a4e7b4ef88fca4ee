"""What EMA-balanced LoRA costs over sequential LoRA, measured in one process: the time of a stage (the same
steps on the same rows, with and without the EMA hook) and the memory of the EMA state relative to the adapter.

One model, one LoRA adapter reset to the same initial weights before every run; the variants (no EMA, the dynamic
EMA, a fixed EMA) take turns `--repeats` times, so that drift in the machine's load hits them alike; the ratio is
of the medians. The EMA's own time per step (its L1 norms and update, `AdapterEMA.update`) is timed apart too.

    python bench/continual_overhead.py --data ../shared/data/continual --task cb --steps 10 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", default="data/continual")
    parser.add_argument("--task", default="cb")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per stage")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--out", default="outputs/bench/continual_overhead.json")
    args = parser.parse_args()

    import datasets
    import torch
    from peft import get_peft_model

    from posttrain.data import get_task
    from posttrain.models import load_model, load_tokenizer, lora_config
    from posttrain.pipelines.continual import LONG_SEQUENCE_INSTRUCTIONS
    from posttrain.trainers.continual import AdapterEMA, ContinualConfig, ContinualTrainer

    tokenizer = load_tokenizer(args.model)
    instruction = f"{LONG_SEQUENCE_INSTRUCTIONS.get(args.task, '')}\nOption: {{labels}}"
    task = get_task("classification", instruction=instruction, instruction_first=True, max_chars=120,
                    system_prompt="Answer with one option.")
    rows = task.load(split="train", path=Path(args.data) / args.task, limit=args.steps * args.batch_size)
    train = datasets.Dataset.from_dict({"prompt": rows["prompt"],
                                        "completion": [[{"role": "assistant", "content": a}] for a in rows["answer"]]})
    torch.manual_seed(0)
    model = get_peft_model(load_model(args.model, "float32"), lora_config(r=args.rank, alpha=2 * args.rank),
                           adapter_name="group_0")
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    adapter_bytes = sum(t.numel() * t.element_size() for t in initial.values())

    variants = {"seq_lora": ("none", {}), "ema_lora": ("dynamic", {}), "fixed_ema": ("fixed", {"ema_weight": 0.1})}
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    memory: dict[str, float] = {}
    for repeat in range(args.repeats):
        for name, (ema_kind, extra) in variants.items():
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in initial:
                        p.copy_(initial[n])
            cfg = ContinualConfig(output_dir=f"/tmp/posttrain-overhead-{name}", max_steps=args.steps,
                                  per_device_train_batch_size=args.batch_size, learning_rate=1e-3,
                                  lr_scheduler_type="constant", logging_steps=args.steps, use_cpu=True, bf16=False,
                                  report_to=[], save_strategy="no", seed=repeat, disable_tqdm=True,
                                  gradient_checkpointing=False, ema=ema_kind, **extra)
            ema = AdapterEMA(cfg.ema, cfg.ema_args(), cfg.ema_apply_to) if ema_kind != "none" else None
            base = model.get_base_model()
            had = "forward" in vars(base)
            trainer = ContinualTrainer(model=model, args=cfg, train_dataset=train, processing_class=tokenizer, ema=ema)
            t0 = time.perf_counter()
            trainer.train()
            seconds[name].append(time.perf_counter() - t0)
            if not had:
                vars(base).pop("forward", None)  # undo TRL's fused-head patch, as the pipeline does between stages
            if ema is not None:
                memory[name] = ema.nbytes() / adapter_bytes
            print(f"[overhead] repeat {repeat} {name}: {seconds[name][-1]:.1f} s for {args.steps} steps", flush=True)

    # the EMA's own work per step, timed alone on the adapter's tensors with gradients
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for _, p in params:
        p.grad = torch.randn_like(p) * 1e-3
    ema = AdapterEMA("dynamic")
    ema.update(params)
    t0 = time.perf_counter()
    for _ in range(20):
        with torch.no_grad():
            for _, p in params:
                p.add_(p.grad, alpha=-1e-3)
        ema.update(params)
    update_ms = (time.perf_counter() - t0) / 20 * 1000

    median = {k: statistics.median(v) for k, v in seconds.items()}
    result = {
        "model": args.model, "task": args.task, "steps": args.steps, "batch_size": args.batch_size,
        "lora_rank": args.rank, "adapter_params": sum(t.numel() for t in initial.values()),
        "adapter_bytes": adapter_bytes, "seconds": seconds, "median_seconds": median,
        "time_ratio_vs_seq_lora": {k: median[k] / median["seq_lora"] for k in median},
        "ema_memory_vs_adapter": memory, "ema_update_ms_per_step": update_ms,
        "seconds_per_step_seq_lora": median["seq_lora"] / args.steps,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("time_ratio_vs_seq_lora", "ema_memory_vs_adapter",
                                              "ema_update_ms_per_step", "seconds_per_step_seq_lora")}, indent=1))


if __name__ == "__main__":
    main()
