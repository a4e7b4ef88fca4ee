"""GRPO and every entropy-control method, with LoRA and without, in two processes (torchrun, gloo on CPU) train
exactly like one process on the same global batch: BNPO's Beta fit, DCPO's fraction correct and entropy signal,
QAE's group quantile, EPO's entropy history and STEER's global max |Omega| are batch-wide, so two processes with 8
completions each match one process with 16. STEER's default max |Omega| and Clip-Cov's covariance are per
micro-batch (as in their reference code): two processes with 8 each match one process with micro-batches of 8 and
gradient accumulation 2."""

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
# every method's own logged statistics, compared besides the common ones and the trained weights
METHODS = {"grpo": [], "steer": ["steer/weight_mean", "steer/weight_min"], "steer_global": ["steer/weight_min"],
           "epo": ["epo/beta", "epo/corridor_fraction", "epo/entropy_traj", "epo/h_bar", "epo/smooth_penalty"],
           "dcpo": ["dcpo/p_hat", "dcpo/alpha", "dcpo/h_prev", "dcpo/temperature"],
           "bnpo": ["bnpo/alpha", "bnpo/beta"], "qae": [], "clip_cov": ["clip_cov/weight_mean", "clip_cov/weight_min"]}
COMMON = ["loss", "grad_norm", "reward", "reward_std", "entropy", "entropy/mean", "num_tokens",
          "completions/mean_length", "groups/frac_mixed"]
# one process reproduces two processes' micro-batches of 8 with gradient accumulation 2 and one generation per
# micro-batch (prompt 1's group, then prompt 2's: what rank 0 and rank 1 get). Its logged reward_std is then a mean
# of per-micro-batch standard deviations, not the gathered batch's, so it is not compared there.
PER_MICRO_BATCH = {"steer", "clip_cov"}  # with loss_type grpo (see the worker)


def _launch(out: Path, nproc: int, specs: list[str], port: int) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert torchrun, "torchrun not found"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    cmd = [torchrun, "--nproc_per_node", str(nproc), "--master_port", str(port), str(WORKER), str(out), *specs]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One launch of one process and one of two, each training all 16 (method, LoRA) cases in turn."""
    root = tmp_path_factory.mktemp("grpo_methods")
    one, two = [], []
    for method in METHODS:
        for lora in (0, 1):
            name = f"{method}_{'lora' if lora else 'full'}"
            one.append(f"{name}:{method}:{lora}:" + ("8:2" if method in PER_MICRO_BATCH else "16:1"))
            two.append(f"{name}:{method}:{lora}:8:1")
    _launch(root / "one", 1, one, 29531)
    _launch(root / "two", 2, two, 29532)
    return root


def _read(folder: Path) -> tuple[list[dict], dict]:
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    return [h for h in history if "loss" in h], torch.load(folder / "weights.pt")


@pytest.mark.multiproc
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("method", list(METHODS))
def test_two_processes_equal_one(runs, method, lora):
    name = f"{method}_{'lora' if lora else 'full'}"
    (one, w_one), (two, w_two) = _read(runs / "one" / name), _read(runs / "two" / name)
    assert len(one) == len(two) == 2
    keys = COMMON + METHODS[method]
    for step, (a, b) in enumerate(zip(one, two)):
        for k in keys:
            if k == "reward_std" and method in PER_MICRO_BATCH:
                continue  # a mean of the two micro-batches' standard deviations there
            if k == "epo/h_bar" and step == 0:
                continue  # the previous step's entropy: none at the first
            assert k in a and k in b, (k, sorted(a))
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (step, k)
    for k in METHODS[method]:
        if k not in ("steer/weight_min", "epo/h_bar", "epo/smooth_penalty", "epo/corridor_fraction",
                     "clip_cov/weight_min"):  # may be 0 or 1 by construction
            assert len({h[k] for h in one} - {0.0, 1.0}) > 0, k  # a real (not a trivial) statistic was compared
    if lora:
        assert w_one.keys() and all("lora_" in n for n in w_one)
    assert w_one.keys() == w_two.keys()
    for n in w_one:
        assert torch.allclose(w_one[n], w_two[n], atol=1e-6), (n, (w_one[n] - w_two[n]).abs().max().item())
    if lora:  # it trained: lora_B is zero at initialisation
        assert max(w_one[n].abs().max().item() for n in w_one if "lora_B" in n) > 0
