"""DPO and DPO-Shift in two real processes (torchrun, gloo on CPU) train exactly like one process on the same
global batch: the loss is a mean over pairs, DDP averages the gradients, TRL gathers the logged metrics, and f
depends on the optimizer step only. Through `posttrain train` (the dpo pipeline) with LoRA and plain SGD (so that
float rounding of the gradients is not amplified by Adam's g / sqrt(v)). The same under accelerate's FSDP2
(launch/accelerate/fsdp2.yaml, the parameters sharded over the two ranks; tests/distributed/fsdp_cpu.py lets
accelerate run it on CPU), the adapter saved whole."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed import launchers

REPO = Path(__file__).resolve().parents[2]
KEYS = ["loss", "dpo_shift/f", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
        "logps/chosen", "logps/rejected"]


def _pairs(path: Path) -> Path:
    rows = [{"prompt": [{"role": "user", "content": f"What is {a} + {a + 2}?"}],
             "chosen": [{"role": "assistant", "content": f"The answer is {2 * a + 2}."}],
             "rejected": [{"role": "assistant", "content": f"{3 * a + 7}, probably not {a}."}]} for a in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(recipe: str, nproc: int, out: Path, pairs: Path, port: int, fsdp2: bool = False) -> tuple[list[dict], dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [*(launchers.fsdp2 if fsdp2 else launchers.torchrun)(nproc, port), "-m", "posttrain", "train",
           recipe, "model.name_or_path=tiny-qwen2", f"data.train={pairs}",
           "data.eval=null", "data.task=null", "eval.before=false", "eval.after=false", "trainer.max_steps=3",
           f"trainer.per_device_train_batch_size={8 // nproc}", "trainer.optim=sgd", "trainer.learning_rate=0.5",
           f"output_dir={out}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("resolved recipe") == 1  # printed by rank 0 only
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    launch = json.loads((out / "report" / "summary.json").read_text())["launch"]
    assert (launch["processes"], launch["sharding"]) == (nproc, "fsdp" if fsdp2 else None), launch
    return [h for h in history if "loss" in h], load_file(out / "adapter_model.safetensors")


@pytest.mark.multiproc
@pytest.mark.parametrize("recipe,port", [("recipes/dpo/dpo_shift_linear.yaml", 29541), ("recipes/dpo/dpo.yaml", 29543)],
                         ids=["dpo_shift_linear", "dpo"])
def test_two_processes_equal_one_on_the_same_global_batch(tmp_path, recipe, port):
    pairs = _pairs(tmp_path / "pairs.jsonl")  # 8 pairs = one global batch of 8: every step sees all of them
    one, w_one = _run(recipe, 1, tmp_path / "one", pairs, port)
    shift = "dpo_shift" in recipe
    if shift:
        assert [h["dpo_shift/f"] for h in one] == pytest.approx([0.75, 0.75 + 0.25 / 3, 0.75 + 0.5 / 3])
    assert one[-1]["rewards/margins"] > 0  # it trained
    for launch, fsdp2 in (("two", False), ("fsdp2", True)):
        two, w_two = _run(recipe, 2, tmp_path / launch, pairs, port + 1, fsdp2=fsdp2)
        assert len(one) == len(two) == 3
        if not shift:
            assert all("dpo_shift/f" not in h for h in one + two)
        for a, b in zip(one, two):
            for k in KEYS if shift else KEYS[:1] + KEYS[2:]:
                assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (launch, k)
        assert w_one.keys() == w_two.keys()
        for n in w_one:
            assert torch.allclose(w_one[n], w_two[n], atol=1e-6), (launch, n, (w_one[n] - w_two[n]).abs().max())
