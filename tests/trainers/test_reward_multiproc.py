"""Two real processes (torchrun, gloo on CPU): reward-model training on a global batch split over two ranks equals
one process on the same global batch; so does training under accelerate's FSDP2 (launch/accelerate/fsdp2.yaml,
the parameters sharded over the two ranks; tests/distributed/fsdp_cpu.py lets accelerate run it on CPU) and under
DeepSpeed ZeRO-3 (zero3.yaml, the parameters partitioned as the model loads)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posttrain.rewards.ensemble import RewardEnsemble
from tests.distributed import launchers
from tests.trainers.reward_setting import answer, question, recipe

REPO = Path(__file__).resolve().parents[2]
PROMPTS = [question(2, 3), question(4, 4), question(1, 9), question(6, 2)]
COMPLETIONS = [answer("The answer is \\boxed{5}."), answer("It is 7"), answer("10"), answer("The answer is 9")]


def _train(recipe_file: Path, out: Path, per_device: int, processes: int, port: int, config: str | None = None
           ) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["-m", "posttrain", "train", str(recipe_file), f"output_dir={out}",
            f"trainer.per_device_train_batch_size={per_device}"]
    if config:
        cmd = [*launchers.accelerate(config, processes, port), *args]
    elif processes == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [*launchers.torchrun(processes, port), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.multiproc
@pytest.mark.parametrize("method, form, port", [("reward", "full", 29531), ("reward_ensemble", "heads", 29532)])
def test_two_processes_equal_one_on_the_same_global_batch(tmp_path, method, form, port):
    r = recipe(tmp_path / "spec", form, method=method, trainer={"max_steps": 3, "learning_rate": 1e-3},
               eval={"after": False})
    recipe_file = r.save(tmp_path / "spec")
    _train(recipe_file, tmp_path / "one", per_device=4, processes=1, port=port)
    _train(recipe_file, tmp_path / "two", per_device=2, processes=2, port=port)
    _train(recipe_file, tmp_path / "half", per_device=2, processes=1, port=port)  # half the global batch
    one, two, half = (RewardEnsemble.from_pretrained(tmp_path / name).scores(PROMPTS, COMPLETIONS)
                      for name in ("one", "two", "half"))
    assert one.shape == two.shape == (1 if method == "reward" else 2, 4)
    assert torch.allclose(one, two, atol=1e-5), (one, two)
    assert not torch.allclose(one, half, atol=1e-3)  # another global batch trains another model


SHARDED = {"fsdp2": ("FSDP", "fsdp"), "zero3": ("DEEPSPEED", "zero3")}


@pytest.mark.multiproc
@pytest.mark.parametrize("config", list(SHARDED))
@pytest.mark.parametrize("method, form, port", [("reward", "full", 29533), ("reward_ensemble", "lora", 29534)])
def test_sharded_training_equals_one_process_on_the_same_global_batch(tmp_path, method, form, port, config):
    """Each member's parameters sharded over two ranks (FSDP2 shards a LoRA member's base in place, and ZeRO-3
    partitions it: the next member starts from a freshly loaded one), the trained members saved whole."""
    r = recipe(tmp_path / "spec", form, method=method, trainer={"max_steps": 3, "learning_rate": 1e-3},
               eval={"after": False})
    recipe_file = r.save(tmp_path / "spec")
    _train(recipe_file, tmp_path / "one", per_device=4, processes=1, port=port)
    _train(recipe_file, tmp_path / config, per_device=2, processes=2, port=port, config=config)
    launch = json.loads((tmp_path / config / "report" / "summary.json").read_text())["launch"]
    assert (launch["processes"], launch["distributed_type"], launch["sharding"]) == (2, *SHARDED[config]), launch
    one, sharded = (RewardEnsemble.from_pretrained(tmp_path / name).scores(PROMPTS, COMPLETIONS)
                    for name in ("one", config))
    assert one.shape == sharded.shape == (1 if method == "reward" else 2, 4)
    assert torch.allclose(one, sharded, atol=1e-5), (one, sharded)
    if method == "reward_ensemble":
        assert not torch.allclose(one[0], one[1], atol=1e-3)  # two members (seeds), two models
