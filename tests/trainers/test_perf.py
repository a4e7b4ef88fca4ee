"""posttrain.trainers.perf: the `perf/` log keys (step time, tokens/s, MFU, peak memory) and their run summary."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from posttrain.trainers import perf
from posttrain.trainers.perf import PerfCallback, describe_perf, matmul_params, peak_flops, perf_summary


def _lm(tied: bool) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=50, tie_word_embeddings=tied)
    return Qwen2ForCausalLM(config)


@pytest.mark.parametrize("tied", [True, False])
def test_matmul_params_drop_an_untied_input_embedding_only(tied):
    model = _lm(tied)
    total = sum(p.numel() for p in model.parameters())  # tied weights appear once in parameters()
    assert matmul_params(model) == (total if tied else total - 50 * 16)
    assert matmul_params(torch.nn.Linear(3, 4)) == 16  # no embeddings at all


def test_matmul_params_of_a_model_that_cannot_name_its_embeddings():
    """transformers raises NotImplementedError from get_input_embeddings for a model class that does not define it
    (the reward ensemble's heads over features): every parameter counts, and training goes on."""

    class Heads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = torch.nn.Linear(8, 3)

        def get_input_embeddings(self):
            raise NotImplementedError("not auto-handled")

        def get_output_embeddings(self):
            raise NotImplementedError("not auto-handled")

    assert matmul_params(Heads()) == 27


def test_peak_flops_by_device_name_or_environment(monkeypatch):
    monkeypatch.delenv("POSTTRAIN_PEAK_TFLOPS", raising=False)
    assert peak_flops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4e12)
    assert peak_flops("NVIDIA H100 PCIe") == pytest.approx(756e12)
    assert peak_flops("NVIDIA H200") == pytest.approx(989.4e12)
    assert peak_flops("NVIDIA A10G") == pytest.approx(70e12) and peak_flops("NVIDIA A10") == pytest.approx(125e12)
    assert peak_flops("Some Future GPU") is None
    if not torch.cuda.is_available():
        assert peak_flops() is None  # the CPU: no MFU
    monkeypatch.setenv("POSTTRAIN_PEAK_TFLOPS", "100")
    assert peak_flops("Some Future GPU") == pytest.approx(1e14)


def test_callback_times_steps_counts_tokens_and_computes_mfu(monkeypatch):
    """Two windows of steps with known durations and token counts: the logged figures are exactly those."""
    clock = iter([0.0, 2.0, 10.0, 14.0, 20.0, 23.0, 30.0, 31.0, 40.0, 42.0])  # (begin, end) of five steps
    monkeypatch.setattr(perf.time, "perf_counter", lambda: next(clock))
    cb = PerfCallback(flops_per_token=6.0 * 1000, peak=1e9)
    args = SimpleNamespace(world_size=2)
    state = SimpleNamespace(num_input_tokens_seen=0, global_step=0, log_history=[])
    cb.on_train_begin(args, state, None)
    logs_seen = []
    for tokens, log_now in ((100, False), (300, True), (350, False), (400, False), (700, True)):
        cb.on_step_begin(args, state, None)
        state.num_input_tokens_seen += tokens
        state.global_step += 1
        cb.on_step_end(args, state, None)
        if log_now:
            logs = {"loss": 1.0}
            state.log_history.append({**logs, "step": state.global_step})
            cb.on_log(args, state, None, logs=logs)
            logs_seen.append(logs)
    first, second = logs_seen
    assert first["perf/step_seconds"] == pytest.approx(3.0)  # (2 + 4) / 2: the gaps between steps are not counted
    assert first["perf/tokens_per_second"] == pytest.approx(400 / 6)
    assert first["perf/mfu"] == pytest.approx(6000 * 400 / (6 * 2 * 1e9))
    assert second["perf/step_seconds"] == pytest.approx(2.0)  # (3 + 1 + 2) / 3
    assert second["perf/tokens_per_second"] == pytest.approx(1450 / 6)
    assert second["perf/peak_memory_gb"] > 0
    assert state.log_history[-1]["perf/step_seconds"] == second["perf/step_seconds"]  # the history has them too
    # a log with no step since the last one (the end-of-training summary) gets nothing
    summary = {"train_runtime": 1.0}
    cb.on_log(args, state, None, logs=summary)
    assert summary == {"train_runtime": 1.0}


def test_no_tokens_no_mfu_and_no_peak_no_mfu(monkeypatch):
    clock = iter([0.0, 1.0, 1.0, 2.0])
    monkeypatch.setattr(perf.time, "perf_counter", lambda: next(clock))
    state = SimpleNamespace(num_input_tokens_seen=0, global_step=1, log_history=[])
    cb = PerfCallback(flops_per_token=6.0, peak=1e9)
    cb.on_train_begin(SimpleNamespace(world_size=1), state, None)
    cb.on_step_begin(None, state, None)
    cb.on_step_end(None, state, None)
    logs: dict = {}
    cb.on_log(SimpleNamespace(world_size=1), state, None, logs=logs)
    assert "perf/step_seconds" in logs and "perf/tokens_per_second" not in logs and "perf/mfu" not in logs
    cb = PerfCallback(flops_per_token=6.0, peak=None)  # the CPU: tokens/s but no MFU
    cb.on_step_begin(None, state, None)
    state.num_input_tokens_seen = 10
    cb.on_step_end(None, state, None)
    logs = {}
    cb.on_log(SimpleNamespace(world_size=1), state, None, logs=logs)
    assert logs["perf/tokens_per_second"] == pytest.approx(10.0) and "perf/mfu" not in logs


def test_summary_drops_the_first_window_and_keeps_the_peak():
    history = [{"perf/step_seconds": 30.0, "perf/tokens_per_second": 10.0, "perf/peak_memory_gb": 5.0},
               {"loss": 1.0},
               {"perf/step_seconds": 2.0, "perf/tokens_per_second": 100.0, "perf/peak_memory_gb": 6.0},
               {"perf/step_seconds": 4.0, "perf/tokens_per_second": 120.0, "perf/peak_memory_gb": 5.5}]
    s = perf_summary(history)
    assert s == {"median_step_seconds": 3.0, "median_tokens_per_second": 110.0, "peak_memory_gb": 6.0}
    assert perf_summary(history[:1])["median_step_seconds"] == 30.0 and perf_summary([{"loss": 1}]) == {}
    assert describe_perf({**s, "median_mfu": 0.3123, "peak_reserved_gb": 7.0}) == (
        "Median step 3.00 s, 110 tokens/s, MFU 31.2%; peak memory 6.00 GB (7.00 GB reserved).")
