"""The tiny GRPO setting the trainer tests share: tiny-qwen2, 36 addition prompts, 2 prompts x 4 completions of
12 tokens per step on CPU, and a reward a random tiny model earns sometimes."""

import re

from datasets import Dataset


def digit_reward(prompts, completions, **kwargs):
    """A quarter point per digit in the completion, capped at 1."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [min(len(re.findall(r"\d", t)) / 4, 1.0) for t in texts]


digit_reward.__name__ = "accuracy"  # the base trainer's group statistics read the `accuracy` reward


def dataset() -> Dataset:
    return Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}], "answer": str(a + b)}
                              for a in range(6) for b in range(6)])


def config_kwargs(out, **kw) -> dict:
    base = dict(output_dir=str(out), max_steps=2, per_device_train_batch_size=8, num_generations=4,
                max_completion_length=12, logging_steps=1, use_cpu=True, bf16=False, report_to=[],
                save_strategy="no", seed=0, learning_rate=5e-3, disable_tqdm=True)
    base.update(kw)
    return base
