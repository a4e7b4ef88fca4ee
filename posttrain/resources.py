"""Where the shipped recipes and evaluation suites are: inside the installed package (`posttrain/_shipped`, which
in a checkout links to the top-level `recipes/` and `eval/` folders), so editable and wheel installs find them
the same way."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["RECIPES_DIR", "EVAL_DIR", "shipped_recipes"]

_ROOT = Path(str(resources.files("posttrain._shipped")))
RECIPES_DIR = _ROOT / "recipes"
EVAL_DIR = _ROOT / "eval"


def shipped_recipes() -> list[str]:
    """Every shipped recipe as a name relative to the recipes folder (e.g. `grpo/steer.yaml`), sorted."""
    return sorted(str(p.relative_to(RECIPES_DIR)) for p in RECIPES_DIR.rglob("*.yaml"))
