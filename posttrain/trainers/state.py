"""Cross-step method state (EPO's entropy history, DCPO's controller, ...) saved with every checkpoint.

A state object has `state_dict() -> dict` (JSON-able) and `load_state_dict(dict)`. Trainers register them
by name; the base trainer writes them all to `posttrain_state.json` in each checkpoint folder and restores
them on resume, next to TRL's own optimizer, scheduler and RNG state.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol

STATE_FILE = "posttrain_state.json"


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def save_states(states: dict[str, Stateful], folder: str | Path) -> Path:
    path = Path(folder) / STATE_FILE
    path.write_text(json.dumps({name: s.state_dict() for name, s in states.items()}, indent=2))
    return path


def load_states(states: dict[str, Stateful], folder: str | Path) -> bool:
    """Restore every registered state from `folder`; False if the checkpoint has no state file.

    A checkpoint that lacks a state this trainer registered is an error: resuming a method without its
    state would silently change what it computes.
    """
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        if states:
            raise FileNotFoundError(f"{path} is missing: cannot restore method state {sorted(states)}")
        return False
    saved = json.loads(path.read_text())
    missing = sorted(set(states) - set(saved))
    if missing:
        raise KeyError(f"{path} has no state for {missing} (it holds {sorted(saved)})")
    for name, state in states.items():
        state.load_state_dict(saved[name])
    return True


class MethodStateMixin:
    """Mix into any transformers Trainer (before the TRL class): every object in `self.method_states` (name ->
    Stateful) is written to each checkpoint folder and restored on resume, beside TRL's optimizer, scheduler and
    RNG state. Method state (EPO's history, DCPO's controller) and callback state (the eval callback's collapse
    reference) register here."""

    method_states: dict[str, Stateful]

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        super()._save_checkpoint(model, trial)  # type: ignore[misc]
        if self.method_states and self.args.should_save:  # type: ignore[attr-defined]
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = os.path.join(self._get_output_dir(trial=trial),  # type: ignore[attr-defined]
                                  f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")  # type: ignore[attr-defined]
            save_states(self.method_states, folder)

    def _load_optimizer_and_scheduler(self, checkpoint: Any) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)  # type: ignore[misc]
        if checkpoint is not None and self.method_states:
            load_states(self.method_states, checkpoint)
