"""Two real processes (torchrun, gloo on CPU): the GRPO base gathers its statistics across ranks."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.distributed.launchers import torchrun

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.multiproc
def test_grpo_two_processes_log_global_metrics(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [*torchrun(2, 29517), "-m", "posttrain", "train",
           "recipes/grpo/grpo.yaml", "model.name_or_path=tiny-qwen2", "trainer.max_steps=2",
           "trainer.per_device_train_batch_size=8", "rollout.max_new_tokens=8", "eval.before=false",
           "eval.after=false", f"output_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads((tmp_path / "trainer_state.json").read_text())["log_history"]
    steps = [h for h in history if "loss" in h]
    assert len(steps) == 2
    for h in steps:
        # 2 ranks x 8 completions = 16 per step = 2 groups of 8: fractions are multiples of 1/2.
        assert h["groups/frac_all_wrong"] * 2 == int(h["groups/frac_all_wrong"] * 2)
        assert h["entropy/mean"] == pytest.approx(h["entropy"], rel=1e-4)
    assert proc.stdout.count("resolved recipe") == 1  # printed by rank 0 only
