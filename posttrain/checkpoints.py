"""Checkpoints and resume, the same for every method kind.

Runs save checkpoints by default (`save_strategy: steps` every 10% of the run, the last two kept; set
`trainer.save_strategy: "no"` to turn them off), and every checkpoint folder holds the resolved recipe
(`recipe.yaml`) next to TRL's state. `posttrain train RECIPE --resume` continues from the last checkpoint in
output_dir (or `--resume PATH` from a given one); resuming with a recipe that differs from the checkpoint's in
anything but the keys a resumed run may change (more steps, saving, logging, trackers) is refused, naming the
keys, unless `--force-resume`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from posttrain.recipe import Recipe, RecipeError, load_recipe

__all__ = ["CHECKPOINT_DEFAULTS", "RESUMABLE_KEYS", "RecipeCheckpointCallback", "resolve_resume", "recipe_changes"]

# posttrain's default for every kind's trainer config (any of them can be set in `trainer:`)
CHECKPOINT_DEFAULTS: dict[str, Any] = {"save_strategy": "steps", "save_steps": 0.1, "save_total_limit": 2}
# recipe keys a resumed run may change without changing what it trains
RESUMABLE_KEYS = ("trainer.max_steps", "trainer.num_train_epochs", "trainer.save_strategy", "trainer.save_steps",
                  "trainer.save_total_limit", "trainer.logging_steps", "trainer.report_to", "trainer.disable_tqdm",
                  "trainer.rollouts_log_steps", "eval.", "output_dir")


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): data}


def recipe_changes(saved: Recipe, current: Recipe) -> list[str]:
    """The dotted keys whose values differ between two recipes, except those a resumed run may change."""
    a, b = _flatten(saved.to_dict()), _flatten(current.to_dict())
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return [k for k in changed if not any(k == r or (r.endswith(".") and k.startswith(r)) for r in RESUMABLE_KEYS)]


def resolve_resume(recipe: Recipe, resume: str | bool | None, force: bool = False) -> str | None:
    """The checkpoint folder to resume from (None: a fresh run). `True` / "last": the last checkpoint-N in the
    recipe's output_dir. Raises RecipeError when there is none, or when the checkpoint was made with another
    recipe (unless `force`)."""
    if not resume:
        return None
    if resume is True or resume == "last":
        from transformers.trainer_utils import get_last_checkpoint

        out = Path(recipe.output_dir)
        last = get_last_checkpoint(str(out)) if out.is_dir() else None
        if last is None:
            raise RecipeError(f"--resume: no checkpoint-N folder in output_dir {out} (the run saved none yet, or "
                              "trainer.save_strategy is 'no'); start without --resume", recipe.source)
        path = Path(last)
    else:
        path = Path(resume).expanduser()
        if not path.is_dir():
            raise RecipeError(f"--resume: checkpoint folder not found: {path}", recipe.source)
    saved_file = path / "recipe.yaml"
    if saved_file.is_file() and not force:
        changed = recipe_changes(load_recipe(saved_file), recipe)
        if changed:
            raise RecipeError([f"--resume: the recipe differs from the one {path} was trained with, in: "
                               + ", ".join(changed),
                               "resume with the same recipe, or pass --force-resume to continue anyway"],
                              recipe.source)
    return str(path)


def _callback_base() -> type:
    from transformers import TrainerCallback

    return TrainerCallback


class RecipeCheckpointCallback(_callback_base()):  # type: ignore[misc]
    """Writes the resolved recipe into every checkpoint folder the trainer saves."""

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                self.recipe.save(folder)
