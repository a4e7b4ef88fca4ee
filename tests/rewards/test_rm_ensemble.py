"""The reward-model ensemble as a GRPO reward (`rm_ensemble`): its values and `rm_ensemble/*` logs, and a few GRPO
steps of a LoRA policy on it."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.algos.ensembles import aggregate, member_statistics
from posttrain.recipe import recipe_from_dict
from posttrain.rewards import get_reward
from posttrain.rewards.ensemble import RewardEnsemble
from posttrain.train import run_recipe
from tests.trainers.reward_setting import answer, question, trained_ensemble

PROMPTS = [question(2, 3), question(4, 4), question(1, 9)]
COMPLETIONS = [answer("The answer is \\boxed{5}."), answer("It is 7"), answer("10")]


def test_reward_values_and_logged_member_statistics():
    folder = trained_ensemble("heads")
    ensemble = RewardEnsemble.from_pretrained(folder)
    raw = ensemble.scores(PROMPTS, COMPLETIONS)
    scores = ensemble.standardize(raw)  # what the reward aggregates and logs
    assert not torch.allclose(scores, raw)
    logged: dict[str, float] = {}
    fn = get_reward("rm_ensemble", None, path=str(folder), aggregate="uwo", uwo_lambda=0.1)
    assert fn.__name__ == "rm_ensemble"
    values = fn(PROMPTS, COMPLETIONS, answer=["5", "8", "10"], log_metric=logged.__setitem__)
    assert values == pytest.approx(aggregate(scores, "uwo", 0.1).tolist(), abs=1e-6)
    assert logged.keys() == {f"rm_ensemble/{k}" for k in ("mean", "min", "max", "std")}
    for key, value in member_statistics(scores).items():
        assert logged[f"rm_ensemble/{key}"] == pytest.approx(value, abs=1e-6)
    single = get_reward("rm_ensemble", None, path=str(folder), members=[1])
    assert single(PROMPTS, COMPLETIONS) == pytest.approx(scores[1].tolist(), abs=1e-6)  # one proxy: no aggregate
    unscaled = get_reward("rm_ensemble", None, path=str(folder), aggregate="wco", normalize=False)
    assert unscaled(PROMPTS, COMPLETIONS) == pytest.approx(aggregate(raw, "wco").tolist(), abs=1e-6)
    with pytest.raises(KeyError, match="unknown ensemble_aggregate 'wcoo'"):
        get_reward("rm_ensemble", None, path=str(folder), aggregate="wcoo")
    with pytest.raises(FileNotFoundError, match="ensemble.json not found"):
        get_reward("rm_ensemble", None, path=str(folder / "member_0"))
    with pytest.raises(TypeError, match="bad options"):
        get_reward("rm_ensemble", None, path=str(folder), lambda_=0.1)


def test_grpo_steps_with_the_ensemble_reward_and_lora(tmp_path):
    folder = trained_ensemble("heads")
    r = recipe_from_dict({
        "method": "grpo",
        "model": {"name_or_path": "tiny-qwen2", "peft": {"r": 4, "alpha": 8}},
        "data": {"train": {"task": "arithmetic", "limit": 8}},
        "rewards": [{"name": "rm_ensemble", "options": {"path": str(folder), "aggregate": "wco"}},
                    {"name": "accuracy", "weight": 0.0}],
        "rollout": {"num_generations": 4, "max_new_tokens": 8},
        "trainer": {"max_steps": 2, "per_device_train_batch_size": 8, "learning_rate": 1e-3, "disable_tqdm": True},
        "output_dir": str(tmp_path),
    })
    result = run_recipe(r)
    history = json.loads((tmp_path / "trainer_state.json").read_text())["log_history"]
    steps = [h for h in history if "rm_ensemble/std" in h]
    assert len(steps) == 2 and result.summary["steps"] == 2
    for h in steps:
        assert h["rm_ensemble/min"] <= h["rm_ensemble/mean"] <= h["rm_ensemble/max"] and h["rm_ensemble/std"] >= 0
        # the optimised reward is the wco aggregate, the mean of the per-completion member minimum
        assert h["rewards/rm_ensemble/mean"] == pytest.approx(h["rm_ensemble/min"], abs=1e-4)
        assert "rewards/accuracy/mean" in h  # the gold, tracked with weight 0
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert torch.isfinite(torch.tensor([h["loss"] for h in history if "loss" in h])).all()
