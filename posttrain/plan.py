"""`posttrain plan`: memory per GPU of a recipe under DDP, FSDP2, ZeRO-2 and ZeRO-3, before renting the GPUs.

The model's shape comes from its config alone (a local folder, a shipped model name, the Hub, or `--params`): the
model is built on PyTorch's meta device (no memory, no weights), so the parameter count and every Linear's shape
are exact for any architecture transformers knows, and LoRA's trainable parameters are counted from the targeted
Linears (r x (in + out) each). The estimate per GPU, in bytes:

    weights      P x b_w                          (b_w: the recipe's dtype; / N under FSDP and ZeRO-3)
    gradients    P_t x b_g                        (trainable parameters; / N under FSDP, ZeRO-2 and ZeRO-3)
    optimizer    P_t x s                          (AdamW under torch: 2 states in the parameter's dtype; DeepSpeed
                                                   keeps fp32 master weights + 2 fp32 states, 12 bytes; SGD: none)
    activations  tokens x L x a_layer + logits    (what autograd keeps for the backward, per micro-batch)
    generation   the colocated vLLM share of the GPU (gpu_memory_utilization), or the HF engine's KV cache
    reference    P_base x b_w                     (a frozen copy of the model: DPO and GRPO with a KL term under full
                                                   fine-tuning, as TRL loads it; / N under FSDP and ZeRO-3)

with P all parameters, P_t the trainable ones (LoRA adapters are float32: PEFT upcasts them), tokens = rows x
sequence length of one micro-batch (GRPO: prompt + completion; DPO and reward models: chosen and rejected), and per
layer and token a_layer = b_a (8h + 5 kv + 4i) + 24h for a Llama-style decoder (hidden h, key-value width kv, MLP width
i: the projections' outputs, the rotary copies, GQA's repeated keys and values, the MLP's four i-wide tensors, and
three float32 tensors per RMSNorm), or b_a h (the layer's input only) with gradient checkpointing plus one layer
recomputed. The LM head, over the S scored tokens:
- the model's own loss (`lm_head="logits"`): 2 x S x V x 4 (float32 logits and their gradient);
- TRL's fused LM head (`"fused"`: posttrain's GRPO, DPO and SFT trainers, which never build the logits):
  S h (b_a + 4) (the scored hidden states, saved, and their float32 gradient) + one [min(S, 4096), min(V, 32768)]
  tile in b_a bytes (on the CPU, whose torch fallback runs without Triton, 8 float32 temporaries of the tile's size
  beside it) + V h 4 under full fine-tuning (the head's float32 weight gradient).

Checked against a measured peak on CPU (tests/plan/test_plan.py: real training steps of a 30M-parameter Llama, full
and LoRA, with and without gradient checkpointing, 0.90-1.12 of the measured peak; the fused head on five shapes,
0.97-1.13, with the CPU's temporaries; no fitted constant). Not modelled:
the CUDA context and allocator fragmentation (a fixed `--overhead` per GPU, 1.5 GB by default), FSDP's all-gather
buffers (about two layers' weights), and DeepSpeed's communication buckets.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ModelShape", "PlanInputs", "Strategy", "estimate", "model_shape", "plan_recipe", "render_table"]

GB = 1e9
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}
LAUNCH = "launch/accelerate"
LOGIT_COPIES = 2  # float32 logits and their gradient
# TRL's fused LM head (trl/kernels/chunked_logprob.py): projects [4096 tokens, 32768 vocabulary] tiles into one buffer
FUSED_TOKEN_TILE, FUSED_VOCAB_TILE = 4096, 32768
# float32 tile-sized temporaries beside that buffer: none where its Triton kernels fold the tile in place (CUDA, XPU);
# on the CPU its torch fallback (`_backward_tile`) keeps the upcast tile, logits, log-probs, probabilities and the
# gradient live, with up to three temporaries of the update beside them
FUSED_TILE_TEMPORARIES = {"gpu": 0, "cpu": 8}


class PlanError(ValueError):
    """A recipe or model the planner cannot size, with what to pass instead."""


@dataclass
class ModelShape:
    params: int
    layers: int
    hidden: int
    intermediate: int
    kv_width: int
    vocab: int
    lora_params: int = 0  # trainable LoRA parameters for the recipe's rank and targets (0: full fine-tuning)
    source: str = ""


@dataclass
class PlanInputs:
    gpus: int = 1
    gpu_memory_gb: float = 80.0
    dtype_bytes: int = 2
    lora: bool = False
    optimizer: str = "adamw"
    rows: int = 1                 # sequences per micro-batch per device
    seq_len: int = 512            # tokens per sequence
    scored_tokens: int | None = None  # tokens whose logits are computed (default rows x seq_len)
    gradient_checkpointing: bool = False
    lm_head: str = "logits"       # "logits": the model's own loss over full float32 logits; "fused": TRL's fused LM
                                  # head (GRPO, DPO and SFT trainers), which never builds the logits
    device: str = "gpu"           # where the fused head runs: "gpu" (Triton kernels) or "cpu" (its torch fallback)
    vllm_share: float | None = None  # colocated vLLM's gpu_memory_utilization
    kv_rows: int = 0              # HF engine: sequences generated at once (their KV cache), when no vLLM
    reference: bool = False       # the trainer keeps a frozen copy of the model (TRL's ref_model)
    overhead_gb: float = 1.5


@dataclass
class Strategy:
    name: str
    launch: str
    weights: float
    gradients: float
    optimizer: float
    activations: float
    generation: float
    overhead: float
    reference: float = 0.0
    total: float = 0.0
    fits: bool = False
    notes: list[str] = field(default_factory=list)


# --- the model's shape --------------------------------------------------------------------------------------------

def _config(name_or_path: str) -> tuple[Any, str]:
    from transformers import AutoConfig

    from posttrain.models.registry import NAMED_MODELS, resolve_model_path

    if name_or_path in NAMED_MODELS:
        path = resolve_model_path(name_or_path)  # a shipped model: built from its local package on first use
        return AutoConfig.from_pretrained(path), f"{name_or_path} ({path})"
    if Path(name_or_path).is_dir():
        return AutoConfig.from_pretrained(name_or_path), name_or_path
    try:
        return AutoConfig.from_pretrained(name_or_path), f"{name_or_path} (Hub config)"
    except Exception as err:  # noqa: BLE001 - offline, gated, or misspelt: all mean "pass --params"
        raise PlanError(f"model.name_or_path: cannot read the config of {name_or_path!r} ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:200]}); give a local model folder, or --params N (with "
                        "--layers/--hidden for the activation estimate)") from None


def model_shape(name_or_path: str, lora_r: int | None = None, lora_targets: str | list[str] | None = None
                ) -> ModelShape:
    """Exact parameter count and LoRA size of a model, built on the meta device from its config (no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    config, source = _config(name_or_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    text = config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv = (getattr(text, "num_key_value_heads", None) or heads) * head_dim
    lora = 0
    if lora_r:
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and _targeted(name, lora_targets):
                lora += lora_r * (module.in_features + module.out_features)
    return ModelShape(params=params, layers=text.num_hidden_layers, hidden=text.hidden_size,
                      intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size), kv_width=kv,
                      vocab=text.vocab_size, lora_params=lora, source=source)


def _targeted(name: str, targets: str | list[str] | None) -> bool:
    """PEFT's target matching: "all-linear" is every Linear but the output head; a list matches name suffixes."""
    if targets in (None, "all-linear"):
        return not name.endswith("lm_head")
    if isinstance(targets, str):
        import re

        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in targets)


# --- the estimate --------------------------------------------------------------------------------------------------

def _activations(shape: ModelShape, inp: PlanInputs) -> float:
    tokens = inp.rows * inp.seq_len
    b = inp.dtype_bytes
    per_layer = b * (8 * shape.hidden + 5 * shape.kv_width + 4 * shape.intermediate) + 24 * shape.hidden
    if inp.gradient_checkpointing:
        body = tokens * (shape.layers * b * shape.hidden + per_layer)
    else:
        body = tokens * shape.layers * per_layer
    scored = inp.scored_tokens if inp.scored_tokens is not None else tokens
    if inp.lm_head != "fused":
        return body + LOGIT_COPIES * scored * shape.vocab * 4
    return body + _fused_head(shape, inp, scored)


def _fused_head(shape: ModelShape, inp: PlanInputs, scored: int) -> float:
    """TRL's fused LM head at its backward: the scored positions' hidden states (saved) and their float32 gradient,
    the tile buffer (and the CPU fallback's float32 temporaries), and under full fine-tuning the float32 gradient
    of the head's weight that the kernel accumulates before autograd adds it to the parameter's."""
    tile = min(scored, FUSED_TOKEN_TILE) * min(shape.vocab, FUSED_VOCAB_TILE)
    head = scored * shape.hidden * (inp.dtype_bytes + 4)
    head += tile * (inp.dtype_bytes + 4 * FUSED_TILE_TEMPORARIES[inp.device])
    if not inp.lora:
        head += shape.vocab * shape.hidden * 4
    return head


def estimate(shape: ModelShape, inp: PlanInputs) -> list[Strategy]:
    """Bytes per GPU for each strategy that applies at inp.gpus, in the order a user should try them."""
    n = max(1, inp.gpus)
    P = shape.params + (shape.lora_params if inp.lora else 0)
    trainable = shape.lora_params if inp.lora else shape.params
    b_t = 4 if inp.lora else inp.dtype_bytes  # LoRA adapters train in float32
    torch_states = {"adamw": 2 * b_t, "sgd": 0, "adamw_8bit": 2}.get(inp.optimizer, 2 * b_t)
    ds_states = 12 if inp.optimizer != "sgd" else 4  # fp32 master weights (+ 2 fp32 Adam states)
    act = _activations(shape, inp)
    gpu = inp.gpu_memory_gb * GB
    gen = (inp.vllm_share or 0) * gpu
    if not inp.vllm_share and inp.kv_rows:
        gen = 2 * shape.layers * shape.kv_width * inp.dtype_bytes * inp.kv_rows * inp.seq_len
    over = inp.overhead_gb * GB
    W, G = P * inp.dtype_bytes, trainable * b_t
    R = shape.params * inp.dtype_bytes if inp.reference else 0.0  # TRL prepares it like the model, frozen
    gathered_ref = ["+ the reference's whole weights during its forward (TRL shards it as one unit)"] if R else []
    rows = [
        ("single GPU" if n == 1 else "DDP", "single_gpu.yaml" if n == 1 else "multi_gpu.yaml", W, G,
         trainable * torch_states, R, []),
        ("ZeRO-2", "zero2.yaml", W, G / n, trainable * ds_states / n, R, []),  # TRL's reference: ZeRO stage 0
        ("FSDP2", "fsdp2.yaml", W / n, G / n, trainable * torch_states / n, R / n,
         ["+ about 2 layers' gathered weights", *gathered_ref]),
        ("ZeRO-3", "zero3.yaml", W / n, G / n, trainable * ds_states / n, R / n, []),
    ]
    if n == 1:
        rows = rows[:1] + [("FSDP2 + CPU offload", "fsdp2_offload.yaml", W / shape.layers * 2, G / n, 0.0, R,
                            ["weights and optimizer state in CPU memory; much slower", *gathered_ref])]
    out = []
    for name, launch, w, g, o, r, notes in rows:
        s = Strategy(name=name, launch=f"{LAUNCH}/{launch}", weights=w, gradients=g, optimizer=o, activations=act,
                     generation=gen, overhead=over, reference=r, notes=list(notes))
        s.total = w + g + o + act + gen + r + over
        s.fits = s.total <= gpu
        out.append(s)
    return out


# --- from a recipe -------------------------------------------------------------------------------------------------

def plan_inputs_from_recipe(recipe: Any, gpus: int, gpu_memory_gb: float, overhead_gb: float) -> PlanInputs:
    """Batch, sequence lengths, dtype, LoRA, optimizer and generation settings of a recipe, per method kind."""
    from posttrain.methods import get_method
    from posttrain.pipelines import get_pipeline

    t = recipe.trainer
    kind = get_method(recipe.method).kind
    pipeline = get_pipeline(kind)
    rows = int(t.get("per_device_train_batch_size", 8))
    if kind == "grpo":
        r = recipe.rollout
        prompt = int(t.get("max_prompt_length") or 512)
        completion = int(t.get("max_completion_length") or r.max_new_tokens)
        seq, scored = prompt + completion, rows * completion  # TRL scores the completion positions only
    elif kind in ("dpo", "reward"):
        seq = int(t.get("max_length") or 1024)
        rows, scored = 2 * rows, (2 * rows * seq if kind == "dpo" else 0)  # chosen + rejected; a reward head: no logits
    else:
        seq = int(t.get("max_length") or t.get("max_seq_length") or 1024)
        scored = rows * seq
    vllm_share = None
    if kind == "grpo" and recipe.rollout.engine == "vllm":
        options = recipe.rollout.vllm
        if options.get("mode", "colocate") == "colocate":
            from posttrain.pipelines.grpo import COLOCATED_GPU_MEMORY_SHARE

            vllm_share = float(options.get("gpu_memory_utilization", COLOCATED_GPU_MEMORY_SHARE))
    optim = str(t.get("optim", "adamw_torch"))
    optimizer = "sgd" if optim == "sgd" else "adamw_8bit" if "8bit" in optim else "adamw"
    dtype = str(recipe.model.dtype)
    if t.get("bf16") or t.get("fp16"):
        dtype = "bfloat16"
    return PlanInputs(gpus=gpus, gpu_memory_gb=gpu_memory_gb, dtype_bytes=DTYPE_BYTES.get(dtype, 2),
                      lora=recipe.model.peft is not None, optimizer=optimizer, rows=rows, seq_len=seq,
                      scored_tokens=scored, gradient_checkpointing=bool(t.get("gradient_checkpointing", False)),
                      lm_head="fused" if pipeline.fused_lm_head else "logits",
                      vllm_share=vllm_share, kv_rows=rows if kind == "grpo" and vllm_share is None else 0,
                      reference=pipeline.keeps_reference_copy(recipe), overhead_gb=overhead_gb)


def plan_recipe(recipe: Any, *, gpus: int = 1, gpu_memory_gb: float = 80.0, overhead_gb: float = 1.5,
                params: float | None = None, layers: int | None = None, hidden: int | None = None,
                vocab: int | None = None) -> dict[str, Any]:
    """The plan of a loaded recipe: its inputs, the model's shape and one row per strategy."""
    inp = plan_inputs_from_recipe(recipe, gpus, gpu_memory_gb, overhead_gb)
    peft = recipe.model.peft
    if params is not None:
        shape = _shape_from_params(params, layers, hidden, vocab, peft)
    else:
        shape = model_shape(recipe.model.name_or_path, peft.r if peft else None, peft.target_modules if peft else None)
    rows = estimate(shape, inp)
    fit = next((s for s in rows if s.fits), None)
    return {"model": asdict(shape), "inputs": asdict(inp), "strategies": [asdict(s) for s in rows],
            "recommended": None if fit is None else {"strategy": fit.name, "launch": fit.launch}}


def _shape_from_params(params: float, layers: int | None, hidden: int | None, vocab: int | None, peft: Any
                       ) -> ModelShape:
    """A shape from a parameter count alone: the layer and width defaults of a Llama/Qwen-style model of that size
    (hidden ~ sqrt(P / (12 L))) unless given; LoRA on every attention and MLP projection."""
    P = int(params)
    L = layers or max(2, round(4 * math.log2(max(P, 1) / 1e8) + 20))
    h = hidden or int(round(math.sqrt(P / (12 * L)) / 64) * 64) or 64
    i = int(8 / 3 * h)
    lora = 0
    if peft is not None:
        lora = L * peft.r * (4 * 2 * h + 3 * (h + i))  # q, k, v, o (h -> h, approx) and gate, up, down
    return ModelShape(params=P, layers=L, hidden=h, intermediate=i, kv_width=h, vocab=vocab or 151936,
                      lora_params=lora, source=f"--params {P:,} (layers {L}, hidden {h}: estimated)")


def render_table(plan: dict[str, Any]) -> str:
    m, inp = plan["model"], plan["inputs"]
    lines = [f"model: {m['source']}: {m['params'] / 1e9:.3f} B parameters, {m['layers']} layers, hidden "
             f"{m['hidden']}" + (f"; LoRA {m['lora_params'] / 1e6:.2f} M trainable" if inp["lora"] else
                                 "; full fine-tuning"),
             f"per GPU: {inp['rows']} sequences x {inp['seq_len']} tokens, {inp['dtype_bytes']}-byte weights, "
             f"optimizer {inp['optimizer']}, gradient checkpointing {'on' if inp['gradient_checkpointing'] else 'off'}"
             + (f", colocated vLLM {inp['vllm_share']:g} of the GPU" if inp["vllm_share"] else "")
             + (", a frozen reference copy of the model" if inp["reference"] else ""),
             f"{inp['gpus']} GPU(s) of {inp['gpu_memory_gb']:g} GB", "",
             f"{'strategy':<20} {'weights':>8} {'grads':>8} {'optim':>8} {'activ.':>8} {'generation':>10} "
             + (f"{'ref.':>6} " if inp["reference"] else "") + f"{'other':>6} {'total GB':>9}  fits  launch config"]
    for s in plan["strategies"]:
        cells = [s[k] / GB for k in ("weights", "gradients", "optimizer", "activations", "generation", "reference",
                                     "overhead", "total")]
        lines.append(f"{s['name']:<20} {cells[0]:>8.2f} {cells[1]:>8.2f} {cells[2]:>8.2f} {cells[3]:>8.2f} "
                     f"{cells[4]:>10.2f} " + (f"{cells[5]:>6.2f} " if inp["reference"] else "")
                     + f"{cells[6]:>6.2f} {cells[7]:>9.2f}  {'yes' if s['fits'] else 'no ':<4}  "
                     f"{s['launch']}" + (f"  ({'; '.join(s['notes'])})" if s["notes"] else ""))
    rec = plan["recommended"]
    lines += ["", f"recommended: {rec['strategy']}: accelerate launch --config_file {rec['launch']} -m posttrain train "
              "RECIPE" if rec else "nothing fits: more GPUs (--gpus), LoRA (model.peft), gradient checkpointing, "
              "a smaller batch or sequence, or a smaller vLLM share"]
    return "\n".join(lines)


def main(args: Any) -> int:
    from posttrain.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    try:
        plan = plan_recipe(recipe, gpus=args.gpus, gpu_memory_gb=args.gpu_memory, overhead_gb=args.overhead,
                           params=args.params, layers=args.layers, hidden=args.hidden)
    except PlanError as err:
        raise SystemExit(f"posttrain plan: {err}") from None
    print(json.dumps(plan, indent=2) if args.json else render_table(plan))
    return 0
