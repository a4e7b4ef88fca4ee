"""Command line: `posttrain train|quickstart|models ...` (also `python -m posttrain ...` and
`accelerate launch -m posttrain train ...`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def find_recipe(name: str) -> Path:
    """A recipe path as given, else relative to ./recipes, else to the recipes/ folder of this checkout."""
    for candidate in (Path(name), Path("recipes") / name, REPO_RECIPES / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"recipe not found: {name} (looked in ., ./recipes and {REPO_RECIPES})")


def _cmd_train(args: argparse.Namespace) -> int:
    from posttrain.recipe import load_recipe
    from posttrain.train import run_recipe

    recipe = load_recipe(find_recipe(args.recipe), args.overrides)
    resume = {"last": True, None: None}.get(args.resume, args.resume)
    result = run_recipe(recipe, resume=resume)
    print(f"[posttrain] outputs in {result.output_dir}; report in {result.report_dir}")
    return 0


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from posttrain.recipe import load_recipe
    from posttrain.train import run_recipe

    recipe = load_recipe(find_recipe("quickstart.yaml"), args.overrides)
    result = run_recipe(recipe)
    s = result.summary
    if "accuracy_before" in s and "accuracy_after" in s:
        print(f"\n[posttrain] quickstart: held-out accuracy {s['accuracy_before']:.2f} -> {s['accuracy_after']:.2f} "
              f"on {s['n_eval']} problems; {s['train_minutes']:.1f} min of training. Report: {result.report_dir}")
    return 0


def _cmd_models_pull(args: argparse.Namespace) -> int:
    from posttrain.models import pull_model

    print(pull_model(args.name, force=args.force))
    return 0


def _cmd_models_list(args: argparse.Namespace) -> int:
    from posttrain.models import NAMED_MODELS, cache_dir, is_pulled

    print(f"named models (cache: {cache_dir()}):")
    for name, entry in NAMED_MODELS.items():
        state = "pulled" if is_pulled(name) else "not pulled"
        print(f"  {name:<24} [{state}] {entry.description}")
    print("Any Hub id, local model directory or .gguf file also works as model.name_or_path.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="posttrain", description="LLM post-training recipes on the Hugging Face stack.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train with a YAML recipe",
                           description="Train with a YAML recipe. Example: posttrain train recipes/grpo/grpo.yaml "
                                       "model.name_or_path=tiny-qwen2 trainer.max_steps=2 output_dir=/tmp/run")
    train.add_argument("recipe", help="recipe file (a path, or a name under recipes/)")
    train.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. trainer.max_steps=10")
    train.add_argument("--resume", nargs="?", const="last", default=None, metavar="CHECKPOINT",
                       help="resume from a checkpoint directory, or the last one in output_dir if no value")
    train.set_defaults(func=_cmd_train)

    quick = sub.add_parser("quickstart", help="GRPO + LoRA on SmolLM2-135M-Instruct, synthetic arithmetic, CPU",
                           description="Run recipes/quickstart.yaml: evaluate, train, evaluate, write a report.")
    quick.add_argument("overrides", nargs="*", help="key.path=value overrides")
    quick.set_defaults(func=_cmd_quickstart)

    models = sub.add_parser("models", help="named models: pull, list")
    msub = models.add_subparsers(dest="models_command", required=True)
    pull = msub.add_parser("pull", help="build or convert a named model once and print its cached path")
    pull.add_argument("name", help="e.g. smollm2-135m-instruct or tiny-qwen2")
    pull.add_argument("--force", action="store_true", help="rebuild even if cached")
    pull.set_defaults(func=_cmd_models_pull)
    lst = msub.add_parser("list", help="list named models and whether they are cached")
    lst.set_defaults(func=_cmd_models_list)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from posttrain.recipe import RecipeError

    try:
        code = args.func(args)
    except (RecipeError, FileNotFoundError, KeyError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"posttrain: error: {message}", file=sys.stderr)
        code = 2
    sys.exit(code)
