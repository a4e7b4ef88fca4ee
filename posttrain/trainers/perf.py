"""Throughput and memory in every run's logs, for every trainer: `perf/step_seconds`, `perf/tokens_per_second`,
`perf/peak_memory_gb` (and `perf/peak_reserved_gb` on a GPU) and `perf/mfu`.

- step_seconds: the mean wall time of the optimizer steps since the last log, from the start of a step (its
  generation included, for GRPO) to the end of its optimizer update; evaluation and checkpointing between steps are
  not counted.
- tokens_per_second: the tokens the trainer saw in those steps (`TrainerState.num_input_tokens_seen`, over all
  processes: GRPO counts prompt + completion tokens; other trainers count when `include_num_input_tokens_seen` is
  set) over their time.
- peak_memory_gb: this process's peak so far, in GB (1e9 bytes, as `posttrain plan`): the CUDA caching allocator's
  peak allocation on a GPU (and its peak reservation, what nvidia-smi shows less the CUDA context), the resident
  high-water mark on the CPU.
- mfu: model FLOPs utilisation, 6 x N x tokens / (step time x processes x the device's peak dense bf16 FLOP/s),
  with N the parameters that a token's forward multiplies by (every parameter, less an untied input embedding,
  which is a lookup). It counts the trained model's forward and backward only, not generation, a reference model's
  forward or gradient checkpointing's recomputation (the usual convention, so runs stay comparable); with LoRA the
  frozen weights get no weight gradient, so the work done is nearer 4 x N a token. Logged on GPUs whose peak is
  known (`PEAK_BF16_TFLOPS`) or given in POSTTRAIN_PEAK_TFLOPS.
"""

from __future__ import annotations

import os
import time
from typing import Any

from transformers import TrainerCallback

__all__ = ["PEAK_BF16_TFLOPS", "PerfCallback", "attach_perf", "describe_perf", "matmul_params", "peak_flops",
           "perf_summary"]

GB = 1e9
# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, in TFLOP/s; the first name found in
# torch.cuda.get_device_name() wins, so the more specific names come first.
PEAK_BF16_TFLOPS = {
    "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "H200": 989.4, "GH200": 989.4, "B200": 2250.0,
    "A100": 312.0, "L40S": 362.1, "L4": 121.0, "A10G": 70.0, "A10": 125.0,
}


def peak_flops(device_name: str | None = None) -> float | None:
    """The device's peak dense bf16 FLOP/s: POSTTRAIN_PEAK_TFLOPS when set, else from `PEAK_BF16_TFLOPS` by the
    CUDA device's name; None on the CPU or an unknown GPU."""
    if os.environ.get("POSTTRAIN_PEAK_TFLOPS"):
        return float(os.environ["POSTTRAIN_PEAK_TFLOPS"]) * 1e12
    if device_name is None:
        import torch

        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    return next((tflops * 1e12 for name, tflops in PEAK_BF16_TFLOPS.items() if name in device_name), None)


def matmul_params(model: Any) -> int:
    """Parameters a token's forward multiplies by: all of them (tied ones once), less an input embedding that is
    not tied to the output layer (a lookup)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    emb, out = _weight(model, "get_input_embeddings"), _weight(model, "get_output_embeddings")
    if emb is not None and out is not emb:
        total -= emb.numel()
    return total


def _weight(model: Any, getter: str) -> Any:
    """The weight of `model.get_input_embeddings()` / `get_output_embeddings()`, or None where the model has none
    (transformers raises NotImplementedError for a model class that does not say, such as a reward head over
    features)."""
    get = getattr(model, getter, None)
    try:
        module = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None
    return getattr(module, "weight", None)


def _peak_memory() -> dict[str, float]:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {"perf/peak_memory_gb": torch.cuda.max_memory_allocated() / GB,
                "perf/peak_reserved_gb": torch.cuda.max_memory_reserved() / GB}
    try:
        with open("/proc/self/status") as f:  # VmHWM: the resident high-water mark of this process alone
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        return {"perf/peak_memory_gb": kb * 1024 / GB}
    except (OSError, StopIteration):
        import resource

        return {"perf/peak_memory_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB}


class PerfCallback(TrainerCallback):
    """Adds the `perf/` keys to each log (the trainer's log history, the progress bar and the trackers see them).
    `flops_per_token` is 6 x `matmul_params(model)`; the device's peak comes from `peak_flops()`."""

    def __init__(self, flops_per_token: float | None = None, peak: float | None = None) -> None:
        self.flops_per_token, self.peak = flops_per_token, peak
        self._began: float | None = None
        self._seconds = 0.0
        self._steps = 0
        self._tokens_at_log: int | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.flops_per_token is None and model is not None:
            self.flops_per_token = 6.0 * matmul_params(model)
        if self.peak is None:
            self.peak = peak_flops()
        self._tokens_at_log = int(state.num_input_tokens_seen or 0)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._began = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._began is not None:
            self._seconds += time.perf_counter() - self._began
            self._steps += 1
            self._began = None

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs is None or self._steps == 0:
            return
        perf: dict[str, float] = {"perf/step_seconds": self._seconds / self._steps}
        tokens = int(state.num_input_tokens_seen or 0)
        seen = tokens - (self._tokens_at_log or 0)
        if seen > 0 and self._seconds > 0:
            perf["perf/tokens_per_second"] = seen / self._seconds
            if self.peak and self.flops_per_token:
                world = max(int(getattr(args, "world_size", 1) or 1), 1)
                perf["perf/mfu"] = self.flops_per_token * seen / (self._seconds * world * self.peak)
        perf.update(_peak_memory())
        logs.update(perf)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(perf)  # Trainer.log appended its copy of `logs` before the callbacks ran
        self._seconds, self._steps, self._tokens_at_log = 0.0, 0, tokens


def attach_perf(trainer: Any) -> PerfCallback:
    """A PerfCallback as the trainer's first callback, so that the progress bar and the trackers log its keys."""
    callback = PerfCallback()
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback


def perf_summary(log_history: list[dict[str, Any]]) -> dict[str, float]:
    """A run's figures from its logs: the median step time, tokens/s and MFU over the logged windows (the first
    window, which holds start-up work, dropped when there are more), and the peak memory."""
    import statistics

    logged = [h for h in log_history if "perf/step_seconds" in h]
    if not logged:
        return {}
    steady = logged[1:] or logged
    out: dict[str, float] = {}
    for key in ("step_seconds", "tokens_per_second", "mfu"):
        values = [h[f"perf/{key}"] for h in steady if f"perf/{key}" in h]
        if values:
            out[f"median_{key}"] = statistics.median(values)
    for key in ("peak_memory_gb", "peak_reserved_gb"):
        values = [h[f"perf/{key}"] for h in logged if f"perf/{key}" in h]
        if values:
            out[key] = max(values)
    return out


def describe_perf(perf: dict[str, float]) -> str:
    """One line for a run report: 'Median step 11.9 s, 1,234 tokens/s, MFU 31.2%; peak memory 3.4 GB.'"""
    parts = [f"Median step {perf['median_step_seconds']:.2f} s"] if "median_step_seconds" in perf else []
    if "median_tokens_per_second" in perf:
        parts.append(f"{perf['median_tokens_per_second']:,.0f} tokens/s")
    if "median_mfu" in perf:
        parts.append(f"MFU {100 * perf['median_mfu']:.1f}%")
    line = ", ".join(parts)
    if "peak_memory_gb" in perf:
        line += ("; " if line else "") + f"peak memory {perf['peak_memory_gb']:.2f} GB"
        if "peak_reserved_gb" in perf:
            line += f" ({perf['peak_reserved_gb']:.2f} GB reserved)"
    return line + "."
