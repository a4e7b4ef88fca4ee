"""The three reward-ensemble forms (full, lora, heads) for K = 5 members: training time and memory, and scoring
throughput of `RewardEnsemble` against K separate single models called the `transformers.pipeline` way, on the
same batch (targets: >= 3x for heads, >= 1x for lora).

For each form a real ensemble is trained (method reward_ensemble, --steps steps per member on arithmetic pairs
written from the task's reference answers), then scored. The baseline materialises each member as a standalone
sequence-classification model (full: the member; lora: base + adapter merged; heads: base + the member's head) and
scores the batch with `pipeline("text-classification", function_to_apply="none")`, one member after another, on the
same chat-formatted texts. Every form runs in its own process, so peak RSS is the form's own; the ratio is the
ensemble's samples/s over the baseline's, both timed in the same process after a warm-up.

    flock /tmp/posttrain-heavy.lock python bench/rm_ensemble_forms.py                 # SmolLM2-135M, float32
    python bench/rm_ensemble_forms.py --model tiny-qwen2 --samples 64 --steps 2       # seconds
    python bench/rm_ensemble_forms.py --dtype bfloat16 --forms heads lora
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _pairs(path: Path, n: int) -> Path:
    from posttrain.data import get_task

    rows = []
    for r in get_task("arithmetic").load(split="train", limit=n):
        a = int(r["answer"])
        steps = "Let me add the two numbers step by step. Adding them gives {}. So the final answer is \\boxed{{{}}}."
        rows.append({"id": r["id"], "prompt": r["prompt"],
                     "chosen": [{"role": "assistant", "content": steps.format(a, a)}],
                     "rejected": [{"role": "assistant", "content": steps.format(a + 3, a + 3)}]})
    path.parent.mkdir(parents=True, exist_ok=True)  # --out may not exist yet
    path.write_text("".join(json.dumps(x) + "\n" for x in rows))
    return path


def _batch(n: int) -> tuple[list, list]:
    """n (prompt, completion) pairs of realistic length, in chat messages."""
    from posttrain.data import get_task

    prompts, completions = [], []
    for i, r in enumerate(get_task("arithmetic").load(split="test", limit=n)):
        a = int(r["answer"]) + (i % 3) - 1
        text = (f"To solve this, I add the two numbers together carefully, one digit at a time. The sum is {a}. "
                f"The final answer is \\boxed{{{a}}}." + " Let me double-check." * (i % 4))
        prompts.append(r["prompt"])
        completions.append([{"role": "assistant", "content": text}])
    return prompts, completions


def worker_train(a: argparse.Namespace) -> dict:
    from posttrain.recipe import recipe_from_dict
    from posttrain.train import run_recipe

    model = {"name_or_path": a.model, "dtype": a.dtype}
    if a.form == "lora":
        model["peft"] = {"r": 16, "alpha": 32, "target_modules": "all-linear"}
    r = recipe_from_dict({
        "method": "reward_ensemble", "model": model, "output_dir": a.dir, "seed": 0,
        "data": {"train": str(_pairs(Path(a.dir).parent / f"pairs_{a.form}.jsonl", 64))},
        "trainer": {"form": a.form, "num_members": a.k, "max_steps": a.steps, "per_device_train_batch_size": 4,
                    "per_device_eval_batch_size": 16, "learning_rate": 1e-4, "gradient_checkpointing": False,
                    "disable_tqdm": True, "save_only_model": True},
    })
    t0 = time.perf_counter()
    s = run_recipe(r).summary
    size = sum(p.stat().st_size for p in Path(a.dir).rglob("*") if p.is_file())
    return {"form": a.form, "wall_s": time.perf_counter() - t0, "train_s": s["train_minutes"] * 60,
            "feature_s": s.get("feature_minutes", 0.0) * 60,
            "train_s_per_member_step": s["train_minutes"] * 60 / (a.k * a.steps),
            "peak_rss_gb": _peak_rss_gb(), "disk_mb": size / 2**20}


def _single_models(folder: Path, form: str, k: int, dtype: str) -> list:
    from peft import PeftModel
    from safetensors.torch import load_file

    from posttrain.rewards.ensemble import EnsembleManifest, load_reward_model

    base = EnsembleManifest.read(folder).base
    models = []
    for i in range(k):
        member = folder / f"member_{i}"
        if form == "full":
            m = load_reward_model(str(member), dtype=dtype)
        elif form == "lora":
            m = PeftModel.from_pretrained(load_reward_model(base, dtype=dtype), str(member)).merge_and_unload()
        else:
            m = load_reward_model(base, dtype=dtype)
            head = load_file(member / "head.safetensors")
            m.score.load_state_dict({name: v.to(m.score.weight.dtype) for name, v in head.items()})
        models.append(m.eval())
    return models


def worker_score(a: argparse.Namespace) -> dict:
    import torch
    from transformers import pipeline

    from posttrain.rewards.ensemble import RewardEnsemble

    folder = Path(a.dir)
    prompts, completions = _batch(a.samples)
    ensemble = RewardEnsemble.from_pretrained(folder, batch_size=a.batch_size)
    rss_ensemble = _peak_rss_gb()
    ensemble.scores(prompts[:4], completions[:4])  # warm-up
    t0 = time.perf_counter()
    scores = ensemble.scores(prompts, completions)
    ensemble_s = time.perf_counter() - t0
    held = ensemble.num_parameters()
    tokenizer = ensemble.tokenizer
    del ensemble
    texts = tokenizer.apply_chat_template([p + c for p, c in zip(prompts, completions)], tokenize=False)
    singles = _single_models(folder, a.form, a.k, a.dtype)
    pipes = []
    for m in singles:
        m.config.pad_token_id = tokenizer.pad_token_id
        pipes.append(pipeline("text-classification", model=m, tokenizer=tokenizer, device=-1))
    pipes[0](texts[:4], function_to_apply="none", batch_size=a.batch_size, add_special_tokens=False)  # warm-up
    t0 = time.perf_counter()
    baseline = [[o["score"] for o in pipe(texts, function_to_apply="none", batch_size=a.batch_size,
                                          add_special_tokens=False)] for pipe in pipes]
    baseline_s = time.perf_counter() - t0
    diff = (scores - torch.tensor(baseline)).abs().max().item()
    return {"form": a.form, "samples": a.samples, "k": a.k,
            "ensemble_samples_per_s": a.samples / ensemble_s, "baseline_samples_per_s": a.samples / baseline_s,
            "ratio": baseline_s / ensemble_s, "max_abs_score_diff": diff,
            "ensemble_params_m": held / 1e6, "baseline_params_m": sum(p.numel() for m in singles
                                                                        for p in m.parameters()) / 1e6,
            "peak_rss_gb_after_ensemble_load": rss_ensemble}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--forms", nargs="+", default=["heads", "lora", "full"])
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--steps", type=int, default=4, help="training steps per member (4 pairs each)")
    p.add_argument("--samples", type=int, default=32, help="(prompt, completion) pairs scored")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--out", help="keep the trained ensembles here (default: a temporary folder)")
    p.add_argument("--worker", choices=["train", "score"], help=argparse.SUPPRESS)
    p.add_argument("--form", help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print("RESULT " + json.dumps((worker_train if a.worker == "train" else worker_score)(a)), flush=True)
        return
    root = Path(a.out or tempfile.mkdtemp(prefix="rm-forms-"))
    results = []
    for form in a.forms:
        row = {}
        for worker in ("train", "score"):
            cmd = [sys.executable, __file__, "--worker", worker, "--form", form, "--dir", str(root / form),
                   "--model", a.model, "--k", str(a.k), "--steps", str(a.steps), "--samples", str(a.samples),
                   "--batch-size", str(a.batch_size), "--dtype", a.dtype]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise RuntimeError(f"{form} {worker} failed:\n{out.stderr[-3000:]}")
            row.update({f"{worker}/{k}": v for k, v in json.loads(line[7:]).items() if k != "form"})
        results.append({"form": form, **row})
        print(json.dumps(results[-1]), flush=True)
    print(f"\nK = {a.k}, {a.model} ({a.dtype}), {a.samples} samples, batch {a.batch_size}:")
    print("| form | train s / member step | peak RSS train GB | disk MB | params held (M) | ensemble samples/s "
          "| K pipeline calls samples/s | ratio | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['form']} | {r['train/train_s_per_member_step']:.2f} | {r['train/peak_rss_gb']:.2f} | "
              f"{r['train/disk_mb']:.0f} | {r['score/ensemble_params_m']:.1f} vs {r['score/baseline_params_m']:.1f} | "
              f"{r['score/ensemble_samples_per_s']:.2f} | {r['score/baseline_samples_per_s']:.2f} | "
              f"{r['score/ratio']:.2f}x | {r['score/max_abs_score_diff']:.1e} |")


if __name__ == "__main__":
    main()
