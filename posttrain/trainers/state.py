"""Cross-step method state (EPO's entropy history, DCPO's controller, ...) saved with every checkpoint.

A state object has `state_dict() -> dict` (JSON-able) and `load_state_dict(dict)`. Trainers register them
by name; the base trainer writes them all to `posttrain_state.json` in each checkpoint folder and restores
them on resume, next to TRL's own optimizer, scheduler and RNG state.
"""

from __future__ import annotations

import json
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
