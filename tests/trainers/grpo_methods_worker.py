"""Worker for the multi-process GRPO tests (test_grpo_methods_multiproc.py, tests/rollout/test_vllm_*): trains GRPO
and every entropy-control method on a tiny model. By default with a DETERMINISTIC rollout, so that one process and
two processes see exactly the same completions. Plain SGD, so that float-rounding differences of the gradients are
not blown up by Adam's g / sqrt(v) on near-zero gradient entries.

Each SPEC is NAME:METHOD:LORA:PER_DEVICE:GRAD_ACCUM[:generate|:server|:colocate] (one generation per micro-batch),
trained one after the other in the same process group (one launch for all of them: startup is most of a tiny run)
into OUT_DIR/NAME:

    torchrun --nproc_per_node 2 tests/trainers/grpo_methods_worker.py OUT_DIR grpo:grpo:0:8:1 steer:steer:1:8:1

- `generate` samples the completions with the trainer's own generation instead, from a model whose end-of-sequence
  logit is raised (completions of 1-16 tokens, so ranks finish decoding after different numbers of steps); each
  rank writes its completions' lengths per generation call to OUT_DIR/NAME/lengths_rank<r>.json.
- `server` generates through the vLLM server at $POSTTRAIN_TEST_VLLM_URL (posttrain's VLLMServerEngine, which syncs
  the trained weights to it before each generation); `colocate` through an in-process vLLM engine on every rank
  (its seed and vLLM executor go into dist_rank<r>.json). Both train 4 steps on the `parity` reward.

The trained weights are saved whole (all-gathered when the launch shards them, e.g. under
tests/distributed/fsdp_cpu.py); each rank writes whether they were sharded and how many elements it held to
OUT_DIR/NAME/dist_rank<r>.json. `launch`, `read` and `rank_files` at the end are the tests' side.
"""

import json
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig

from posttrain.distributed import full_state_dict, needs_gather
from posttrain.models import load_model, load_tokenizer
from posttrain.trainers import grpo

# method -> (trainer class, config class, config fields): the four named trainers and the options on the base
METHODS = {
    "grpo": (grpo.GRPOTrainer, grpo.GRPOConfig, {}),
    # the per-micro-batch methods are compared against gradient accumulation: loss_type grpo (a mean over each
    # micro-batch's sequences) weighs micro-batches alike there, as DDP weighs processes; dapo's token normaliser
    # would be one micro-batch's tokens in one process and the gathered batch's in two
    "steer": (grpo.STEERTrainer, grpo.STEERConfig, {"loss_type": "grpo"}),
    "steer_global": (grpo.STEERTrainer, grpo.STEERConfig, {"steer_max_scope": "global"}),
    "epo": (grpo.EPOTrainer, grpo.EPOConfig, {"epo_lambda": 0.05}),  # large enough to move the weights
    "dcpo": (grpo.DCPOTrainer, grpo.DCPOConfig, {}),
    "bnpo": (grpo.BNPOTrainer, grpo.BNPOConfig, {}),
    "qae": (grpo.EntropyControlTrainer, grpo.EntropyControlConfig, {"advantage": "qae"}),
    # clip_ratio 1: every eligible token is dropped, so the draw among them (torch's RNG) does not matter
    "clip_cov": (grpo.EntropyControlTrainer, grpo.EntropyControlConfig,
                 {"token_weight": "clip_cov", "clip_cov_ratio": 1.0, "clip_cov_lb": 0.0, "clip_cov_ub": 1e9,
                  "loss_type": "grpo"}),
}


def reward(prompts, completions, **kwargs):
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [1.0 if re.search(r"\d", t) else 0.0 for t in texts]


reward.__name__ = "accuracy"


def parity(prompts, completions, **kwargs):
    """1 for an even number of characters: varies within nearly every group of sampled completions, so that every
    step of the vLLM (`server`, `colocate`) runs moves the weights the next sync must carry."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [float(len(t) % 2 == 0) for t in texts]


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


EOS_BIAS = 7.0  # added to the end-of-sequence logit of the `generate` model: most completions end within 4 tokens


def eos_biased(model, eos: int):
    def raise_eos(module, inputs, logits):
        logits = logits.clone()
        logits[..., eos] += EOS_BIAS
        return logits

    model.lm_head.register_forward_hook(raise_eos)
    return model


def record_lengths(trainer, path: str) -> None:
    """Wrap the trainer's generation: each call appends this rank's completion lengths to `path`."""
    calls, generate = [], trainer._generate_single_turn

    def recorded(*args, **kwargs):
        out = generate(*args, **kwargs)
        calls.append([len(ids) for ids in out[0]])
        with open(path, "w") as f:
            json.dump(calls, f)
        return out

    trainer._generate_single_turn = recorded


def _local_numel(p) -> int:
    """The elements of a parameter this rank holds: its DTensor shard (FSDP2), its ZeRO-3 partition, or all."""
    if hasattr(p, "to_local"):
        return p.to_local().numel()
    return p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()


def _cpu_offloaded(model) -> list[bool]:
    """Whether each FSDP2 parameter group in the model (deduplicated) offloads to the CPU (fsdp2_offload.yaml)."""
    from torch.distributed.fsdp import CPUOffloadPolicy

    groups = [m._get_fsdp_state()._fsdp_param_group for m in model.modules() if hasattr(m, "_get_fsdp_state")]
    return sorted({isinstance(g.offload_policy, CPUOffloadPolicy) for g in groups if g is not None})


def train(out: str, method: str, lora: bool, per_device: int, grad_accum: int, option: str | None = None) -> None:
    trainer_cls, config_cls, fields = METHODS[method]
    rows = [{"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}], "answer": str(a + b)}
            for a in range(6) for b in range(6)]
    tokenizer = load_tokenizer("tiny-qwen2")
    vllm = option in ("server", "colocate")
    config = config_cls(output_dir=out, max_steps=4 if vllm else 2, num_generations=8,
                        per_device_train_batch_size=per_device, gradient_accumulation_steps=grad_accum,
                        steps_per_generation=1, max_completion_length=16,
                        logging_steps=1, use_cpu=True, bf16=False, report_to=[], save_strategy="no", seed=0,
                        learning_rate=1.0 if not lora else 5.0, optim="sgd", disable_tqdm=True, **fields)
    peft_config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0) if lora else None
    torch.manual_seed(0)  # the same LoRA initialisation in every process and launch
    model = load_model("tiny-qwen2")
    if option == "generate":
        model = eos_biased(model, tokenizer.eos_token_id)
    rollout = {"rollout_func": make_rollout(tokenizer)} if option is None else {}
    if option == "server":
        from posttrain.rollout.vllm import VLLMServerEngine

        rollout = {"rollout_engine": VLLMServerEngine(os.environ["POSTTRAIN_TEST_VLLM_URL"], tokenizer)}
    elif option == "colocate":
        from posttrain.rollout import make_engine

        rollout = {"rollout_engine": make_engine("vllm", "tiny-qwen2", tokenizer, dtype="float32", seed=0,
                                                 enable_lora=lora, max_lora_rank=8, cpu_kv_cache_gb=1)}
    trainer = trainer_cls(model=model, reward_funcs=[parity if vllm else reward], args=config,
                          train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer, peft_config=peft_config, **rollout)
    if option == "generate":
        record_lengths(trainer, f"{out}/lengths_rank{trainer.accelerator.process_index}.json")
    trainer.train()
    trainer.save_state()
    with open(f"{out}/dist_rank{trainer.accelerator.process_index}.json", "w") as f:
        engine = getattr(trainer, "rollout_engine", None)
        json.dump({"distributed_type": str(trainer.accelerator.distributed_type), "sharded": needs_gather(trainer.model),
                   "parameters": sum(_local_numel(p) for p in trainer.model.parameters()),
                   "cpu_offload": _cpu_offloaded(trainer.model),
                   **({"engine_seed": engine.seed, "executor": str(engine.llm.llm_engine.vllm_config.parallel_config
                                                                   .distributed_executor_backend)}
                      if option == "colocate" else {})}, f)
    trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    with full_state_dict(trainer.model, select=lambda m: dict(m.named_parameters())) as params:
        weights = {n: p.detach().cpu().clone() for n, p in params.items() if n in trained}
    if trainer.accelerator.is_main_process:
        torch.save(weights, f"{out}/weights.pt")
    trainer.accelerator.wait_for_everyone()


# --- for the tests: launch the worker, read what it wrote ---

def launch(out: Path, nproc: int, specs: list[str], port: int, config: str | None = None, **env: str) -> None:
    """The SPECs in one launch of this worker: torchrun, or accelerate launch with launch/accelerate/<config>.yaml
    (tests/distributed/launchers.py); `env` adds to the environment."""
    from tests.distributed import launchers

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1", **env}
    prefix = launchers.accelerate(config, nproc, port) if config else launchers.torchrun(nproc, port)
    cmd = [*prefix, __file__, str(out), *specs]
    proc = subprocess.run(cmd, cwd=launchers.REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


def read(folder: Path) -> tuple[list[dict], dict]:
    """A trained spec's logged steps and its trained weights."""
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    return [h for h in history if "loss" in h], torch.load(folder / "weights.pt")


def rank_files(folder: Path) -> list[dict]:
    """What each of two ranks wrote of its launch (dist_rank<r>.json)."""
    return [json.loads((folder / f"dist_rank{r}.json").read_text()) for r in range(2)]


def main(out: str, specs: list[str]) -> None:
    for spec in specs:
        name, method, lora, per_device, grad_accum, *option = spec.split(":", 5)
        assert option in ([], ["generate"], ["server"], ["colocate"]), spec
        train(f"{out}/{name}", method, lora == "1", int(per_device), int(grad_accum), *option)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
