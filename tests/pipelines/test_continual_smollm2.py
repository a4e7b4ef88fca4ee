"""EMA-balanced LoRA on the real SmolLM2-135M-Instruct (slow: about 5 minutes on 2 CPU cores): the EMA-replaced
adapter learns its task, and a task whose instructions open a new adapter group leaves the earlier group's task
exactly where it was (its adapter is frozen and its prompts are routed to it)."""

import json
from pathlib import Path

import pytest

from posttrain.recipe import load_recipe
from posttrain.train import run_recipe

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "continual" / "ema_lora.yaml"


@pytest.mark.slow
def test_smollm2_learns_sst2_and_a_new_group_does_not_touch_it(shared_data, tmp_path):
    r = load_recipe(RECIPE, [f"data.path={shared_data / 'continual'}", f"output_dir={tmp_path}",
                             "data.tasks=[sst2,agnews]", "eval.every_n_steps=null"])
    summary = run_recipe(r).summary
    report = json.loads((tmp_path / "report" / "continual.json").read_text())
    (sst2_after_sst2, _), (sst2_after_agnews, agnews_after_agnews) = report["matrix"]
    assert [a["group"] for a in report["assignments"]] == ["group_0", "group_1"]
    assert sst2_after_sst2 >= report["base"][0] + 0.25, report  # 6 steps of 8 rows, EMA-replaced at the end
    assert sst2_after_agnews == sst2_after_sst2  # the same greedy completions: frozen adapter, same routing
    assert agnews_after_agnews > report["base"][1], report
    assert summary["bwt"] == 0.0
