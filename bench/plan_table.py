"""The planner's table of docs/scaling.md: memory per GPU for Qwen2.5 0.5B, 1.5B and 7B (their published
architectures, written as local configs so that it runs offline) on recipes/grpo/steer_gpu.yaml's shapes (
completions of up to 1024 tokens, 8 per GPU a micro-batch, gradient checkpointing, bf16), full fine-tuning and LoRA
(r 64, all linear layers), colocated vLLM at 0.4 of an 80 GB GPU or not, on 1 and 8 GPUs.

    PYTHONPATH=. python bench/plan_table.py > outputs/bench/plan_table.md
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from posttrain.plan import GB, estimate, model_shape, plan_inputs_from_recipe
from posttrain.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
SHAPE = ["trainer.per_device_train_batch_size=8", "trainer.gradient_accumulation_steps=16"]  # same global batch
QWEN25 = {  # hidden, layers, heads, kv heads, intermediate, vocab, tied embeddings (the models' config.json)
    "Qwen2.5-0.5B": (896, 24, 14, 2, 4864, 151936, True),
    "Qwen2.5-1.5B": (1536, 28, 12, 2, 8960, 151936, True),
    "Qwen2.5-7B": (3584, 28, 28, 4, 18944, 152064, False),
}


def main() -> None:
    from transformers import Qwen2Config

    print("| model | setup | GPUs | strategy | weights | grads | optim | activ. | vLLM | total GB/GPU | fits 80 GB |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (h, layers, heads, kv, inter, vocab, tied) in QWEN25.items():
            path = Path(tmp) / name
            Qwen2Config(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                        intermediate_size=inter, vocab_size=vocab, tie_word_embeddings=tied).save_pretrained(path)
            for setup, overrides in (("full", []), ("LoRA r64", ["model.peft={r: 64, alpha: 128}"])):
                recipe = load_recipe(REPO / "recipes/grpo/steer_gpu.yaml",
                                     [f"model.name_or_path={path}", *SHAPE, *overrides])
                peft = recipe.model.peft
                shape = model_shape(str(path), peft.r if peft else None, peft.target_modules if peft else None)
                for vllm in (True, False):
                    for gpus in (1, 8):
                        inp = plan_inputs_from_recipe(recipe, gpus, 80.0, 1.5)
                        if not vllm:
                            inp.vllm_share, inp.kv_rows = None, 0
                        rows = estimate(shape, inp)
                        picked = [rows[0]] if gpus == 1 else [rows[0], rows[3]]  # DDP and ZeRO-3
                        for s in picked:
                            print(f"| {name} | {setup}{', colocated vLLM 0.4' if vllm else ''} | {gpus} | {s.name} | "
                                  + " | ".join(f"{x / GB:.1f}" for x in (s.weights, s.gradients, s.optimizer,
                                                                         s.activations, s.generation, s.total))
                                  + f" | {'yes' if s.fits else 'no'} |")


if __name__ == "__main__":
    main()
