"""The tiny reward-model setting the reward tests share: hand-written arithmetic preference pairs (a right answer
chosen over a wrong one), recipes for tiny-qwen2 in each member form, and ensembles trained once per test process."""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from posttrain.recipe import Recipe, recipe_from_dict

LORA = {"r": 4, "alpha": 8, "target_modules": "all-linear"}
LR = {"full": 5e-3, "lora": 5e-3, "heads": 3e-2}


def question(a: int, b: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"What is {a} + {b}?"}]


def answer(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def write_pairs(path: Path, n: int = 24, offset: int = 0) -> Path:
    rows = []
    for i in range(n):
        a, b = (i + offset) % 7 + 1, (3 * i + offset) % 9 + 2
        wrong = a + b + 1 + i % 3
        rows.append({"id": f"p{i}", "prompt": question(a, b), "chosen": answer(f"The answer is \\boxed{{{a + b}}}."),
                     "rejected": answer(f"It is {wrong}")})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def recipe(out: Path, form: str = "heads", method: str = "reward_ensemble", data: dict[str, Any] | None = None,
           trainer: dict[str, Any] | None = None, **extra: Any) -> Recipe:
    """A tiny-qwen2 reward recipe on pairs written under `out` (train and eval)."""
    if data is None:
        data = {"train": str(write_pairs(out.parent / f"{out.name}-pairs" / "train.jsonl")),
                "eval": str(write_pairs(out.parent / f"{out.name}-pairs" / "eval.jsonl", 12, offset=5))}
    t = {"form": form, "max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": LR[form],
         "disable_tqdm": True, **({"num_members": 2} if method == "reward_ensemble" else {}), **(trainer or {})}
    model: dict[str, Any] = {"name_or_path": "tiny-qwen2"}
    if form == "lora":
        model["peft"] = LORA
    return recipe_from_dict({"method": method, "model": model, "data": data, "trainer": t, "output_dir": str(out),
                             **extra})


@functools.cache
def trained_ensemble(form: str) -> Path:
    """A 2-member tiny ensemble of `form` (seeds 42, 43; 2 steps each), trained once per test process; the heads
    one is also evaluated on its held-out pairs."""
    from posttrain.train import run_recipe

    root = Path(tempfile.mkdtemp(prefix=f"posttrain-rm-{form}-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    run_recipe(recipe(root / "ensemble", form, eval={"after": form == "heads"}))
    return root / "ensemble"
