"""EvalCallback: metrics in the log history during a few GRPO steps, entropy-collapse warnings, the recipe wiring."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from posttrain.eval.callback import EntropyCollapseWarning, EvalCallback
from posttrain.recipe import load_recipe
from posttrain.train import run_recipe

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "grpo" / "grpo.yaml"
SUITE = """
name: track
sampling: {n: 2, temperature: 1.0, max_new_tokens: 6}
tasks:
  - {name: add, task: arithmetic, split: test, options: {min_value: 1, max_value: 20}}
"""


def _state(step: int = 0, history=None):
    return SimpleNamespace(global_step=step, log_history=history if history is not None else [],
                           is_world_process_zero=True)


def test_collapse_warning_on_training_entropy(tmp_path):
    (tmp_path / "s.yaml").write_text(SUITE)
    cb = EvalCallback([tmp_path / "s.yaml"], every_n_steps=5, collapse_fraction=0.5)
    cb.on_log(None, _state(1), None, logs={"entropy/mean": 2.0})
    cb.on_log(None, _state(2), None, logs={"entropy/mean": 1.2})  # 0.6 of the start: fine
    assert cb.collapse == [] and cb.collapse_message() is None
    with pytest.warns(EntropyCollapseWarning, match=r"step 3: train/entropy/mean = 0.9000 fell below 0.5 x"):
        cb.on_log(None, _state(3), None, logs={"entropy/mean": 0.9})
    cb.on_log(None, _state(4), None, logs={"entropy/mean": 0.1})  # warned once per source
    assert len(cb.collapse) == 1 and cb.collapse[0]["step"] == 3
    assert "train/entropy/mean fell to 0.900 (< 0.5 x 2.000) at step 3" in cb.collapse_message()


def test_eval_metrics_merge_into_the_step_entry(tmp_path, scripted_engine):
    (tmp_path / "s.yaml").write_text("""
name: toy
sampling: {n: 2, temperature: 1.0, max_new_tokens: 4}
tasks:
  - {name: add, task: arithmetic, path: %s, prompt_format: plain}
""" % (tmp_path / "d.jsonl"))
    (tmp_path / "d.jsonl").write_text("".join(
        json.dumps({"question": f"#{i} What is {i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(4)))
    engine = scripted_engine(entropy=2.0)
    cb = EvalCallback([tmp_path / "s.yaml"], every_n_steps=2, engine=engine, output_dir=tmp_path / "o")
    state, control = _state(0), SimpleNamespace(should_log=False)
    cb.on_train_begin(None, state, control, model=None)
    assert state.log_history[0]["eval/add/accuracy"] == 0.5 and state.log_history[0]["step"] == 0
    state.global_step = 1
    cb.on_step_end(None, state, control)
    assert engine.n_prompts == 4 and not control.should_log  # not an evaluation step
    state.global_step = 2
    engine.entropy = 0.5  # the policy's entropy fell to a quarter
    with pytest.warns(EntropyCollapseWarning, match="eval/entropy/mean"):
        cb.on_step_end(None, state, control)
    assert control.should_log
    state.log_history.append({"loss": 0.1, "step": 2})  # what Trainer.log appends before on_log
    logs = {"loss": 0.1}
    cb.on_log(None, state, control, logs=logs)
    assert state.log_history[-1]["eval/add/accuracy"] == 0.5 and state.log_history[-1]["loss"] == 0.1
    assert logs["eval/add/entropy/mean"] == pytest.approx(0.5)
    assert (tmp_path / "o" / "step_2" / "toy" / "samples_add.jsonl").is_file()
    assert [h["step"] for h in cb.summary()["evaluations"]] == [0, 2]


def test_grpo_run_logs_eval_metrics_and_reports(tmp_path, monkeypatch):
    import posttrain.eval.callback as callback

    suite = tmp_path / "track.yaml"
    suite.write_text(SUITE)
    monkeypatch.setattr(callback.EvalCallback, "collapse_message", lambda self: "eval/entropy/mean fell (test)")
    r = load_recipe(RECIPE, ["model.name_or_path=tiny-qwen2", "model.peft=null", "trainer.max_steps=2",
                             f"output_dir={tmp_path / 'run'}", "eval.before=false", "eval.after=false",
                             "rollout.max_new_tokens=6", "rollout.num_generations=2",
                             "trainer.per_device_train_batch_size=4", f"eval.suites=[{suite}]",
                             "eval.every_n_steps=1", "eval.limit=2"])
    result = run_recipe(r)
    history = json.loads((tmp_path / "run" / "trainer_state.json").read_text())["log_history"]
    evals = [h for h in history if "eval/add/accuracy" in h]
    assert [h["step"] for h in evals] == [0, 1, 2]
    assert "reward" in evals[1] and "entropy/mean" in evals[1]  # merged into the training step's entry
    assert all(0 <= h["eval/add/accuracy"] <= 1 and h["eval/add/entropy/mean"] > 0 for h in evals)
    summary = result.summary
    assert [e["step"] for e in summary["eval_during_training"]["evaluations"]] == [0, 1, 2]
    assert "Entropy collapse warning" in (result.report_dir / "README.md").read_text()
    assert (result.report_dir / "eval_during_training" / "step_2" / "track" / "samples_add.jsonl").is_file()


def test_collapse_reference_survives_a_resume(tmp_path):
    """A run resumed from a checkpoint keeps the eval callback's entropy reference and events (saved with the
    method state): before, a resumed run took its first post-resume entropy as the new reference and missed the
    collapse."""
    suite = tmp_path / "track.yaml"
    suite.write_text(SUITE)
    overrides = ["model.name_or_path=tiny-qwen2", "model.peft=null", f"output_dir={tmp_path / 'run'}",
                 "eval.before=false", "eval.after=false", "rollout.max_new_tokens=6", "rollout.num_generations=2",
                 "trainer.per_device_train_batch_size=4", f"eval.suites=[{suite}]", "eval.every_n_steps=1",
                 "eval.limit=2", "trainer.save_strategy=steps", "trainer.save_steps=1"]
    first = run_recipe(load_recipe(RECIPE, [*overrides, "trainer.max_steps=1"])).summary
    saved = json.loads((tmp_path / "run" / "checkpoint-1" / "posttrain_state.json").read_text())["eval_callback"]
    assert saved["reference"] and [h["step"] for h in saved["history"]] == [0, 1]
    resumed = run_recipe(load_recipe(RECIPE, [*overrides, "trainer.max_steps=2"]),
                         resume=str(tmp_path / "run" / "checkpoint-1")).summary
    history = resumed["eval_during_training"]["evaluations"]
    assert [h["step"] for h in history] == [0, 1, 2]  # the steps before the resume are kept
    assert history[:2] == first["eval_during_training"]["evaluations"]
    final = json.loads((tmp_path / "run" / "checkpoint-2" / "posttrain_state.json").read_text())["eval_callback"]
    assert final["reference"] == saved["reference"]  # the first run's reference, not a post-resume value
