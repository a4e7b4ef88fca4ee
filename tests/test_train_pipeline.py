"""`posttrain train` end to end on the tiny model: every recipe runs with the contract overrides, and the
quickstart pipeline writes its report (the SmolLM2 run itself is slow-marked)."""

import json
from pathlib import Path

import pytest

from posttrain.recipe import load_recipe
from posttrain.train import run_recipe

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
QUICKSTART = RECIPES_DIR / "quickstart.yaml"
RECIPES = sorted(p for p in (Path(__file__).resolve().parents[1] / "recipes").rglob("*.yaml"))
TRACKED = ["entropy/mean", "entropy/p50", "entropy/p95", "entropy/top20_mean",
           "groups/frac_all_correct", "groups/frac_all_wrong", "groups/unique_answers"]


HUB_TASKS = {"gsm8k", "math500", "aime24", "amc23"}


def _grpo_smoke(recipe, tmp_path, request) -> list[str]:
    """GPU-scale recipes run with the hf engine and, for Hub datasets, the local copies in ../shared/data."""
    overrides = ["eval.before=false", "eval.after=false", "rollout.max_new_tokens=8", "rollout.engine=hf"]
    if recipe.data.train.task in HUB_TASKS:
        bench = request.getfixturevalue("benchmarks_dir")  # skips when ../shared/data is absent
        overrides += [f"data.train.path={bench}", "data.train.limit=16", "trainer.per_device_train_batch_size=8",
                      "trainer.gradient_accumulation_steps=1"]
    return overrides


def _dpo_smoke(recipe, tmp_path, request) -> list[str]:
    """Pairs built from a task: a small build of the same settings; Hub pairs (GPU recipes): 8 local pairs."""
    train = recipe.data.train
    if train.build is not None:
        return ["eval.before=false", "eval.after=false", f"data.train.path={tmp_path / 'pairs' / 'train.jsonl'}", "data.train.build.num_prompts=4",
                "data.train.build.n=3", "data.train.build.max_new_tokens=8"]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"What is {i} + 1?"}],
                                         "chosen": [{"role": "assistant", "content": f"{i + 1}"}],
                                         "rejected": [{"role": "assistant", "content": f"{i + 5}, I think"}]}) + "\n"
                             for i in range(8)))
    return ["eval.before=false", "eval.after=false", f"data.train={{path: {pairs}}}",
            "trainer.per_device_train_batch_size=4",
            "trainer.gradient_accumulation_steps=1"]


def _reward_smoke(recipe, tmp_path, request) -> list[str]:
    """Training pairs are built from the tiny model on first use, then cached; no held-out pairs."""
    return ["data.eval=null"]


def _continual_smoke(recipe, tmp_path, request) -> list[str]:
    """The task folders of the continual benchmark, a few rows each, float32 and no checkpoints on CPU (and one
    torch thread: the tiny model trains and evaluates once per stage, faster without threads spin-waiting)."""
    import torch

    data = request.getfixturevalue("shared_data") / "continual"  # skips when ../shared/data is absent
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    return [f"data.path={data}", "data.train_limit=4", "data.test_limit=2", "trainer.per_device_train_batch_size=2",
            "model.dtype=float32", "trainer.save_strategy='no'", "eval.every_n_steps=null", "eval.base=false",
            "eval.retention=null", "eval.max_new_tokens=2", "eval.batch_size=8"]


def _trained_one_step(tmp_path, result) -> None:
    states = sorted(tmp_path.rglob("trainer_state.json"))  # one per trained model: an ensemble has one per member
    assert states and all(json.loads(s.read_text())["global_step"] == 1 for s in states)
    assert result.summary["steps"] == 1


def _continual_check(tmp_path, result) -> None:
    report = json.loads((tmp_path / "report" / "continual.json").read_text())
    for folder in report["stage_folders"]:
        assert json.loads((tmp_path / folder / "trainer_state.json").read_text())["global_step"] == 1, folder
    assert result.summary["steps"] == len(report["stages"]) and report["matrix"] and "acc" in report


# Each kind's extra smoke overrides and its check of what the one-step run wrote.
SMOKE = {"grpo": (_grpo_smoke, _trained_one_step), "dpo": (_dpo_smoke, _trained_one_step),
         "reward": (_reward_smoke, _trained_one_step), "continual": (_continual_smoke, _continual_check)}


def _params(recipes):
    """Each recipe, slow-marked when its smoke run is long: a continual sequence of more than 5 stages."""
    for p in recipes:
        r = load_recipe(p)
        long = getattr(r.data, "schedule", None) == "sequential" and len(r.data.tasks) > 5
        yield pytest.param(p, marks=pytest.mark.slow) if long else p


@pytest.mark.parametrize("recipe", list(_params(RECIPES)), ids=lambda p: str(p.relative_to(p.parents[1])))
def test_every_recipe_runs_on_tiny_model(recipe, tmp_path, request):
    """The contract: any recipe runs on CPU with the tiny model and `trainer.max_steps`/`output_dir` overrides
    (per stage for the continual kind), plus what its kind needs for a few-second run (`SMOKE`)."""
    from posttrain.methods import get_method

    plain = load_recipe(recipe)
    smoke, check = SMOKE[get_method(plain.method).kind]
    overrides = ["model.name_or_path=tiny-qwen2", "trainer.max_steps=1", f"output_dir={tmp_path}",
                 *smoke(plain, tmp_path, request)]
    for i, reward in enumerate(plain.rewards):
        if reward.name == "rm_ensemble":  # a reward-model ensemble to score with: a tiny one, trained once
            from tests.trainers.reward_setting import trained_ensemble

            overrides.append(f"rewards.{i}.options.path={trained_ensemble('heads')}")
    r = load_recipe(recipe, overrides)
    result = run_recipe(r)
    check(tmp_path, result)
    assert (tmp_path / "recipe.yaml").is_file()
    assert load_recipe(tmp_path / "recipe.yaml") == r  # the saved resolved recipe round-trips


def test_quickstart_pipeline_on_tiny_model(tmp_path):
    r = load_recipe(QUICKSTART,
                    ["model.name_or_path=tiny-qwen2", "trainer.max_steps=2", "eval.limit=5",
                     "rollout.max_new_tokens=12", f"output_dir={tmp_path}"])
    result = run_recipe(r)
    report = tmp_path / "report"
    summary = json.loads((report / "summary.json").read_text())
    for key in ("accuracy_before", "accuracy_after", "n_eval", "train_minutes"):
        assert key in summary, key
    assert summary["n_eval"] == 5 and summary["steps"] == 2
    assert 0 <= summary["accuracy_before"] <= 1 and 0 <= summary["accuracy_after"] <= 1
    before = [json.loads(line) for line in (report / "samples_before.jsonl").read_text().splitlines()]
    assert len(before) == 5 and all(len(s["completions"]) == 1 for s in before)
    # The summary's accuracy is the mean of the per-sample scores it wrote.
    assert summary["accuracy_before"] == pytest.approx(sum(s["scores"][0] for s in before) / 5)
    png = (report / "training_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    steps = [json.loads(line) for line in (report / "metrics.jsonl").read_text().splitlines()]
    assert all(k in steps[0] for k in TRACKED)
    history = json.loads((tmp_path / "trainer_state.json").read_text())["log_history"]
    assert all(k in history[0] for k in TRACKED)
    # perf/: each logged step's time, tokens/s (the tokens TRL counted in that step) and peak memory; no MFU on CPU
    logged = [h for h in steps if "reward" in h]
    tokens = [0] + [h["num_tokens"] for h in logged]
    assert len(logged) == 2
    for i, h in enumerate(logged):
        assert h["perf/step_seconds"] > 0 and h["perf/peak_memory_gb"] > 0.1 and "perf/mfu" not in h
        seen = h["perf/tokens_per_second"] * h["perf/step_seconds"]  # one step a log in the quickstart
        assert seen == pytest.approx(tokens[i + 1] - tokens[i], rel=1e-6)
    assert summary["perf"]["peak_memory_gb"] == max(h["perf/peak_memory_gb"] for h in logged)
    assert "Median step" in (report / "README.md").read_text()
    assert summary["launch"] == {"processes": 1, "distributed_type": "NO", "zero_stage": None, "sharding": None,
                                 "offload": [], "device": "cpu"}
    assert "Launch: 1 process on cpu." in (report / "README.md").read_text()
    assert (tmp_path / "adapter_model.safetensors").is_file()  # the quickstart trains a LoRA adapter
    assert (report / "recipe.yaml").is_file() and "accuracy" in (report / "README.md").read_text()
    assert result.report_dir == report


def test_bad_task_option_fails_before_model_load(tmp_path, monkeypatch):
    import posttrain.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("model loaded before validation"))
    r = load_recipe(QUICKSTART, ["data.train.options.max_valeu=5", f"output_dir={tmp_path}"])
    with pytest.raises(TypeError, match="max_valeu"):
        run_recipe(r)


@pytest.mark.slow
def test_smollm2_quickstart_improves_heldout_accuracy(tmp_path):
    """The real quickstart: GRPO + LoRA on SmolLM2-135M-Instruct raises greedy held-out accuracy.
    Measured gains are about +0.3 (see README); 0.1 is well above the run-to-run spread."""
    r = load_recipe(QUICKSTART, [f"output_dir={tmp_path}"])
    summary = run_recipe(r).summary
    assert summary["n_eval"] == 100
    assert summary["accuracy_after"] >= summary["accuracy_before"] + 0.1, summary


def test_report_to_tensorboard_writes_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    r = load_recipe(RECIPES_DIR / "grpo" / "grpo.yaml",
                    ["model.name_or_path=tiny-qwen2", "trainer.max_steps=1", f"output_dir={tmp_path}",
                     "eval.before=false", "eval.after=false", "rollout.max_new_tokens=6", "trainer.report_to=[tensorboard]"])
    run_recipe(r)
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert "train/entropy/mean" in acc.Tags()["scalars"] and "train/reward" in acc.Tags()["scalars"]
    assert "train/perf/step_seconds" in acc.Tags()["scalars"]  # the perf callback runs before the trackers
