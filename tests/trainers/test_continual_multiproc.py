"""Two real processes (torchrun, gloo on CPU) train a continual sequence as one process does on the same global
batch: 2 ranks x 2 rows equal 1 process x 2 rows x 2 accumulation steps, EMA and end-of-stage replacement included
(the EMA hook sees the DDP-averaged gradients, identical on every rank). Without the EMA the same holds under
DeepSpeed ZeRO-2 (launch/accelerate/zero2.yaml; the EMA needs whole gradients, which ZeRO partitions)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.launchers import accelerate, torchrun

REPO = Path(__file__).resolve().parents[2]


def _adapters(folder: Path) -> dict[str, torch.Tensor]:
    return {f"{g.name}/{k}": v for g in sorted(folder.glob("group_*"))
            for k, v in load_file(g / "adapter_model.safetensors").items()}


def _one_and_two(tmp_path: Path, shared_data: Path, launcher: list[str], *extra: str) -> tuple[Path, Path]:
    """The same continual run in one process (micro-batches of 2, accumulation 2) and in two (`launcher`, 2 each)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["train", "recipes/continual/tiny.yaml", f"data.path={shared_data / 'continual'}",
              "data.tasks=[sst2,agnews]", "data.train_limit=16", "data.test_limit=2", "trainer.max_steps=3",
              "eval.every_n_steps=null", "eval.base=false", "eval.max_new_tokens=2",
              "trainer.per_device_train_batch_size=2", *extra]
    one, two = tmp_path / "one", tmp_path / "two"
    runs = [
        [sys.executable, "-m", "posttrain", *common, "trainer.gradient_accumulation_steps=2", f"output_dir={one}"],
        [*launcher, "-m", "posttrain", *common, "trainer.gradient_accumulation_steps=1", f"output_dir={two}"],
    ]
    for cmd in runs:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("resolved recipe") == 1  # rank 0 prints, evaluates and writes
    return one, two


def _same_stages(one: Path, two: Path) -> tuple[list[dict], list[dict]]:
    """Both runs' stages trained the same adapters with the same losses; their progress records."""
    for stage in ("stage0_sst2", "stage1_agnews"):
        a, b = _adapters(one / stage), _adapters(two / stage)
        assert a.keys() == b.keys() and a
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=f"{stage} {k}")
    pa, pb = (json.loads((d / "progress.json").read_text())["stages"] for d in (one, two))
    for sa, sb in zip(pa, pb, strict=True):
        la = [h["loss"] for h in sa["log_history"] if "loss" in h]
        lb = [h["loss"] for h in sb["log_history"] if "loss" in h]
        assert la == pytest.approx(lb, rel=1e-4) and len(la) == 3
    return pa, pb


@pytest.mark.multiproc
def test_two_processes_equal_one_process_on_the_same_global_batch(tmp_path, shared_data):
    one, two = _one_and_two(tmp_path, shared_data, torchrun(2, 29531))
    pa, pb = _same_stages(one, two)
    for sa, sb in zip(pa, pb, strict=True):
        wa = [h["ema/weight_mean"] for h in sa["log_history"] if "ema/weight_mean" in h]
        wb = [h["ema/weight_mean"] for h in sb["log_history"] if "ema/weight_mean" in h]
        assert len(wa) == 2 and wa == pytest.approx(wb, rel=1e-4)  # steps 2 and 3 (step 1 initialises)
    assert json.loads((two / "report" / "continual.json").read_text())["matrix"]


@pytest.mark.multiproc
def test_zero2_without_the_ema_equals_one_process(tmp_path, shared_data):
    one, two = _one_and_two(tmp_path, shared_data, accelerate("zero2", 2, 29532), "trainer.ema=none")
    _, stages = _same_stages(one, two)
    assert stages[-1]["launch"]["distributed_type"] == "DEEPSPEED"
