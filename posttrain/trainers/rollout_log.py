"""`rollouts.jsonl`: the training rollouts of every N-th step, one JSON line per completion, so a run can be read
back (what the policy wrote, what it was paid, what it was trained on) without a tracker.

A line: `step`, `row` (index in the global generation batch), `prompt`, `completion`, `rewards` (per reward
function), `advantage` (what TRL's completions table shows: posttrain's advantage), `advantage_trained` (the
token-mean advantage trained on, when a token weight reshapes it), `entropy_mean` (the completion's mean token
entropy under the training forward) and `length` (completion tokens). Written by the main process just before the
next generation batch is sampled (TRL's completion logs then still hold this batch, with its final advantages),
and at the end of training.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

__all__ = ["RolloutLog"]


def _plain(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


class RolloutLog:
    """Collects one generation batch's rollouts (`begin`, `add_entropies` per micro-batch, `finish`)."""

    def __init__(self, path: str | Path, every: int) -> None:
        self.path, self.every = Path(path), every
        self.step: int | None = None
        self.size = 0
        self.entropies: dict[int, tuple[float, int]] = {}

    def begin(self, step: int, size: int) -> None:
        """A generation batch of `size` completions was sampled at optimizer step `step` (logged when step % every
        == 0)."""
        if self.every > 0 and step % self.every == 0:
            self.step, self.size, self.entropies = step, size, {}

    def _rows(self, logs: dict[str, Any]) -> list[dict[str, Any]]:
        """The batch's rows from TRL's completion logs (their last `size` entries)."""
        tail = slice(len(logs["prompt"]) - self.size, len(logs["prompt"]))
        prompts, completions = list(logs["prompt"])[tail], list(logs["completion"])[tail]
        advantages = list(logs["advantages"])[tail]
        rewards = {name: list(values)[tail] for name, values in logs["rewards"].items()}
        extra = {name: list(values)[tail] for name, values in logs["extra"].items()}
        out = []
        for i in range(len(prompts)):
            row: dict[str, Any] = {"step": self.step, "row": i, "prompt": prompts[i], "completion": completions[i],
                                   "rewards": {k: _plain(v[i]) for k, v in rewards.items()},
                                   "advantage": _plain(advantages[i])}
            trained = next((v[i] for k, v in extra.items() if k.startswith("advantage_trained")), None)
            if trained is not None:
                row["advantage_trained"] = _plain(trained)
            out.append(row)
        return out

    def add_entropies(self, rows: torch.Tensor, means: torch.Tensor, lengths: torch.Tensor) -> None:
        """Per-row mean token entropy and length, gathered from every process (rows < 0: padding)."""
        if self.step is None:
            return
        for r, h, n in zip(rows.tolist(), means.tolist(), lengths.tolist()):
            if r >= 0:
                self.entropies[int(r)] = (h, int(n))

    def finish(self, logs: dict[str, Any]) -> None:
        """Append the pending batch (if any) to the file, reading its rows from TRL's completion logs `logs`."""
        if self.step is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            for row in self._rows(logs):
                if row["row"] in self.entropies:
                    h, n = self.entropies[row["row"]]
                    row["entropy_mean"], row["length"] = _plain(h), n
                f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        self.step = None
