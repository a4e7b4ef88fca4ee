"""Cross-step method state (EPO's entropy history, DCPO's controller, the EMA buffers, ...) saved with every checkpoint.

A state object has `state_dict() -> dict` and `load_state_dict(dict)`. The dict is JSON-able data, except that
any leaf may be a torch tensor (EMA buffers, previous gradients): tensors go, exactly, into a safetensors file
beside the JSON (`posttrain_state.safetensors`), the JSON keeps a reference to each. Trainers register states
by name in `self.method_states`; `MethodStateMixin` writes them all into each checkpoint folder and restores
them on resume, next to TRL's own optimizer, scheduler and RNG state.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol

STATE_FILE = "posttrain_state.json"
TENSOR_FILE = "posttrain_state.safetensors"
_TENSOR_REF = "__tensor__"


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _split_tensors(value: Any, path: str, tensors: dict[str, Any]) -> Any:
    """`value` with every tensor leaf replaced by {"__tensor__": key}; the tensors collected into `tensors`."""
    import torch

    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous()
        return {_TENSOR_REF: path}
    if isinstance(value, dict):
        return {k: _split_tensors(v, f"{path}/{k}", tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_split_tensors(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]
    return value


def _join_tensors(value: Any, tensors: dict[str, Any]) -> Any:
    if isinstance(value, dict):
        if set(value) == {_TENSOR_REF}:
            return tensors[value[_TENSOR_REF]]
        return {k: _join_tensors(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_join_tensors(v, tensors) for v in value]
    return value


def save_states(states: dict[str, Stateful], folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Any] = {}
    data = {name: _split_tensors(s.state_dict(), name, tensors) for name, s in states.items()}
    path = folder / STATE_FILE
    if tensors:
        from safetensors.torch import save_file

        save_file(tensors, str(folder / TENSOR_FILE))
    path.write_text(json.dumps(data, indent=1))
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
    tensors: dict[str, Any] = {}
    if (Path(folder) / TENSOR_FILE).is_file():
        from safetensors.torch import load_file

        tensors = load_file(str(Path(folder) / TENSOR_FILE))
    for name, state in states.items():
        state.load_state_dict(_join_tensors(saved[name], tensors))
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
