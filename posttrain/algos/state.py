"""Cross-step state of the methods that keep any: EPO's entropy history, DCPO's controller.

Each holds plain Python floats and ints (JSON-able) and follows one protocol: ``context()`` (the context
fields its component reads, e.g. ``{"h_prev": ...}``), ``update(value)`` once per optimizer step with the
step's signal (already averaged over micro-batches and processes), ``state_dict()`` / ``load_state_dict()``
for checkpoints. The trainer creates the state a registry entry declares and never looks inside it.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["EPOState", "DCPOState"]


class EPOState:
    """EPO's cross-step state: running sum and count of per-step mean entropies, and the step k.

    Per step: read ``h_bar`` (None before any update) and ``step``, compute the loss, then
    ``update(mean entropy of this step, gathered over processes)``. Non-finite entropies advance the
    step but stay out of the history.
    """

    def __init__(self) -> None:
        self.entropy_sum: float = 0.0
        self.entropy_count: int = 0
        self.step: int = 0

    def update(self, step_mean_entropy: float) -> None:
        value = float(step_mean_entropy)
        if math.isfinite(value):
            self.entropy_sum += value
            self.entropy_count += 1
        self.step += 1

    @property
    def h_bar(self) -> float | None:
        return self.entropy_sum / self.entropy_count if self.entropy_count else None

    def context(self) -> dict[str, Any]:
        return {"h_bar": self.h_bar, "step": self.step}

    def state_dict(self) -> dict[str, Any]:
        return {"entropy_sum": self.entropy_sum, "entropy_count": self.entropy_count, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.entropy_sum = float(state["entropy_sum"])
        self.entropy_count = int(state["entropy_count"])
        self.step = int(state["step"])


class DCPOState:
    """DCPO's cross-step state: H_prev, the previous step's entropy signal (starts at 0, so the first
    target temperature is T_high), and the number of updates. Non-finite signals keep the old value."""

    def __init__(self, h_prev: float = 0.0) -> None:
        self.h_prev: float = float(h_prev)
        self.step: int = 0

    def update(self, entropy_signal: float) -> None:
        value = float(entropy_signal)
        if math.isfinite(value):
            self.h_prev = value
        self.step += 1

    def context(self) -> dict[str, Any]:
        return {"h_prev": self.h_prev}

    def state_dict(self) -> dict[str, Any]:
        return {"h_prev": self.h_prev, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.h_prev = float(state["h_prev"])
        self.step = int(state["step"])
