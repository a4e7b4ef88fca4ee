"""Adapter groups of a continual run: one LoRA adapter per group of similar instructions, and its codebook.

LCIA (Qiao et al., ICML 2025) keeps, for every adapter it trained, the set of instructions it was trained on
(the codebook). A new task whose instruction set matches a group (TF-IDF similarity >= tau,
`posttrain.algos.ema.retrain_or_expand`) retrains that group's adapter; otherwise a new adapter opens,
warm-started from the latest one. At test time each instance goes to the group whose instructions match its
prompt best (`route_instruction`), the newest one when none does.

On disk a continual checkpoint is a folder with `codebook.json` and one PEFT adapter folder per group
(`group_0/`, `group_1/`, ...: what `PeftModel.save_pretrained` writes for named adapters). Each group folder is
an ordinary LoRA adapter, so vLLM serves the checkpoint with one LoRA module per group.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posttrain.algos.ema import Reduce, retrain_or_expand, route_instruction

if TYPE_CHECKING:
    from peft import PeftModel

__all__ = ["CODEBOOK_FILE", "AdapterGroup", "AdapterGroups", "is_adapter_groups_dir", "load_adapter_groups",
           "warm_start_adapter"]

CODEBOOK_FILE = "codebook.json"


@dataclass
class AdapterGroup:
    name: str  # the PEFT adapter name, and its folder in a checkpoint
    instructions: list[str]
    tasks: list[str] = field(default_factory=list)


class AdapterGroups:
    """The codebook: adapter groups, their instructions and tasks, and the two decisions made with them.

    `expand=False` keeps a single adapter for every task (the sequential baselines): `assign` always returns
    `group_0`. Cross-stage state with `state_dict()` / `load_state_dict()`, saved as JSON.
    """

    def __init__(self, threshold: float = 0.9, reduce: Reduce = "mean_pairs", expand: bool = True):
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
        self.threshold, self.reduce, self.expand = threshold, reduce, expand
        self.groups: list[AdapterGroup] = []

    def __len__(self) -> int:
        return len(self.groups)

    @property
    def names(self) -> list[str]:
        return [g.name for g in self.groups]

    def get(self, name: str) -> AdapterGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"no adapter group {name!r} (groups: {self.names})")

    def assign(self, task: str, instructions: list[str]) -> tuple[AdapterGroup, bool, list[float]]:
        """The group that trains on `task` (retrain an existing one, or open a new one) and the codebook updated.

        Returns (group, created, similarities to each earlier group). A retrained group's codebook gains the
        task's instructions it did not hold yet (as LCIA's LoRASelect.py appends them)."""
        if not instructions:
            raise ValueError(f"task {task!r}: an instruction set must not be empty")
        if not self.expand and self.groups:
            index, sims = 0, []
        else:
            index, sims = retrain_or_expand(instructions, [g.instructions for g in self.groups], self.threshold,
                                            self.reduce)
        if index is None:
            group = AdapterGroup(f"group_{len(self.groups)}", list(dict.fromkeys(instructions)), [task])
            self.groups.append(group)
            return group, True, sims
        group = self.groups[index]
        group.instructions += [x for x in dict.fromkeys(instructions) if x not in group.instructions]
        group.tasks.append(task)
        return group, False, sims

    def route(self, candidates: list[str]) -> tuple[str, float]:
        """(group name, similarity) for one instance, from its prompt's lines (`route_instruction`)."""
        if len(self.groups) == 1:
            return self.groups[0].name, 1.0
        index, sim = route_instruction(candidates, [g.instructions for g in self.groups], self.threshold, self.reduce)
        return self.groups[index].name, sim

    # --- state ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "reduce": self.reduce, "expand": self.expand,
                "groups": [asdict(g) for g in self.groups]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.threshold, self.reduce, self.expand = state["threshold"], state["reduce"], state["expand"]
        self.groups = [AdapterGroup(**g) for g in state["groups"]]

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / CODEBOOK_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.state_dict(), indent=1, ensure_ascii=False))
        return path

    @classmethod
    def load(cls, folder: str | Path) -> AdapterGroups:
        path = Path(folder) / CODEBOOK_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no adapter-group codebook ({CODEBOOK_FILE}) in {folder}")
        groups = cls()
        try:
            groups.load_state_dict(json.loads(path.read_text(encoding="utf-8")))
        except (KeyError, TypeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not a codebook of adapter groups ({type(err).__name__}: {err})") from None
        if not groups.groups:
            raise ValueError(f"{path}: the codebook has no adapter group")
        return groups


def is_adapter_groups_dir(folder: str | Path | None) -> bool:
    return folder is not None and (Path(folder) / CODEBOOK_FILE).is_file()


def load_adapter_groups(base: Any, folder: str | Path, is_trainable: bool = False) -> tuple[PeftModel, AdapterGroups]:
    """Attach every group's adapter of a continual checkpoint to `base` (unmerged); the newest is active."""
    from peft import PeftModel

    groups = AdapterGroups.load(folder)
    for g in groups.groups:
        if not (Path(folder) / g.name / "adapter_config.json").is_file():
            raise FileNotFoundError(f"adapter group {g.name!r} of {folder}/{CODEBOOK_FILE} has no adapter folder "
                                    f"{Path(folder) / g.name}")
    first, *rest = groups.groups
    model = PeftModel.from_pretrained(base, str(Path(folder) / first.name), adapter_name=first.name,
                                      is_trainable=is_trainable)
    for g in rest:
        model.load_adapter(str(Path(folder) / g.name), adapter_name=g.name, is_trainable=is_trainable)
    model.set_adapter(groups.groups[-1].name)
    return model, groups


def warm_start_adapter(model: PeftModel, source: str, target: str) -> None:
    """Copy adapter `source`'s weights into adapter `target` (same LoRA config): a new group starts where the
    latest one ended."""
    import torch

    params = dict(model.named_parameters())
    copied = 0
    with torch.no_grad():
        for name, param in params.items():
            if f".{target}." in name:
                param.copy_(params[name.replace(f".{target}.", f".{source}.")])
                copied += 1
    if not copied:
        raise ValueError(f"adapter {target!r} has no parameters to warm-start from {source!r}")
