"""DPO and DPO-Shift in two real processes (torchrun, gloo on CPU) train exactly like one process on the same
global batch: the loss is a mean over pairs, DDP averages the gradients, TRL gathers the logged metrics, and f
depends on the optimizer step only. Through `posttrain train` (the dpo pipeline) with LoRA and plain SGD (so that
float rounding of the gradients is not amplified by Adam's g / sqrt(v)). The same under accelerate's FSDP2
(launch/accelerate/fsdp2.yaml, the parameters sharded over the two ranks; tests/distributed/fsdp_cpu.py lets
accelerate run it on CPU) and under DeepSpeed ZeRO-3 (zero3.yaml: the model loads partitioned), the adapter saved
whole."""

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


def _run(recipe: str, nproc: int, out: Path, pairs: Path, port: int, config: str | None = None
         ) -> tuple[list[dict], dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    prefix = launchers.accelerate(config, nproc, port) if config else launchers.torchrun(nproc, port)
    cmd = [*prefix, "-m", "posttrain", "train",
           recipe, "model.name_or_path=tiny-qwen2", f"data.train={pairs}",
           "data.eval=null", "data.task=null", "eval.before=false", "eval.after=false", "trainer.max_steps=3",
           f"trainer.per_device_train_batch_size={8 // nproc}", "trainer.optim=sgd", "trainer.learning_rate=0.5",
           f"output_dir={out}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("resolved recipe") == 1  # printed by rank 0 only
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    launch = json.loads((out / "report" / "summary.json").read_text())["launch"]
    assert (launch["processes"], launch["sharding"]) == (nproc, {"fsdp2": "fsdp", "zero3": "zero3"}.get(config)), launch
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
    for launch, config in (("two", None), ("fsdp2", "fsdp2"), ("zero3", "zero3")):
        two, w_two = _run(recipe, 2, tmp_path / launch, pairs, port + 1, config)
        assert len(one) == len(two) == 3
        if not shift:
            assert all("dpo_shift/f" not in h for h in one + two)
        for a, b in zip(one, two):
            for k in KEYS if shift else KEYS[:1] + KEYS[2:]:
                assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (launch, k)
        assert w_one.keys() == w_two.keys()
        for n in w_one:
            assert torch.allclose(w_one[n], w_two[n], atol=1e-6), (launch, n, (w_one[n] - w_two[n]).abs().max())


@pytest.mark.multiproc
def test_zero2_evaluates_the_held_out_pairs_before_and_after(tmp_path):
    """Under DeepSpeed ZeRO-2 (launch/accelerate/zero2.yaml: the weights whole on every rank, the gradients and
    optimizer state partitioned) the main process evaluates before and after training while the other rank waits:
    the launch recipes/dpo/dpo_gpu.yaml documents."""
    pairs = _pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "zero2"
    cmd = [*launchers.accelerate("zero2", 2, 29548), "-m", "posttrain", "train", "recipes/dpo/dpo_shift_linear.yaml",
           "model.name_or_path=tiny-qwen2", f"data.train={pairs}", f"data.eval={pairs}", "data.task=null",
           "eval.before=true", "eval.after=true", "trainer.max_steps=2", "trainer.per_device_train_batch_size=4",
           f"output_dir={out}"]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["launch"]["distributed_type"] == "DEEPSPEED" and summary["launch"]["sharding"] is None
    assert summary["launch"]["zero_stage"] == 2
    assert "Launch: 2 processes (DEEPSPEED ZeRO-2) on cpu" in (out / "report" / "README.md").read_text()
    assert summary["pairs_before"]["n_pairs"] == summary["pairs_after"]["n_pairs"] == 8
    assert summary["pairs_after"]["logps/chosen_change"] != 0  # it trained between the two evaluations
