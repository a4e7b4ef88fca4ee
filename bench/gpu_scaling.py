"""Step time, tokens/s, MFU and peak memory of an entropy-control recipe under accelerate's launch configs, next to
`posttrain plan`'s estimate of the same recipe (docs/scaling.md).

STEER (recipes/grpo/steer_gpu.yaml) trains for a few steps on Qwen2.5-0.5B built from its published config with
random weights (a step's time and memory do not depend on the weights; nothing is downloaded) and the offline tiny
tokenizer, on synthetic addition prompts, generating with the HF engine (the GPU machines here have no vLLM). The
shapes are the planner table's: completions of up to 1024 tokens (random weights never stop early, so every
completion is that long), 8 rows a micro-batch, 16 micro-batches a step, gradient checkpointing, bf16. Each run is
`accelerate launch --config_file launch/accelerate/<config>.yaml -m posttrain train ...`; its figures are the
`perf/` keys of its logs (posttrain/trainers/perf.py): the median over the steps after the first.

    python bench/gpu_scaling.py --out outputs/bench/gpu_scaling     # a GPU machine: single_gpu.yaml, full and LoRA;
                                                                    # with several GPUs also multi_gpu, fsdp2 (zero3
                                                                    # when DeepSpeed is installed)
    python bench/gpu_scaling.py --size tiny --launch none --steps 2 --max-new-tokens 8   # CPU smoke run

Writes OUT/results.json and OUT/table.md (and each run's log and report under OUT/runs/).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from plan_table import QWEN25  # bench/ is this script's folder: the planner table's published Qwen2.5 configs

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "grpo" / "steer_gpu.yaml"
# hidden, layers, heads, kv heads, intermediate, vocab, tied embeddings; "tiny" keeps the real vocabulary, so the LM
# head's share of a step stays realistic
SIZES = {**{name.removeprefix("Qwen2.5-"): shape for name, shape in QWEN25.items()},
         "tiny": (64, 2, 4, 2, 128, 151936, True)}
SETUPS = {"full": [], "lora": ["model.peft={r: 64, alpha: 128}"]}


def build_model(size: str, directory: Path, dtype: str) -> Path:
    """Qwen2.5 of `size` with random weights and the offline tiny tokenizer, saved as a model folder."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from posttrain.models.tiny import build_tiny_tokenizer

    if (directory / "config.json").is_file():
        return directory
    h, layers, heads, kv, inter, vocab, tied = SIZES[size]
    tok = build_tiny_tokenizer()
    config = Qwen2Config(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                         intermediate_size=inter, vocab_size=vocab, tie_word_embeddings=tied,
                         max_position_embeddings=32768, rope_theta=1e6, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def launch_configs(gpus: int) -> list[str]:
    """The launch configs this machine can run: single_gpu on one GPU; multi_gpu and fsdp2 (and zero3 with DeepSpeed)
    on several."""
    if gpus <= 1:
        return ["single_gpu"]
    configs = ["multi_gpu", "fsdp2"]
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        print("[gpu_scaling] DeepSpeed is not installed: zero3.yaml skipped", flush=True)
    else:
        configs.append("zero3")
    return configs


def overrides(model_dir: Path, setup: str, args: argparse.Namespace, gpus: int, out: Path) -> list[str]:
    accumulation = max(1, args.accumulation // max(gpus, 1))  # the same global batch on every GPU count
    o = [f"model.name_or_path={model_dir}", "rollout.engine=hf", "data.train={task: arithmetic, split: train}",
         "data.eval=null", "eval.before=false", "eval.after=false", f"trainer.max_steps={args.steps}",
         "trainer.save_strategy='no'", "trainer.logging_steps=1", f"trainer.per_device_train_batch_size={args.rows}",
         f"trainer.gradient_accumulation_steps={accumulation}", f"rollout.max_new_tokens={args.max_new_tokens}",
         f"output_dir={out}", *SETUPS[setup]]
    if args.dtype != "bfloat16":
        o += [f"model.dtype={args.dtype}", "trainer.bf16=false"]
    return o


def planned(recipe_overrides: list[str], launch: str, gpus: int, gpu_memory_gb: float) -> dict[str, float]:
    """`posttrain plan`'s estimate (GB) for the strategy of this launch config."""
    from posttrain.plan import GB, plan_recipe
    from posttrain.recipe import load_recipe

    plan = plan_recipe(load_recipe(RECIPE, recipe_overrides), gpus=max(gpus, 1), gpu_memory_gb=gpu_memory_gb)
    wanted = {"single_gpu": "single GPU", "none": "single GPU", "multi_gpu": "DDP", "fsdp2": "FSDP2",
              "zero3": "ZeRO-3"}[launch]
    row = next(s for s in plan["strategies"] if s["name"] == wanted)
    return {k: row[k] / GB for k in ("weights", "gradients", "optimizer", "activations", "generation", "overhead",
                                     "total")}


def run_one(launch: str, setup: str, model_dir: Path, args: argparse.Namespace, gpus: int) -> dict:
    out = args.out / "runs" / f"{launch}_{setup}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    o = overrides(model_dir, setup, args, gpus, out)
    train = ["-m", "posttrain", "train", str(RECIPE), *o]
    if launch == "none":
        cmd = [sys.executable, *train]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "launch" / "accelerate" / f"{launch}.yaml"), "--num_processes", str(max(gpus, 1)), *train]
    print(f"[gpu_scaling] {launch} / {setup}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with open(out / "train.log", "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                  p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)})
    result = {"launch": launch, "setup": setup, "gpus": gpus, "returncode": proc.returncode,
              "wall_seconds": time.perf_counter() - t0}
    if proc.returncode != 0:
        result["log_tail"] = (out / "train.log").read_text()[-3000:]
        print(f"[gpu_scaling] {launch} / {setup} failed ({proc.returncode}):\n{result['log_tail']}", flush=True)
        return result
    summary = json.loads((out / "report" / "summary.json").read_text())
    result["perf"] = summary.get("perf", {})
    result["steps"] = [{k: v for k, v in h.items() if k.startswith("perf/") or k in ("step", "num_tokens")}
                       for h in map(json.loads, (out / "report" / "metrics.jsonl").read_text().splitlines())
                       if "perf/step_seconds" in h]
    result["plan_gb"] = planned(o, launch, gpus, args.gpu_memory)
    return result


def table(results: list[dict]) -> str:
    lines = ["| launch config | setup | GPUs | step (s) | tokens/s | MFU | peak allocated GB | peak reserved GB | "
             "plan GB (less overhead) | plan / allocated |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if r["returncode"] != 0:
            lines.append(f"| {r['launch']} | {r['setup']} | {r['gpus']} | failed ({r['returncode']}) | | | | | | |")
            continue
        p, plan = r["perf"], r["plan_gb"]
        body = plan["total"] - plan["overhead"]
        mfu = f"{100 * p['median_mfu']:.1f}%" if "median_mfu" in p else "n/a"
        reserved = f"{p['peak_reserved_gb']:.1f}" if "peak_reserved_gb" in p else "n/a"
        lines.append(f"| {r['launch']} | {r['setup']} | {r['gpus']} | {p['median_step_seconds']:.2f} | "
                     f"{p.get('median_tokens_per_second', 0):,.0f} | {mfu} | {p['peak_memory_gb']:.1f} | {reserved} | "
                     f"{body:.1f} | {body / p['peak_memory_gb']:.2f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="0.5B")
    ap.add_argument("--setups", nargs="+", choices=sorted(SETUPS), default=["full", "lora"])
    ap.add_argument("--launch", nargs="+", default=None,
                    help="launch configs (launch/accelerate/<name>.yaml), or none (no accelerate launch); default: "
                         "what the machine's GPUs allow")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rows", type=int, default=8, help="per_device_train_batch_size")
    ap.add_argument("--accumulation", type=int, default=16, help="gradient_accumulation_steps on one GPU")
    ap.add_argument("--max-new-tokens", type=int, default=1024)
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on the CPU")
    ap.add_argument("--gpu-memory", type=float, default=None, help="GB a GPU (the plan's budget; default: measured)")
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "bench" / "gpu_scaling")
    args = ap.parse_args()

    import torch

    gpus = torch.cuda.device_count()
    args.dtype = args.dtype or ("bfloat16" if gpus else "float32")
    if args.gpu_memory is None:
        args.gpu_memory = torch.cuda.get_device_properties(0).total_memory / 1e9 if gpus else 80.0
    launches = args.launch or launch_configs(gpus)
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0) if gpus else "CPU"
    print(f"[gpu_scaling] {device} x {max(gpus, 1)}, torch {torch.__version__}; Qwen2.5-{args.size}, "
          f"{args.steps} steps, launch configs {launches}", flush=True)
    model_dir = build_model(args.size, args.out / f"qwen2.5-{args.size}-random", args.dtype)
    results = [run_one(launch, setup, model_dir, args, gpus) for launch in launches for setup in args.setups]
    meta = {"device": device, "gpus": gpus, "torch": torch.__version__, "size": args.size, "steps": args.steps,
            "rows": args.rows, "accumulation": args.accumulation, "max_new_tokens": args.max_new_tokens,
            "dtype": args.dtype, "date": time.strftime("%Y-%m-%d")}
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    text = table(results)
    (args.out / "table.md").write_text(f"{device}, {meta['date']}\n\n{text}\n")
    print(text, flush=True)
    return 0 if all(r["returncode"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
