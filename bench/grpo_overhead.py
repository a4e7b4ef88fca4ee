"""Step-time overhead of posttrain's GRPO trainers against TRL's plain GRPOTrainer: the base `grpo` (entropy and
group tracking only, target <= 1.05) and the entropy-control trainers (STEER, EPO, DCPO, BNPO).

All trainers run in this one process on the same model, data, batch and seed, in alternating rounds so that
machine noise hits them alike; the report is each method's median step time over TRL's (targets: <= 1.10 for
STEER, EPO and BNPO, <= 1.30 for DCPO, which redoes the LM-head projection at a second temperature).

    python bench/grpo_overhead.py                                     # tiny-qwen2, about a minute
    python bench/grpo_overhead.py --methods grpo dcpo --steps 8
    python bench/grpo_overhead.py --model smollm2-135m-instruct --steps 4 --max-new-tokens 48 --lora
    python bench/grpo_overhead.py --random-init qwen2.5-0.5b --lora --steps 6 --max-new-tokens 128   # GPU scale

On a GPU (cuda available) the trainers run there in bf16 autocast; `--random-init NAME` builds a randomly
initialised model with the named architecture (no download: Qwen2.5-0.5B / 1.5B shapes, tiny-qwen2's tokenizer)
and rewards are then random 0/1 (seeded), so advantages are non-zero as in a real run; a random model's
completions all run to --max-new-tokens, which keeps the step shapes equal across trainers.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time

import trl
from datasets import Dataset
from transformers import TrainerCallback

from posttrain.models import load_model, load_tokenizer, lora_config
from posttrain.trainers import grpo

METHODS = ("grpo", "steer", "epo", "dcpo", "bnpo")  # "grpo": posttrain.trainers.grpo.GRPOTrainer


RANDOM_INIT = {  # Qwen2.5 shapes (config.json of the Hub models), vocabulary included
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
}


def random_init_model(name: str):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = load_tokenizer("tiny-qwen2")
    config = Qwen2Config(**RANDOM_INIT[name], max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-6,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).to(torch.bfloat16 if torch.cuda.is_available() else torch.float32)


def random_reward(prompts, completions, **kwargs):
    import random

    rng = random.Random(len(prompts) * 7919 + sum(len(str(c)) for c in completions))
    return [float(rng.random() < 0.5) for _ in completions]


def accuracy(prompts, completions, answer, **kwargs):
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [1.0 if (n := re.findall(r"-?\d+", t)) and n[-1] == a else 0.0 for t, a in zip(texts, answer)]


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times: list[float] = []
        self._t0 = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._t0)


def run(trainer_cls, config_cls, args, out_dir) -> list[float]:
    rows = [{"prompt": [{"role": "user", "content": f"What is {a} + {b}? Put the final answer in \\boxed{{}}."}],
             "answer": str(a + b)} for a in range(1, 21) for b in range(1, 21)]
    import torch

    gpu = torch.cuda.is_available()
    config = config_cls(output_dir=out_dir, max_steps=args.steps, per_device_train_batch_size=2 * args.group,
                        num_generations=args.group, max_completion_length=args.max_new_tokens, learning_rate=2e-4,
                        loss_type="dapo", beta=0.0, logging_steps=1, use_cpu=not gpu, bf16=gpu, report_to=[],
                        save_strategy="no", seed=0, disable_tqdm=True)
    timer = StepTimer()
    if args.random_init:
        model, tokenizer, rewards = random_init_model(args.random_init), load_tokenizer("tiny-qwen2"), [random_reward]
    else:
        model, tokenizer, rewards = load_model(args.model), load_tokenizer(args.model), [accuracy]
    trainer = trainer_cls(model=model, reward_funcs=rewards, args=config,
                          train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                          peft_config=lora_config() if args.lora else None, callbacks=[timer])
    trainer.train()
    return timer.times[1:]  # the first step pays one-off warm-up costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-qwen2")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of (TRL, each method)")
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--random-init", choices=sorted(RANDOM_INIT),
                        help="a random model of this shape instead of --model")
    args = parser.parse_args()
    classes = {"trl": (trl.GRPOTrainer, trl.GRPOConfig)}
    classes.update({m: (getattr(grpo, f"{m.upper()}Trainer"), getattr(grpo, f"{m.upper()}Config"))
                    for m in args.methods})
    times: dict[str, list[float]] = {k: [] for k in classes}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for name, (trainer_cls, config_cls) in classes.items():
                times[name] += run(trainer_cls, config_cls, args, f"{tmp}/{name}")
    med = {k: statistics.median(v) for k, v in times.items()}
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {"model": args.random_init or args.model, "device": device, "lora": args.lora,
              "steps_timed": len(times["trl"]),
              "trl_median_step_s": round(med["trl"], 4),
              **{f"{m}_median_step_s": round(med[m], 4) for m in args.methods},
              **{f"{m}_ratio": round(med[m] / med["trl"], 3) for m in args.methods}}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
