"""BNPO's Beta fit and DCPO's fraction correct and entropy signal are batch-wide: two processes (torchrun,
gloo on CPU) with 8 completions each train exactly like one process with the same global batch of 16."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("grpo_methods_worker.py")


def _run(method: str, out: Path, nproc: int, port: int) -> tuple[list[dict], dict]:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert torchrun, "torchrun not found"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    cmd = [torchrun, "--nproc_per_node", str(nproc), "--master_port", str(port), str(WORKER), method, str(out),
           str(16 // nproc)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [h for h in history if "loss" in h], torch.load(out / "weights.pt")


@pytest.mark.multiproc
@pytest.mark.parametrize("method,keys", [("bnpo", ["bnpo/alpha", "bnpo/beta"]),
                                         ("dcpo", ["dcpo/p_hat", "dcpo/alpha", "dcpo/h_prev", "dcpo/temperature"])])
def test_two_processes_equal_one(tmp_path, method, keys):
    one, w_one = _run(method, tmp_path / "one", 1, 29531)
    two, w_two = _run(method, tmp_path / "two", 2, 29532)
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        for k in keys + ["reward", "loss"]:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), k
    assert one[0][keys[0]] not in (0.0, 1.0)  # a real (non-degenerate) statistic was compared
    for n in w_one:
        assert torch.allclose(w_one[n], w_two[n], atol=1e-6), (n, (w_one[n] - w_two[n]).abs().max().item())
