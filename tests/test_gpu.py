"""GPU paths (`-m gpu`, skipped without CUDA; CI has no GPU). These caught a real bug: `entropy_summary`
built its quantile tensor on the CPU, so every trainer failed at its first step on a GPU while the whole CPU
suite passed (found on an H100, 2026-11-22)."""

import json
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "grpo"


def test_entropy_summary_on_cuda_matches_cpu():
    from posttrain.algos.entropy import entropy_summary

    x = torch.rand(1000, dtype=torch.float64) * 3
    on_gpu, on_cpu = entropy_summary(x.cuda()), entropy_summary(x)
    assert on_gpu.keys() == on_cpu.keys()
    for key in on_cpu:
        assert float(on_gpu[key]) == pytest.approx(float(on_cpu[key]), rel=1e-9)


def test_seeded_hf_generation_leaves_the_cuda_rng_alone():
    from posttrain.models import load_model, load_tokenizer
    from posttrain.rollout import HFEngine, SamplingParams

    engine = HFEngine(load_model("tiny-qwen2").cuda(), load_tokenizer("tiny-qwen2"), progress=False)
    torch.cuda.manual_seed(5)
    before = torch.cuda.get_rng_state()
    engine.generate(["What is 1 + 1?"], SamplingParams(temperature=1.0, max_new_tokens=4, seed=11))
    assert torch.equal(torch.cuda.get_rng_state(), before)


def test_eval_runs_on_the_gpu_by_default(tmp_path, monkeypatch):
    """`posttrain eval` (run_eval) places the model on the GPU when one is present (device auto)."""
    from posttrain.eval import api

    seen = {}
    real = api.make_engine

    def spy(kind, model, tokenizer, **kw):
        seen["device"] = next(model.parameters()).device.type
        return real(kind, model, tokenizer, **kw)

    monkeypatch.setattr(api, "make_engine", spy)
    suite = tmp_path / "s.yaml"
    suite.write_text("name: s\nsampling: {n: 1, temperature: 0.0, max_new_tokens: 4}\n"
                     "tasks:\n  - {name: add, task: arithmetic, split: test}\n")
    api.run_eval("tiny-qwen2", suite, tmp_path / "out", limit=2, progress=False)
    assert seen["device"] == "cuda"


@pytest.mark.parametrize("method", ["grpo", "steer", "epo", "dcpo", "bnpo", "qae", "clip_cov", "epo_guessing"])
def test_each_trainer_trains_on_cuda(method, tmp_path):
    from posttrain.recipe import load_recipe
    from posttrain.train import run_recipe

    recipe = load_recipe(RECIPES / f"{method}.yaml", ["model.name_or_path=tiny-qwen2", "trainer.max_steps=2",
                                                      "eval.limit=4", f"output_dir={tmp_path}"])
    result = run_recipe(recipe)
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert any("entropy/mean" in h for h in state["log_history"])
    assert 0 <= result.summary.get("accuracy_after", 0) <= 1
    # perf/ on CUDA: the allocator's peaks, and MFU where the GPU's peak FLOP/s is known
    from posttrain.trainers.perf import peak_flops

    logged = [h for h in state["log_history"] if "perf/step_seconds" in h]
    assert logged and all(0 < h["perf/peak_memory_gb"] <= h["perf/peak_reserved_gb"] for h in logged)
    if peak_flops() is not None:
        assert all(0 < h["perf/mfu"] < 1 for h in logged)
