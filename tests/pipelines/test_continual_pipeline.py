"""The `continual` pipeline end to end on the tiny model: the contract's report, every method of recipes/continual,
resume mid-sequence equal to an uninterrupted run, `posttrain eval` routing a continual checkpoint, and the data and
recipe errors that must come before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.recipe import RecipeError, load_recipe
from posttrain.train import run_recipe

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "continual"
TASKS = ["sst2", "agnews", "amazon"]


def _overrides(shared_data: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.path={shared_data / 'continual'}", f"output_dir={out}", "data.train_limit=12", "data.test_limit=3",
            "trainer.max_steps=2", "trainer.per_device_train_batch_size=4", "eval.batch_size=4", *extra]


def _tiny(shared_data: Path, out: Path, *extra: str, recipe: str = "tiny.yaml"):
    return load_recipe(RECIPES / recipe, _overrides(shared_data, out, *extra))


def _adapters(folder: Path) -> dict[str, torch.Tensor]:
    return {f"{g.name}/{k}": v for g in sorted(folder.glob("group_*")) for k, v in
            load_file(g / "adapter_model.safetensors").items()}


@pytest.fixture(scope="module")
def tiny_run(shared_data, tmp_path_factory):
    """One run of recipes/continual/tiny.yaml (3 tasks, 2 steps each), shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("tiny_run")
    return out, run_recipe(_tiny(shared_data, out))


def test_contract_report_and_checkpoints(tiny_run):
    tmp_path, result = tiny_run
    report = json.loads((tmp_path / "report" / "continual.json").read_text())
    assert report["tasks"] == TASKS and report["stages"] == TASKS
    matrix = report["matrix"]
    assert len(matrix) == 3 and all(len(row) == 3 and all(0 <= v <= 1 for v in row) for row in matrix)
    for key in ("acc", "bwt", "fwt", "forgetting", "forgetting_mean", "base"):
        assert key in report
    assert report["acc"] == pytest.approx(sum(matrix[-1]) / 3)
    assert report["bwt"] == pytest.approx(((matrix[2][0] - matrix[0][0]) + (matrix[2][1] - matrix[1][1])) / 2)
    stability = report["stability"]
    assert len(stability["min_acc"]) == 3 and stability["min_acc"][0] is None
    # within-stage evaluations every step (not at the last step): stage 1 evaluates sst2, stage 2 sst2 and agnews
    evals = stability["evaluations"]
    assert [(e["stage"], e["step"]) for e in evals] == [(1, 1), (2, 1)]
    assert evals[0]["accuracy"][0] is not None and evals[0]["accuracy"][1:] == [None, None]
    # amazon shares sst2's sentiment instruction: it retrains group_0; agnews opened group_1 (warm-started)
    assert [(a["name"], a["group"], a["created"]) for a in report["assignments"]] == [
        ("sst2", "group_0", True), ("agnews", "group_1", True), ("amazon", "group_0", False)]
    assert report["groups"]["groups"][0]["tasks"] == ["sst2", "amazon"]
    for png in ("accuracy_matrix.png", "stability_gap.png"):
        assert (tmp_path / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    final = tmp_path / "stage2_amazon"
    assert sorted(p.name for p in final.glob("group_*")) == ["group_0", "group_1"]
    assert json.loads((final / "codebook.json").read_text())["groups"][1]["tasks"] == ["agnews"]
    # agnews' adapter is frozen while amazon retrains group_0: it is bit-identical after stage 2
    after_agnews, after_amazon = _adapters(tmp_path / "stage1_agnews"), _adapters(final)
    assert all(torch.equal(v, after_amazon[k]) for k, v in after_agnews.items() if k.startswith("group_1/"))
    assert not all(torch.equal(v, after_amazon[k]) for k, v in after_agnews.items() if k.startswith("group_0/"))
    assert result.summary["groups"] == 2 and result.summary["steps"] == 6
    logged = [json.loads(line) for line in (tmp_path / "report" / "metrics.jsonl").read_text().splitlines()]
    assert {h["stage"] for h in logged if h.get("perf/step_seconds", 0) > 0} == {0, 1, 2}  # every stage's speed
    assert (tmp_path / "report" / "README.md").read_text().count("| after |") == 1


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["seq_lora.yaml", "fixed_ema.yaml", "ilora.yaml", "replay.yaml", "multitask.yaml"])
def test_every_method_runs_the_tiny_sequence(shared_data, tmp_path, recipe):
    overrides = ["model.name_or_path=tiny-qwen2", "model.peft.r=4", "data.tasks=[sst2,agnews,amazon]",
                 "eval.max_new_tokens=3"]
    run_recipe(_tiny(shared_data, tmp_path, *overrides, recipe=recipe))
    report = json.loads((tmp_path / "report" / "continual.json").read_text())
    joint = recipe == "multitask.yaml"
    assert len(report["matrix"]) == (1 if joint else 3) and report["tasks"] == TASKS
    assert (report["bwt"] is None) == joint
    if recipe in ("seq_lora.yaml", "ilora.yaml", "replay.yaml"):
        assert {a["group"] for a in report["assignments"]} == {"group_0"}
    history = [h for h in json.loads((tmp_path / "progress.json").read_text())["stages"][-1]["log_history"]
               if "loss" in h]
    if recipe == "ilora.yaml":
        assert all("consistency" in h for h in history)  # replayed rows in the last stage
        assert (tmp_path / "stage2_amazon" / "sequence_state" / "posttrain_state.safetensors").is_file()
    if recipe == "fixed_ema.yaml":
        assert all(h["ema/weight_mean"] == pytest.approx(0.1) for h in history[1:])


def _interrupt_at(monkeypatch, stage: str, step: int) -> None:
    """Make the trainer of `stage` raise in the optimizer step after `step` (checkpoint-<step> exists by then)."""
    from posttrain.trainers.continual import ContinualTrainer

    original = ContinualTrainer.training_step

    def training_step(self, *args, **kwargs):
        if self.args.output_dir.endswith(stage) and self.state.global_step == step:
            raise KeyboardInterrupt("simulated crash")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ContinualTrainer, "training_step", training_step)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["tiny.yaml", "ilora.yaml"])
def test_resume_mid_sequence_equals_an_uninterrupted_run(shared_data, tmp_path, monkeypatch, recipe):
    extra = ["model.name_or_path=tiny-qwen2", "model.peft.r=4", "data.tasks=[sst2,agnews,amazon]",
             "trainer.max_steps=3", "trainer.save_strategy=steps", "trainer.save_steps=1", "eval.every_n_steps=1",
             "eval.max_new_tokens=3"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_recipe(_tiny(shared_data, full, *extra, recipe=recipe))
    with monkeypatch.context() as m:
        _interrupt_at(m, "stage1_agnews", 2)
        with pytest.raises(KeyboardInterrupt):
            run_recipe(_tiny(shared_data, cut, *extra, recipe=recipe))
    assert (cut / "stage1_agnews" / "checkpoint-2").is_dir() and not (cut / "stage2_amazon").exists()
    run_recipe(_tiny(shared_data, cut, *extra, recipe=recipe), resume=True)
    for stage in ("stage0_sst2", "stage1_agnews", "stage2_amazon"):
        a, b = _adapters(full / stage), _adapters(cut / stage)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), stage
    ra, rb = (json.loads((d / "report" / "continual.json").read_text()) for d in (full, cut))
    for key in ("matrix", "base", "acc", "bwt", "fwt", "forgetting", "assignments"):
        assert ra[key] == rb[key], key
    assert ra["stability"]["evaluations"] == rb["stability"]["evaluations"]
    pa, pb = (json.loads((d / "progress.json").read_text())["stages"] for d in (full, cut))
    losses = [[h["loss"] for h in s["log_history"] if "loss" in h] for s in pa]
    assert losses == [[h["loss"] for h in s["log_history"] if "loss" in h] for s in pb]


def test_posttrain_eval_routes_a_continual_checkpoint(tiny_run, tmp_path):
    from posttrain.eval.api import run_eval

    run, _ = tiny_run
    results = run_eval("tiny-qwen2", run / "continual_suite.yaml", tmp_path / "ev", adapter=str(run / "stage2_amazon"),
                       batch_size=4, progress=False)
    routing = results["model"]["routing"]
    assert routing == {"group_0": 6, "group_1": 3}  # sst2 and amazon prompts -> group_0, agnews -> group_1
    report = json.loads((run / "report" / "continual.json").read_text())
    # the same prompts, adapters and routing as the pipeline's own evaluation after the last stage
    assert [results["tasks"][t]["metrics"]["accuracy"] for t in TASKS] == report["matrix"][-1]
    for task in TASKS:
        ours = [json.loads(x)["completions"] for x in (tmp_path / "ev" / f"samples_{task}.jsonl").open()]
        theirs = [json.loads(x)["completions"] for x in
                  (run / "report" / "stages" / "stage2_amazon" / f"samples_{task}.jsonl").open()]
        assert ours == theirs, task


# --- errors before the model loads -------------------------------------------------------------------------------


@pytest.fixture
def no_model_load(monkeypatch):
    import posttrain.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("model loaded before validation"))


def test_bad_task_data_is_named_with_file_and_row(tmp_path, no_model_load):
    good = tmp_path / "data" / "good"
    good.mkdir(parents=True)
    (good / "labels.json").write_text('["yes", "no"]')
    (good / "train.jsonl").write_text('{"sentence": "a", "label": "yes"}\n{"sentence": "b", "label": "maybe"}\n')
    (good / "test.jsonl").write_text('{"sentence": "c", "label": "no"}\n')
    base = [f"data.path={tmp_path / 'data'}", f"output_dir={tmp_path / 'out'}"]
    r = load_recipe(RECIPES / "tiny.yaml", [*base, "data.tasks=[good]"])
    with pytest.raises(ValueError, match=r"data.tasks\[0\] \(good\): .*train.jsonl:2: label 'maybe' is not one of"):
        run_recipe(r)
    r = load_recipe(RECIPES / "tiny.yaml", [*base, "data.tasks=[missing]"])
    with pytest.raises(FileNotFoundError, match=r"data.tasks\[0\] \(missing\): no data file .* at .*data/missing"):
        run_recipe(r)


@pytest.mark.parametrize("overrides, message", [
    (["data.tasks=[]"], "data.tasks: list at least one task"),
    (["data.tasks=[sst2,sst2]"], "task 'sst2' is listed twice"),
    (["data.path=null"], r"data.tasks\[0\] \(sst2\): no data"),
    (["method=sft"], "data.schedule: method 'sft' trains one stage"),
    (["model.peft=null"], "trainer.expand_threshold: adapter groups need LoRA"),
    (["trainer.deepspeed=ds.json"], "trainer.deepspeed: the EMA hook needs each tensor's full gradient"),
    (["trainer.fsdp=full_shard", "trainer.ema=none"], "trainer.fsdp: fsdp shards the parameters over ranks, but the "
                                                      "continual runner evaluates every task after each stage"),
    (["trainer.deepspeed={zero_optimization: {stage: 3}}", "trainer.ema=none"], "trainer.deepspeed: zero3 shards"),
    (["trainer.ema=none", "trainer.ema_output=slow"], "trainer.ema_output: 'slow' outputs the EMA"),
    (["trainer.consistency_weight=1.0"], "trainer.consistency_weight: needs a replay buffer"),
    (["trainer.ema=sometimes"], r"trainer.ema: expected one of 'dynamic', 'fixed', 'none'"),
    (["eval.every_n_steps=0"], "eval.every_n_steps: must be >= 1"),
    (["data.schedule=mixed"], "data.schedule: expected one of 'sequential', 'joint'"),
    (["rollout.max_new_tokens=8"], "does not read a rollout section"),
])
def test_recipe_problems_name_their_key(tmp_path, overrides, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(RECIPES / "tiny.yaml", [f"output_dir={tmp_path}", "data.path=x", *overrides])


def test_a_sharded_accelerate_launch_is_refused_when_the_recipe_loads(tmp_path, monkeypatch):
    """`accelerate launch --config_file launch/accelerate/fsdp2.yaml` shards through the environment, not the recipe;
    one-stage SFT evaluates and saves on the main process too."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for recipe in ("tiny.yaml", "multitask.yaml"):
        with pytest.raises(RecipeError, match="the accelerate launch config: fsdp shards the parameters"):
            load_recipe(RECIPES / recipe, [f"output_dir={tmp_path}", "data.path=x", "trainer.ema=none"]
                        if recipe == "tiny.yaml" else [f"output_dir={tmp_path}", "data.path=x"])


def test_the_ema_under_a_deepspeed_accelerate_launch_is_refused_when_the_recipe_loads(tmp_path, monkeypatch):
    """`accelerate launch --config_file launch/accelerate/zero2.yaml` (ZeRO-2: the weights stay whole, the gradients
    are partitioned) reaches the recipe through the environment; without the EMA it trains."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    with pytest.raises(RecipeError, match=r"the accelerate launch config \(DeepSpeed\): the EMA hook needs"):
        load_recipe(RECIPES / "tiny.yaml", [f"output_dir={tmp_path}", "data.path=x"])
    assert load_recipe(RECIPES / "tiny.yaml", [f"output_dir={tmp_path}", "data.path=x", "trainer.ema=none"])


def test_sft_is_the_one_stage_case(tmp_path):
    r = load_recipe(RECIPES / "multitask.yaml", [f"output_dir={tmp_path}", "data.path=x"])
    assert r.method == "sft" and r.data.schedule == "joint"
    with pytest.raises(RecipeError, match="unknown key 'trainer.ema'"):
        load_recipe(RECIPES / "multitask.yaml", [f"output_dir={tmp_path}", "data.path=x", "trainer.ema=dynamic"])


def test_retention_suite_before_and_after_with_kl_from_the_base(shared_data, tmp_path):
    suite = tmp_path / "retention_small.yaml"
    suite.write_text("name: retention_small\nsampling: {n: 1, temperature: 0.0, max_new_tokens: 3}\ntasks:\n"
                     "  - {name: sst2, task: classification, path: continual/sst2, kl_to_base: true}\n")
    out = tmp_path / "run"
    run_recipe(_tiny(shared_data, out, "data.tasks=[sst2,agnews]", "trainer.max_steps=1", "eval.every_n_steps=null",
                     f"eval.retention={suite}", f"eval.retention_data_dir={shared_data}", "eval.retention_limit=2"))
    retention = json.loads((out / "report" / "continual.json").read_text())["retention"]
    assert set(retention) == {"before", "after"}
    assert retention["before"]["sst2"]["kl_base"] is None  # the base model: no adapter to compare with
    assert retention["after"]["sst2"]["kl_base"] > 0  # the trained adapters moved the policy
    assert 0 <= retention["after"]["sst2"]["accuracy"] <= 1
    assert (out / "report" / "retention_after" / "samples_sst2.jsonl").is_file()
