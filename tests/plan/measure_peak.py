"""Peak memory of real training steps on CPU, for tests/plan/test_plan.py: a Llama model built from CONFIG_DIR's
config (float32), AdamW, ROWS x SEQ tokens a micro-batch, STEPS steps (from the second on the optimizer state lives
through the backward, as in a long run). Prints the peak resident memory above the start, in bytes, as JSON.

    MALLOC_MMAP_THRESHOLD_=65536 python tests/plan/measure_peak.py CONFIG_DIR ROWS SEQ [--lora R] [--checkpointing]
        [--fused PROMPT]

--fused PROMPT: the loss is TRL's fused LM head (what posttrain's GRPO, DPO and SFT trainers run), log-probs and
entropies of the positions after the first PROMPT of each row, as a GRPO step scores its completions; without it,
transformers' own causal-LM loss over every position (the full float32 logits).

(a fixed mmap threshold: every large tensor is mapped and unmapped, so the resident peak is the live tensors' peak)
"""

import json
import resource
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def hwm() -> int:
    """This process's resident high-water mark (VmHWM). Not ru_maxrss: Linux keeps that across fork and exec, so a
    child of a large process (pytest) reports its parent's size."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def main() -> None:
    config_dir, rows, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    lora = int(sys.argv[sys.argv.index("--lora") + 1]) if "--lora" in sys.argv else 0
    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = AutoConfig.from_pretrained(config_dir)
    ids = torch.randint(0, config.vocab_size, (rows, seq))
    fused = "--fused" in sys.argv
    if fused:  # imported before the start mark: only the training's memory counts
        from trl.trainer.utils import add_fused_lm_head

        from posttrain.trainers.fused_head import compact_lm_head_on_cpu
    start = rss()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if "--checkpointing" in sys.argv:
        model.gradient_checkpointing_enable()
    if fused:  # before PEFT wraps the model, as the trainers add it
        add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora, target_modules="all-linear"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=False)
    prompt = int(sys.argv[sys.argv.index("--fused") + 1]) if fused else None
    labels = ids.clone()
    if prompt is not None:
        labels[:, :prompt] = -100
    for _ in range(3):
        if prompt is None:
            loss = model(input_ids=ids, labels=labels).loss
        else:
            with compact_lm_head_on_cpu(ids.device):
                out = model(input_ids=ids, labels=labels, fused_lm_head=True)
            loss = -(out.log_probs.sum() + 0.01 * out.entropy.sum()) / (labels != -100).sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = hwm()
    print(json.dumps({"peak_above_start": peak - start}))


if __name__ == "__main__":
    main()
