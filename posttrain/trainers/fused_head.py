"""TRL's fused LM head on the CPU, shared by the GRPO, DPO and SFT (continual) trainers.

TRL 1.16 patches the model's forward with a fused LM head (`trl.trainer.utils.add_fused_lm_head`): the
per-token log-probs (and entropies) are computed in chunks from the hidden states, without building the
[rows, T, vocab] logits. Where Triton runs (CUDA, XPU) it projects only the positions that have a label; on
every other device it projects every position, so that a compiler (Neuron's) sees the same tile shapes on every
batch. The CPU compiles nothing, and there scoring every position costs the full-vocabulary projection,
log-softmax and entropy, forward and backward, of every prompt and padding token as well.
`compact_lm_head_on_cpu` makes TRL take its own compact branch on the CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["compact_lm_head_on_cpu"]


@contextmanager
def compact_lm_head_on_cpu(device: torch.device) -> Iterator[None]:
    """On the CPU, let TRL's fused LM head score only the positions that have a label, as it does on CUDA and XPU.

    At the GRPO quickstart's shapes (16 rows, 60 prompt and up to 48 completion tokens, SmolLM2-135M) a loss
    forward and backward took 6.25 s compact against 11.86 s (`bench/fused_head_cpu.py`), with the same
    log-probs, entropies and gradient to the bit; `bench/grpo_step_time.py` and `bench/lm_head_step_time.py` time
    whole training steps. The switch is TRL's own `compact` branch, taken for the block by answering "Triton
    device" for the CPU in the one place that asks it (`trl.trainer.utils._use_triton`); the kernels themselves
    still run the torch tiles. Off the CPU, or with a TRL that no longer has that switch, nothing changes."""
    import trl.trainer.utils as trl_utils

    original = getattr(trl_utils, "_use_triton", None)
    if device.type != "cpu" or original is None:
        yield
        return
    trl_utils._use_triton = lambda d: d.type == "cpu" or original(d)
    try:
        yield
    finally:
        trl_utils._use_triton = original
