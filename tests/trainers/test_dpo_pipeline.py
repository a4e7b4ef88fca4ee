"""The `dpo` kind end to end on the tiny model: pairs built on first use, row checks before the model loads, the
report (held-out pairs before/after, the PNG, task accuracy), and the issue's contract commands (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.recipe import RecipeError, load_recipe
from posttrain.train import run_recipe

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "dpo"
LOGGED = ["dpo_shift/f", "logps/chosen", "logps/rejected", "rewards/accuracies", "rewards/chosen", "rewards/rejected",
          "rewards/margins"]
# a smaller build and evaluation of the CPU recipes: seconds on the tiny model
SMALL = ["data.train.build.num_prompts=8", "data.train.build.n=3", "data.train.build.max_new_tokens=8",
         "data.eval.build.num_prompts=6", "data.eval.build.n=3", "data.eval.build.max_new_tokens=8", "eval.limit=4",
         "eval.max_new_tokens=8"]


@pytest.fixture
def pair_cache(tmp_path, monkeypatch):
    """A fresh cache (no pair files yet, as on a fresh clone); named models are rebuilt there (tiny: < 1 s)."""
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "pairs"


def test_dpo_shift_builds_pairs_trains_and_reports(tmp_path, pair_cache):
    out = tmp_path / "run"
    r = load_recipe(RECIPES / "dpo_shift.yaml", ["model.name_or_path=tiny-qwen2", "trainer.max_steps=2",
                                                 f"output_dir={out}", *SMALL])
    summary = run_recipe(r).summary
    built = sorted(p.name for p in pair_cache.glob("*.meta.json"))
    assert len(built) == 2 and built[0].startswith("arithmetic-test-") and built[1].startswith("arithmetic-train-")
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    steps = [h for h in history if "loss" in h]
    assert len(steps) == 2 and all(all(k in h for k in LOGGED) for h in steps)
    assert all(h["dpo_shift/f"] == 0.95 for h in steps)
    before, after = summary["pairs_before"], summary["pairs_after"]
    assert before["n_pairs"] == after["n_pairs"] == len((tmp_path / "run" / "report" / "pairs_after.jsonl")
                                                        .read_text().splitlines())
    assert after["logps/chosen"] == pytest.approx(before["logps/chosen"] + after["logps/chosen_change"])
    assert 0 <= after["reward_accuracy"] <= 1 and "reward_accuracy" not in before
    assert summary["n_eval"] == 4 and 0 <= summary["accuracy_before"] <= 1 and 0 <= summary["accuracy_after"] <= 1
    report = out / "report"
    for name in ("pair_logps.png", "training_curves.png", "samples_before.jsonl", "samples_after.jsonl"):
        assert (report / name).is_file(), name
    assert (report / "pair_logps.png").read_bytes()[:4] == b"\x89PNG"
    readme = (report / "README.md").read_text()
    assert "Held-out pairs" in readme and "reward accuracy" in readme and "| before |" in readme
    assert (out / "adapter_model.safetensors").is_file()
    # the dpo recipe shares these pairs: resolving them again reads the cached files, builds nothing
    from posttrain.data.preferences import resolve_preferences

    stamps = {p: p.stat().st_mtime_ns for p in pair_cache.glob("*.jsonl")}
    other = load_recipe(RECIPES / "dpo.yaml", ["model.name_or_path=tiny-qwen2", *SMALL])
    assert {resolve_preferences(other.data.train, "tiny-qwen2"), resolve_preferences(other.data.eval, "tiny-qwen2")} \
        == set(stamps)
    assert {p: p.stat().st_mtime_ns for p in pair_cache.glob("*.jsonl")} == stamps


def test_a_bad_pair_row_is_named_before_the_model_loads(tmp_path, monkeypatch):
    import posttrain.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("model loaded before the data check"))
    path = tmp_path / "pairs.jsonl"
    good = {"prompt": "2+2?", "chosen": "4", "rejected": "5"}
    path.write_text("\n".join(json.dumps(r) for r in (good, good, {**good, "rejected": "4"})) + "\n")
    r = load_recipe(RECIPES / "dpo.yaml", ["model.name_or_path=tiny-qwen2", f"data.train={path}", "data.eval=null",
                                            "data.task=null", f"output_dir={tmp_path / 'out'}"])
    with pytest.raises(ValueError, match=f"{path}:3: 'chosen' and 'rejected' are identical"):
        run_recipe(r)
    assert not (tmp_path / "out").exists()


def test_recipe_sections_of_the_dpo_kind(tmp_path):
    with pytest.raises(RecipeError, match="rewards: method 'dpo_shift' \\(kind 'dpo'\\) does not read a rewards"):
        load_recipe(RECIPES / "dpo_shift.yaml", ["rewards=[accuracy]"])
    with pytest.raises(RecipeError) as err:
        load_recipe(RECIPES / "dpo_shift.yaml", ["trainer.loss_type=[hinge]", "trainer.use_liger_kernel=true",
                                                 "data.train.hub_id=a/b"])
    problems = "\n".join(err.value.problems)
    assert "data.train: give hub_id or path/build, not both" in problems
    assert "trainer.loss_type: DPO-Shift" in problems and "trainer.use_liger_kernel: not supported" in problems
    assert load_recipe(RECIPES / "dpo.yaml", ["data.train=x.jsonl"]).data.train.path == "x.jsonl"


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["dpo_shift.yaml", "dpo.yaml"])
def test_contract_command_on_a_fresh_clone(tmp_path, pair_cache, recipe, capsys):
    """The issue's contract, verbatim: the CPU recipe builds its pairs on first use and logs what it promises."""
    from posttrain.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["train", str(RECIPES / recipe), "model.name_or_path=tiny-qwen2", "trainer.max_steps=2",
              f"output_dir={tmp_path / 'run'}"])
    assert exit_.value.code == 0
    history = json.loads((tmp_path / "run" / "trainer_state.json").read_text())["log_history"]
    keys = ["logps/chosen", "logps/rejected", "rewards/accuracies"] + (["dpo_shift/f"] if "shift" in recipe else [])
    assert all(k in history[0] for k in keys) and ("dpo_shift/f" in history[0]) == ("shift" in recipe)
    assert len(list(pair_cache.glob("*.jsonl"))) == 2


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["dpo.yaml", "dpo_shift_linear.yaml"])
def test_dpo_recipes_train_on_cuda(tmp_path, pair_cache, recipe):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    out = tmp_path / "run"
    summary = run_recipe(load_recipe(RECIPES / recipe, ["model.name_or_path=tiny-qwen2", "trainer.max_steps=2",
                                                        f"output_dir={out}", *SMALL])).summary
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert sum("logps/chosen" in h for h in history) == 2 and "reward_accuracy" in summary["pairs_after"]
