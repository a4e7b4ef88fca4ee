"""Step-time overhead of posttrain's DPOShiftTrainer against TRL's DPOTrainer (target <= 1.02).

On the CPU, posttrain's DPO trainers score only the response positions with TRL's fused LM head
(`compact_lm_head_on_cpu`; `bench/dpo_step_time.py` measures what that saves); TRL's trainer runs under the same
switch here, so the ratio is the cost of DPO-Shift itself. On a GPU the switch changes nothing.

Both trainers run in this one process on the same model, pairs, batch, seed and settings, in alternating rounds
(TRL, DPO-Shift, DPO-Shift, TRL, ...) so that machine noise hits them alike; each round is a fresh trainer
training `--steps` optimizer steps, the first of which (one-off warm-up, and DPO-Shift's one-time check against
TRL's logged values) is not timed. The report is the ratio of the median step times, with the ratio of the
per-round medians' min and max as a spread.

    PYTHONPATH=. python bench/dpo_shift_overhead.py                       # tiny-qwen2, about a minute
    PYTHONPATH=. python bench/dpo_shift_overhead.py --model smollm2-135m-instruct --lora --steps 8 --rounds 4 \\
        --pairs ~/.cache/posttrain/pairs/arithmetic-train-XXXX.jsonl      # the study's pairs (bench/dpo_shift_study.py)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile

import trl
from grpo_overhead import StepTimer  # bench/ is sys.path[0] when this file runs as a script

from posttrain.data.preferences import PreferenceSource, load_preferences
from posttrain.models import load_model, load_tokenizer, lora_config
from posttrain.trainers.dpo import DPOShiftConfig, DPOShiftTrainer
from posttrain.trainers.fused_head import compact_lm_head_on_cpu


def synthetic_pairs(n: int = 64):
    from datasets import Dataset

    return Dataset.from_list([
        {"prompt": [{"role": "user", "content": f"What is {a} + {b}? Put the final answer in \\boxed{{}}."}],
         "chosen": [{"role": "assistant", "content": f"{a} + {b} = {a + b}, so the answer is \\boxed{{{a + b}}}."}],
         "rejected": [{"role": "assistant", "content": f"Adding them gives {a + b + 1 + b % 3}."}]}
        for a, b in ((i % 17 + 1, i // 17 + 3) for i in range(n))])


def run(name: str, args, dataset, out_dir: str) -> list[float]:
    import torch

    gpu = torch.cuda.is_available()
    common = dict(output_dir=out_dir, max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=2e-4,
                  beta=0.1, max_length=256, logging_steps=1, use_cpu=not gpu, bf16=gpu, report_to=[],
                  save_strategy="no", seed=0, disable_tqdm=True, gradient_checkpointing=False)
    trainer_cls, config = ((trl.DPOTrainer, trl.DPOConfig(**common)) if name == "trl"
                           else (DPOShiftTrainer, DPOShiftConfig(**common, dpo_shift_f=0.95)))
    timer = StepTimer()
    with compact_lm_head_on_cpu(torch.device("cuda" if gpu else "cpu")):  # as posttrain's DPO trainers score
        trainer = trainer_cls(model=load_model(args.model), args=config, train_dataset=dataset,
                              processing_class=load_tokenizer(args.model),
                              peft_config=lora_config() if args.lora else None, callbacks=[timer])
        trainer.train()
    return timer.times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-qwen2")
    parser.add_argument("--pairs", help="a preference-pair JSONL (default: 64 synthetic arithmetic pairs)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=4, help="rounds; the order alternates between them")
    parser.add_argument("--batch", type=int, default=8, help="pairs per step")
    parser.add_argument("--lora", action="store_true")
    args = parser.parse_args()
    dataset = load_preferences(PreferenceSource(path=args.pairs)) if args.pairs else synthetic_pairs()
    times: dict[str, list[float]] = {"trl": [], "dpo_shift": []}
    per_round: dict[str, list[float]] = {"trl": [], "dpo_shift": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name in (("trl", "dpo_shift") if r % 2 == 0 else ("dpo_shift", "trl")):
                t = run(name, args, dataset, f"{tmp}/{name}{r}")
                times[name] += t
                per_round[name].append(statistics.median(t))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = [s / t for s, t in zip(per_round["dpo_shift"], per_round["trl"])]
    import torch

    result = {"model": args.model, "lora": args.lora, "pairs_per_step": args.batch,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "steps_timed_per_trainer": len(times["trl"]), "trl_median_step_s": round(med["trl"], 4),
              "dpo_shift_median_step_s": round(med["dpo_shift"], 4),
              "ratio": round(med["dpo_shift"] / med["trl"], 4),
              "per_round_ratio_min": round(min(ratios), 4), "per_round_ratio_max": round(max(ratios), 4)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
