"""Checkpoints by default, the recipe in every checkpoint, and resume: the last checkpoint, an explicit one,
overrides after a bare --resume, and a changed recipe refused unless forced."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from posttrain.cli import main

GRPO = str(Path(__file__).resolve().parents[1] / "recipes" / "grpo" / "grpo.yaml")


def _args(out, *extra):
    return [GRPO, "model.name_or_path=tiny-qwen2", "model.peft=null", "rollout.max_new_tokens=6",
            "rollout.num_generations=2", "trainer.per_device_train_batch_size=4", "eval.before=false",
            "eval.after=false", f"output_dir={out}", *extra]


def _train(*argv):
    with pytest.raises(SystemExit) as code:
        main(["train", *argv])
    return code.value.code


def test_default_run_checkpoints_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(*_args(out, "trainer.max_steps=2")) == 0
    checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-1", "checkpoint-2"]  # every 10% of the run (ceil: every step), the last 2
    assert (out / "checkpoint-2" / "recipe.yaml").is_file()
    # a bare --resume followed by an override: the override is not taken for a checkpoint path
    assert _train(*_args(out), "--resume", "trainer.max_steps=3") == 0
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2",
                                                                                              "checkpoint-3"]
    history = [h["step"] for h in state["log_history"] if "loss" in h]
    assert history == [1, 2, 3]  # continued, not restarted
    # a changed learning rate is another run: refused, naming the key
    assert _train(*_args(out, "trainer.max_steps=4", "trainer.learning_rate=0.1"), "--resume") == 2
    err = capsys.readouterr().err
    assert "differs from the one" in err and "trainer.learning_rate" in err and "--force-resume" in err
    assert _train(*_args(out, "trainer.max_steps=4", "trainer.learning_rate=0.1"), "--resume",
                  "--force-resume") == 0
    # an explicit checkpoint
    assert _train(*_args(tmp_path / "other", "trainer.max_steps=3"), "--resume", str(out / "checkpoint-3")) == 0


def test_resume_without_checkpoints_is_a_clear_error(tmp_path, capsys):
    assert _train(*_args(tmp_path / "fresh", "trainer.max_steps=1"), "--resume") == 2
    assert "no checkpoint-N folder in output_dir" in capsys.readouterr().err
    assert _train(*_args(tmp_path / "fresh", "trainer.max_steps=1"), "--resume", str(tmp_path / "nope")) == 2
    assert "checkpoint folder not found" in capsys.readouterr().err


def test_save_strategy_no_turns_checkpoints_off(tmp_path):
    out = tmp_path / "run"
    assert _train(*_args(out, "trainer.max_steps=1", 'trainer.save_strategy="no"')) == 0
    assert not list(out.glob("checkpoint-*"))


def test_a_bare_no_gets_a_quoting_hint(tmp_path, capsys):
    assert _train(*_args(tmp_path, "trainer.max_steps=1", "trainer.save_strategy=no")) == 2
    assert 'quote it, e.g. "no"' in capsys.readouterr().err


@pytest.mark.multiproc
@pytest.mark.parametrize("config, checkpoint_file, port", [("fsdp2", "pytorch_model_fsdp.bin", 29538),
                                                           ("zero3", "global_step2", 29547)])
def test_resume_under_sharding_continues_the_run_exactly(tmp_path, config, checkpoint_file, port):
    """Two ranks under accelerate's FSDP2 (launch/accelerate/fsdp2.yaml; tests/distributed/fsdp_cpu.py) or DeepSpeed
    ZeRO-3 (zero3.yaml): EPO stopped after step 2 and resumed from its sharded checkpoint (FSDP's model and
    optimizer files, or DeepSpeed's partitioned states; each rank's RNG, EPO's entropy history) logs and trains
    exactly what an uninterrupted 3-step run does."""
    import os
    import subprocess

    from safetensors.torch import load_file

    from tests.distributed import launchers

    def train(out, port, *extra):
        cmd = [*launchers.accelerate(config, 2, port), "-m", "posttrain", "train", GRPO.replace("grpo.yaml", "epo.yaml"),
               "model.name_or_path=tiny-qwen2", "rollout.max_new_tokens=8", "trainer.per_device_train_batch_size=8",
               "trainer.save_steps=1", "eval.before=false", "eval.after=false", f"output_dir={out}", *extra]
        proc = subprocess.run(cmd, cwd=launchers.REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        return [h for h in history if "loss" in h], load_file(out / "adapter_model.safetensors")

    train(tmp_path / "resumed", port, "trainer.max_steps=2")
    assert (tmp_path / "resumed" / "checkpoint-2" / checkpoint_file).exists()
    resumed, w_resumed = train(tmp_path / "resumed", port, "trainer.max_steps=3", "--resume")
    straight, w_straight = train(tmp_path / "straight", port + 1, "trainer.max_steps=3")
    assert [h["step"] for h in resumed] == [1, 2, 3]
    for a, b in zip(resumed, straight, strict=True):
        assert {k: a[k] for k in ("loss", "num_tokens", "epo/h_bar") if k in a} == \
            {k: b[k] for k in ("loss", "num_tokens", "epo/h_bar") if k in b}
    assert "epo/h_bar" in resumed[2]  # the entropy history came back from the checkpoint
    assert w_resumed.keys() == w_straight.keys()
    assert all(torch.equal(w_resumed[k], w_straight[k]) for k in w_resumed)
