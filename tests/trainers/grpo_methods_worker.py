"""Worker for test_grpo_methods_multiproc.py: trains a method on a tiny model with a DETERMINISTIC rollout, so
that one process with a global batch of 16 and two processes with 8 each see exactly the same completions.
Plain SGD, so that float-rounding differences of the gradients are not blown up by Adam's g / sqrt(v) on
near-zero gradient entries.

    torchrun --nproc_per_node 2 tests/trainers/grpo_methods_worker.py METHOD OUT_DIR PER_DEVICE_BATCH
"""

import re
import sys
from collections import defaultdict

import torch
from datasets import Dataset

from posttrain.models import load_model, load_tokenizer
from posttrain.trainers import grpo


def reward(prompts, completions, **kwargs):
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [1.0 if re.search(r"\d", t) else 0.0 for t in texts]


reward.__name__ = "accuracy"


def make_rollout(tokenizer):
    def rollout(prompts, trainer):
        seen: dict[str, int] = defaultdict(int)
        prompt_ids, completion_ids = [], []
        for p in prompts:
            key = p[-1]["content"]
            k, seen[key] = seen[key], seen[key] + 1
            a, b = map(int, re.findall(r"\d+", key))
            correct = k < 1 + (a + b) % 7  # 1..7 of 8 correct, varying by prompt: a non-degenerate Beta fit
            text = f"{a + b} apples and {k} more" if correct else f"many apples and {'more ' * (k % 3)}"
            prompt_ids.append(tokenizer.apply_chat_template(p, tokenize=True, add_generation_prompt=True, return_dict=False))
            completion_ids.append(tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
        prompt_ids = [list(x["input_ids"]) if isinstance(x, dict) else list(x) for x in prompt_ids]
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}

    return rollout


def main(method: str, out: str, per_device: int) -> None:
    trainer_cls, config_cls = getattr(grpo, f"{method.upper()}Trainer"), getattr(grpo, f"{method.upper()}Config")
    rows = [{"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}], "answer": str(a + b)}
            for a in range(6) for b in range(6)]
    tokenizer = load_tokenizer("tiny-qwen2")
    config = config_cls(output_dir=out, max_steps=2, per_device_train_batch_size=per_device, num_generations=8,
                        max_completion_length=16, logging_steps=1, use_cpu=True, bf16=False, report_to=[],
                        save_strategy="no", seed=0, learning_rate=1.0, optim="sgd", disable_tqdm=True)
    trainer = trainer_cls(model=load_model("tiny-qwen2"), reward_funcs=[reward], args=config,
                          train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                          rollout_func=make_rollout(tokenizer))
    trainer.train()
    trainer.save_state()
    if trainer.accelerator.is_main_process:
        torch.save({n: p.detach().cpu() for n, p in trainer.model.named_parameters()}, f"{out}/weights.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
