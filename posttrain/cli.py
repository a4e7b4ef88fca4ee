"""Command line: `posttrain train|validate|quickstart|eval|bon|export|recipes|tasks|env|models|data ...`
(also `python -m posttrain ...` and `accelerate launch -m posttrain train ...`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from posttrain.resources import RECIPES_DIR as REPO_RECIPES  # the shipped recipes (package data)


def find_recipe(name: str) -> Path:
    """A recipe path as given, else relative to ./recipes, else a shipped recipe (`grpo/steer.yaml`, or as the
    recipe headers write it, `recipes/grpo/steer.yaml`)."""
    shipped = name.removeprefix("recipes/")
    for candidate in (Path(name), Path("recipes") / name, REPO_RECIPES / shipped,
                      REPO_RECIPES / f"{shipped}.yaml"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"recipe not found: {name} (looked in ., ./recipes and {REPO_RECIPES})")


def _cmd_train(args: argparse.Namespace) -> int:
    from posttrain.recipe import load_recipe
    from posttrain.train import run_recipe

    overrides, resume = list(args.overrides), args.resume
    if isinstance(resume, str) and "=" in resume and not Path(resume).exists():
        overrides.insert(0, resume)  # `--resume trainer.max_steps=30`: a bare --resume, then an override
        resume = "last"
    recipe = load_recipe(find_recipe(args.recipe), overrides)
    result = run_recipe(recipe, resume=resume, force_resume=args.force_resume)
    from posttrain.distributed import end_distributed, rank_info

    if rank_info()[0] == 0:  # once, not once per process
        print(f"[posttrain] outputs in {result.output_dir}; report in {result.report_dir}")
    end_distributed()
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    import yaml

    from posttrain.methods import get_method
    from posttrain.pipelines import get_pipeline
    from posttrain.recipe import load_recipe

    recipe = load_recipe(find_recipe(args.recipe), args.overrides)  # every problem, before any model loads
    if args.get:  # one value for a script: a scalar as YAML writes it (null, true, 64), a list or map on one line
        value = recipe.get(args.get)
        print(yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=float("inf"))
              .removesuffix("\n...\n").strip())
        return 0
    method = get_method(recipe.method)
    print("# resolved recipe\n" + recipe.to_yaml())
    effective = get_pipeline(method.kind).describe(recipe)
    if effective:
        print(f"# effective settings ({method.kind} kind, {method.config.rpartition(':')[2]})")
        print(yaml.safe_dump(effective, sort_keys=False, default_flow_style=False))
    print(f"[posttrain] {args.recipe}: valid", file=sys.stderr)
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from posttrain.plan import main

    args.recipe = find_recipe(args.recipe)
    return main(args)


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


def _cmd_recipes_list(args: argparse.Namespace) -> int:
    from posttrain.recipe import _read_yaml_file
    from posttrain.resources import shipped_recipes

    print(f"shipped recipes ({REPO_RECIPES}):")
    for name in shipped_recipes():
        text = (REPO_RECIPES / name).read_text(encoding="utf-8").splitlines()
        summary = next((line.lstrip("# ").strip() for line in text if line.startswith("#")), "")
        method = _read_yaml_file(REPO_RECIPES / name).get("method", "(from its base)")
        print(f"  {name:<34} {str(method):<16} {summary[:70]}")
    print("Use one: posttrain train NAME (e.g. posttrain train grpo/steer.yaml); copy one to edit: "
          "posttrain recipes copy NAME DIR")
    return 0


def _cmd_recipes_copy(args: argparse.Namespace) -> int:
    import yaml

    from posttrain.recipe import _resolve_file

    source = find_recipe(args.name)
    data = _resolve_file(source)  # the base chain merged in: the copy stands on its own
    header = [line for line in source.read_text(encoding="utf-8").splitlines() if line.startswith("#")]
    target = Path(args.dir) / source.name if Path(args.dir).suffix != ".yaml" else Path(args.dir)
    if target.exists() and not args.force:
        print(f"posttrain: error: {target} exists (--force to overwrite)", file=sys.stderr)
        return 2
    target.parent.mkdir(parents=True, exist_ok=True)
    body = yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)
    target.write_text("\n".join([*header, f"# Copied from {args.name} with its base recipes merged in.", body]),
                      encoding="utf-8")
    print(f"[posttrain] {target}")
    return 0


def _cmd_recipes_schema(args: argparse.Namespace) -> int:
    from posttrain.schema import recipe_json_schema

    text = json.dumps(recipe_json_schema(), indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n", encoding="utf-8")
        print(f"[posttrain] {args.output}")
    else:
        print(text)
    return 0


def _cmd_tasks_list(args: argparse.Namespace) -> int:
    from posttrain.data import TASKS, task_options

    print("registered tasks (data.train.task / data.eval.task / suite entries):")
    for name, cls in sorted(TASKS.items()):
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        options = ", ".join(o for o in task_options(name) if o not in ("system_prompt", "instruction"))
        print(f"  {name:<16} {doc}")
        if options:
            print(f"  {'':<16} options: {options}")
    return 0


def _cmd_env(args: argparse.Namespace) -> int:
    import os
    import platform

    import torch

    from posttrain.eval.report import versions

    info = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            **versions(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cuda_version"] = torch.version.cuda
    from posttrain.models import cache_dir

    info["model_cache"] = str(cache_dir())
    for key, value in info.items():
        print(f"- {key}: {value}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from posttrain.models.export import ExportError, export_run, push_to_hub

    try:
        out = export_run(args.run, args.output, merge=args.merge, dtype=args.dtype)
        print(f"[posttrain] exported {args.run} to {out} ({'merged model' if args.merge else 'as trained'})")
        if args.push_to_hub:
            print(f"[posttrain] pushed to {push_to_hub(out, args.push_to_hub, private=not args.public)}")
    except ExportError as err:
        print(f"posttrain: error: {err}", file=sys.stderr)
        return 2
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


def _task_options(items: list[str] | None) -> dict | None:
    """`--option KEY=VALUE` items (values read as YAML) as a dict; None (after printing why) when one is malformed."""
    import yaml

    options = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            print(f"posttrain: error: --option expects KEY=VALUE, got {item!r}", file=sys.stderr)
            return None
        options[key] = yaml.safe_load(value)
    return options


def _cmd_data_preferences(args: argparse.Namespace) -> int:
    from posttrain.data.preferences import PairBuildSpec, build_preference_pairs

    options = _task_options(args.option)
    if options is None:
        return 2
    build = PairBuildSpec(task=args.task, options=options, split=args.split, path=args.path,
                          num_prompts=args.num_prompts, n=args.n, temperature=args.temperature, top_p=args.top_p,
                          max_new_tokens=args.max_new_tokens, max_pairs_per_prompt=args.max_pairs_per_prompt,
                          reference_chosen=not args.no_reference, seed=args.seed, model=args.model,
                          system_prompt=args.system_prompt, batch_size=args.batch_size)
    engine = tokenizer = None
    if args.engine == "vllm":
        from posttrain.models import load_tokenizer
        from posttrain.rollout import make_engine

        tokenizer = load_tokenizer(args.model)
        engine = make_engine("vllm", args.model, tokenizer, seed=args.seed)
    try:
        path = build_preference_pairs(args.model, build, args.output, tokenizer=tokenizer, engine=engine)
    except ValueError as err:
        print(f"posttrain: error: {err}", file=sys.stderr)
        return 2
    meta = json.loads(path.with_name(path.name.removesuffix(".jsonl") + ".meta.json").read_text())
    c = meta["counts"]
    print(f"[posttrain] {meta['pairs']} pairs ({c['sampled_pairs']} sampled, {c['reference_pairs']} with the "
          f"reference answer) from {c['prompts']} prompts x {build.n} samples "
          f"({c['correct_samples']} correct) -> {path}")
    return 0


def _cmd_data_benchmarks(args: argparse.Namespace) -> int:
    from posttrain.data.benchmarks import HUB_BENCHMARKS, export_benchmarks

    tasks = [t.strip() for t in args.tasks.split(",")] if args.tasks else list(HUB_BENCHMARKS)
    try:
        counts = export_benchmarks(args.output, tasks, limit=args.limit)
    except (ValueError, KeyError) as err:
        print(f"posttrain: error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    for name, n in counts.items():
        print(f"[posttrain] {args.output}/{name}.jsonl: {n} rows")
    print(f"[posttrain] offline from now on: posttrain eval ... --data-dir {args.output}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from posttrain.eval.api import EvalUsageError, run_eval, run_forgetting
    from posttrain.eval.harness import ResumeMismatch
    from posttrain.eval.lm_eval_backend import LMEvalMissing

    paths = {}
    for item in args.path or []:
        name, eq, value = item.partition("=")
        if not eq or not name or not value:
            print(f"posttrain: error: --path expects TASK=PATH, got {item!r}", file=sys.stderr)
            return 2
        paths[name] = value
    named = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    suite = args.suite
    if suite is None:
        if not named:
            print("posttrain: error: give --suite FILE, or --tasks a,b (registered tasks, e.g. gsm8k,math500)",
                  file=sys.stderr)
            return 2
        from posttrain.eval.suite import suite_from_dict

        suite = suite_from_dict({"name": "tasks", "tasks": [{"name": t, "task": t} for t in named]},
                                source="--tasks " + ",".join(named))
    only = (args.task or []) + (named if args.suite is not None else [])
    common = dict(engine=args.engine, n=args.n, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                  limit=args.limit, seed=args.seed, data_dir=args.data_dir, paths=paths or None,
                  batch_size=args.batch_size, dtype=args.dtype, device=args.device, resume=not args.overwrite,
                  progress=not args.no_progress, tasks=only or None)
    adapters = args.adapter or []
    try:
        if len(args.model) > 1 or len(adapters) > 1:
            results = run_forgetting(args.model, suite, args.output, adapters=adapters, base_model=args.base_model,
                                     **common)
            m = results["continual"]["metrics"]
            print(f"[posttrain] forgetting: ACC {m['acc']}, BWT {m['bwt']}, FWT {m['fwt']}")
        else:
            results = run_eval(args.model[0], suite, args.output, adapter=adapters[0] if adapters else None,
                               base_model=args.base_model, training_log=args.training_log, **common)
            for name, res in results["tasks"].items():
                if res.get("kind") == "pairs":
                    print(f"[posttrain] {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in res["metrics"].items()))
                    continue
                acc, se = res["metrics"].get("accuracy"), res["stderr"].get("accuracy")
                shown = "-" if acc is None else f"{acc:.3f}" + (f" +- {se:.3f}" if se is not None else "")
                print(f"[posttrain] {name}: accuracy {shown}")
    except (EvalUsageError, ResumeMismatch, LMEvalMissing) as err:
        print(f"posttrain: error: {err}", file=sys.stderr)
        return 2
    print(f"[posttrain] results in {args.output}/results.json and results.md")
    return 0


def _cmd_bon(args: argparse.Namespace) -> int:
    from posttrain.eval.bon import run_bon

    options = _task_options(args.option)
    if options is None:
        return 2
    try:
        results = run_bon(args.model, args.ensemble, args.output, task=args.task, options=options, split=args.split,
                          path=args.path, limit=args.limit, adapter=args.adapter, engine=args.engine, gold=args.gold,
                          system_prompt=args.system_prompt, batch_size=args.batch_size, dtype=args.dtype,
                          members=args.member, progress=not args.no_progress, n=args.n, aggregate=args.aggregate,
                          uwo_lambda=args.uwo_lambda, temperature=args.temperature, top_p=args.top_p,
                          max_new_tokens=args.max_new_tokens, seed=args.seed, normalize=not args.raw_scores)
    except ValueError as err:
        print(f"posttrain: error: {err}", file=sys.stderr)
        return 2
    p = results["picks"]
    print(f"[posttrain] best-of-{p['n']} by {p['aggregate']} (KL {p['kl']:.3f}): gold {p['gold_mean']:.3f} "
          f"(n = 1: {p['gold_mean_n1']:.3f}); results in {args.output}/results.json, samples_bon.jsonl, bon.png")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="posttrain",
                                     description="LLM post-training recipes on the Hugging Face stack.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train with a YAML recipe",
                           description="Train with a YAML recipe. Example: posttrain train recipes/grpo/grpo.yaml "
                                       "model.name_or_path=tiny-qwen2 trainer.max_steps=2 output_dir=/tmp/run")
    train.add_argument("recipe", help="recipe file (a path, or a name under recipes/)")
    train.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. trainer.max_steps=10")
    train.add_argument("--resume", nargs="?", const="last", default=None, metavar="CHECKPOINT",
                       help="resume from a checkpoint directory, or the last one in output_dir if no value")
    train.add_argument("--force-resume", action="store_true",
                       help="resume even though the recipe differs from the checkpoint's")
    train.set_defaults(func=_cmd_train)

    validate = sub.add_parser(
        "validate", help="check a recipe without loading any model",
        description="Load and check a recipe (with overrides) as `posttrain train` would, without loading a model or "
                    "writing anything: print the resolved recipe and the effective settings (batch shapes), or every "
                    "problem with its key, exiting 2.")
    validate.add_argument("recipe", help="recipe file (a path, or a name under recipes/)")
    validate.add_argument("overrides", nargs="*", help="key.path=value overrides")
    validate.add_argument("--get", metavar="KEY", help="print only the resolved value of KEY (e.g. model.peft.r; "
                                                       "null below a null section), for scripts")
    validate.set_defaults(func=_cmd_validate)

    plan = sub.add_parser(
        "plan", help="memory per GPU of a recipe under DDP, FSDP2, ZeRO-2/3, and the launch config that fits",
        description="Estimate the memory per GPU of a recipe (weights, gradients, optimizer state, activations, "
                    "generation) for DDP, FSDP2, ZeRO-2 and ZeRO-3 from the model's config alone (no weights load), "
                    "and name the launch/accelerate config that fits. Example: posttrain plan "
                    "recipes/grpo/grpo.yaml --gpus 8 model.name_or_path=Qwen/Qwen2.5-7B-Instruct")
    plan.add_argument("recipe", help="recipe file (a path, or a name under recipes/)")
    plan.add_argument("overrides", nargs="*", help="key.path=value overrides")
    plan.add_argument("--gpus", type=int, default=1, help="GPUs the training runs on (default 1)")
    plan.add_argument("--gpu-memory", type=float, default=80.0, metavar="GB", help="memory per GPU (default 80)")
    plan.add_argument("--overhead", type=float, default=1.5, metavar="GB",
                      help="CUDA context and allocator slack per GPU (default 1.5)")
    plan.add_argument("--params", type=float, help="the model's parameter count, when its config cannot be read")
    plan.add_argument("--layers", type=int, help="with --params: decoder layers (default: estimated from size)")
    plan.add_argument("--hidden", type=int, help="with --params: hidden size (default: estimated from size)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(func=_cmd_plan)

    quick = sub.add_parser("quickstart", help="GRPO + LoRA on SmolLM2-135M-Instruct, synthetic arithmetic, CPU",
                           description="Run recipes/quickstart.yaml: evaluate, train, evaluate, write a report.")
    quick.add_argument("overrides", nargs="*", help="key.path=value overrides")
    quick.set_defaults(func=_cmd_quickstart)

    export = sub.add_parser(
        "export", help="write a trained run or checkpoint as a folder transformers and vLLM load",
        description="Export a run folder (output_dir) or one of its checkpoint-N folders: the LoRA adapter (or, with "
                    "--merge, the base model with the adapter merged in, as safetensors), the tokenizer and chat "
                    "template, and a model card (base model, method, data, recipe, evaluation results). Example: "
                    "posttrain export outputs/quickstart --output exported/qs --merge")
    export.add_argument("run", help="run folder (output_dir of posttrain train) or a checkpoint-N inside it")
    export.add_argument("--output", required=True, metavar="DIR", help="new (or empty) folder to write")
    export.add_argument("--merge", action="store_true", help="merge the LoRA adapter into the base weights")
    export.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="weights dtype of the merged model (default: the recipe's model.dtype)")
    export.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload to the Hub (needs a token)")
    export.add_argument("--public", action="store_true", help="with --push-to-hub: a public repository")
    export.set_defaults(func=_cmd_export)

    recipes = sub.add_parser("recipes", help="the shipped recipes: list, copy, schema")
    rsub = recipes.add_subparsers(dest="recipes_command", required=True)
    rsub.add_parser("list", help="list the shipped recipes").set_defaults(func=_cmd_recipes_list)
    copy = rsub.add_parser("copy", help="copy a shipped recipe (its base recipes merged in) to edit it")
    copy.add_argument("name", help="e.g. grpo/steer.yaml or quickstart")
    copy.add_argument("dir", help="folder (or .yaml file) to write")
    copy.add_argument("--force", action="store_true", help="overwrite an existing file")
    copy.set_defaults(func=_cmd_recipes_copy)
    schema = rsub.add_parser(
        "schema", help="print the recipe JSON Schema (for an editor's YAML language server)",
        description="The recipe format as JSON Schema. Point your editor at it, e.g. with the YAML language server "
                    "(VS Code's YAML extension): a first line `# yaml-language-server: $schema=recipe.schema.json` "
                    "in a recipe, after `posttrain recipes schema --output recipe.schema.json`.")
    schema.add_argument("--output", metavar="FILE", help="write to FILE instead of standard output")
    schema.set_defaults(func=_cmd_recipes_schema)

    tasks = sub.add_parser("tasks", help="the registered tasks")
    tsub = tasks.add_subparsers(dest="tasks_command", required=True)
    tsub.add_parser("list", help="list the registered tasks and their options").set_defaults(func=_cmd_tasks_list)

    sub.add_parser("env", help="versions, devices and paths (paste it into a bug report)").set_defaults(func=_cmd_env)

    models = sub.add_parser("models", help="named models: pull, list")
    msub = models.add_subparsers(dest="models_command", required=True)
    pull = msub.add_parser("pull", help="build or convert a named model once and print its cached path")
    pull.add_argument("name", help="e.g. smollm2-135m-instruct or tiny-qwen2")
    pull.add_argument("--force", action="store_true", help="rebuild even if cached")
    pull.set_defaults(func=_cmd_models_pull)
    lst = msub.add_parser("list", help="list named models and whether they are cached")
    lst.set_defaults(func=_cmd_models_list)

    data = sub.add_parser("data", help="build datasets: preference pairs from a verifiable task")
    dsub = data.add_subparsers(dest="data_command", required=True)
    prefs = dsub.add_parser(
        "preferences", help="sample and grade completions of a task, write chosen/rejected pairs (JSONL)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Sample --n completions for each of --num-prompts prompts of --task with the rollout engine, "
                    "grade them with the task's grader, and write conversational preference pairs (chosen: a "
                    "higher-scored completion, rejected: a lower-scored one of the same prompt) to --output, with "
                    "the model, task, seed, sampling and counts in a .meta.json beside it. Prompts whose samples "
                    "are all wrong take the task's reference answer as chosen unless --no-reference.\n\n"
                    "  posttrain data preferences --model smollm2-135m-instruct --task arithmetic \\\n"
                    "      --num-prompts 256 --n 8 --output data/pairs/arith_train.jsonl")
    prefs.add_argument("--model", required=True, help="the sampling model (named model, local dir or Hub id)")
    prefs.add_argument("--task", default="arithmetic", help="a registered task (arithmetic, gsm8k, ...)")
    prefs.add_argument("--option", action="append", metavar="KEY=VALUE", help="a task option (repeatable)")
    prefs.add_argument("--split", default="train", help="task split to take prompts from (default train)")
    prefs.add_argument("--path", help="the task's local data (JSONL file or folder), for tasks read from files")
    prefs.add_argument("--num-prompts", type=int, default=64)
    prefs.add_argument("--n", type=int, default=8, help="samples per prompt (default 8)")
    prefs.add_argument("--temperature", type=float, default=1.0)
    prefs.add_argument("--top-p", type=float, default=1.0)
    prefs.add_argument("--max-new-tokens", type=int, default=64)
    prefs.add_argument("--max-pairs-per-prompt", type=int, default=2)
    prefs.add_argument("--no-reference", action="store_true",
                       help="no reference-answer pairs: prompts whose samples tie give no pair")
    prefs.add_argument("--seed", type=int, default=0)
    prefs.add_argument("--system-prompt")
    prefs.add_argument("--batch-size", type=int, default=16, help="prompts per generate call (hf engine)")
    prefs.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    prefs.add_argument("--output", required=True, metavar="FILE.jsonl")
    prefs.set_defaults(func=_cmd_data_preferences)

    bench = dsub.add_parser(
        "benchmarks", help="download the reasoning benchmarks once into a folder of <task>.jsonl (offline use)",
        description="Write DIR/<task>.jsonl for gsm8k, math500, aime24, amc23 and mmlu_stem (their evaluation "
                    "splits, rows as the Hub serves them). Afterwards `posttrain eval --data-dir DIR` and recipes "
                    "with data.train.path=DIR read them without network. Example: "
                    "posttrain data benchmarks --output data/benchmarks")
    bench.add_argument("--output", required=True, metavar="DIR")
    bench.add_argument("--tasks", metavar="A,B", help="only these (default: all five)")
    bench.add_argument("--limit", type=int, help="first N rows of each (a small offline copy)")
    bench.set_defaults(func=_cmd_data_benchmarks)

    ev = sub.add_parser(
        "eval", help="evaluate a model (or a sequence of checkpoints) on an eval suite",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Evaluate a model, with an optional PEFT adapter (not merged), on a suite of eval/*.yaml. Writes "
                    "results.json, results.md, samples_<task>.jsonl and PNG plots into --output; an interrupted "
                    "run resumes from the sample files in --output.\n\n"
                    "  posttrain eval --model tiny-qwen2 --suite eval/reasoning.yaml --limit 5 \\\n"
                    "      --data-dir data/benchmarks --output /tmp/ev\n\n"
                    "Forgetting (continual learning): give one checkpoint per training stage, in order, with a\n"
                    "continual suite (tasks in training order); the stage x task accuracy matrix, ACC, BWT, FWT and\n"
                    "forgetting go to --output, each stage's full results to --output/stage<i>_<name>/:\n"
                    "  posttrain eval --model ckpt1 --model ckpt2 --model ckpt3 --suite eval/continual.yaml ...\n"
                    "  posttrain eval --model BASE --adapter stage1 --adapter stage2 --suite eval/continual.yaml ...\n"
                    "(FWT needs the base row: --base-model, or the adapters' base, evaluated into --output/base/).")
    ev.add_argument("--model", action="append", required=True,
                    help="named model (tiny-qwen2, smollm2-135m-instruct), local dir, .gguf or Hub id; "
                         "repeat for stages")
    ev.add_argument("--adapter", action="append", metavar="DIR", help="PEFT adapter folder; repeat for stages")
    ev.add_argument("--suite",
                    help="suite YAML (a path, or a name under eval/: reasoning, retention, continual)")
    ev.add_argument("--tasks", metavar="A,B",
                    help="registered tasks to evaluate without a suite file (e.g. gsm8k,math500, greedy, 512 new "
                         "tokens unless --temperature / --max-new-tokens say otherwise); with --suite: only these")
    ev.add_argument("--output", required=True, metavar="DIR", help="output folder (reused to resume)")
    ev.add_argument("--limit", type=int, help="first N prompts of each task")
    ev.add_argument("--engine", choices=["hf", "vllm"], default="hf", help="rollout backend (default hf)")
    ev.add_argument("--n", type=int, help="samples per prompt for every task (overrides the suite)")
    ev.add_argument("--temperature", type=float, help="sampling temperature for every task; 0 = greedy (n 1)")
    ev.add_argument("--max-new-tokens", type=int, help="completion length cap for every task")
    ev.add_argument("--seed", type=int, help="sampling seed for every task")
    ev.add_argument("--data-dir", metavar="DIR", help="local data: relative task paths resolve here; tasks without "
                                                      "a path read DIR/<task>.jsonl (e.g. data/benchmarks)")
    ev.add_argument("--path", action="append", metavar="TASK=PATH", help="data path for one task (repeatable)")
    ev.add_argument("--task", action="append", metavar="NAME", help="evaluate only these suite tasks (repeatable)")
    ev.add_argument("--base-model", help="reference model for KL on retention prompts (and the FWT base row)")
    ev.add_argument("--batch-size", type=int, default=16, help="prompts per generate call (default 16)")
    ev.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    ev.add_argument("--device", default="auto",
                    help="where the model (and the KL base model) runs: auto (the GPU when present), cpu, cuda:N")
    ev.add_argument("--training-log", metavar="PATH",
                    help="trainer_state.json / run folder / metrics.jsonl: also plot training curves "
                         "and the entropy law")
    ev.add_argument("--overwrite", action="store_true", help="ignore existing sample files instead of resuming")
    ev.add_argument("--no-progress", action="store_true", help="no progress bars")
    ev.set_defaults(func=_cmd_eval)

    bon = sub.add_parser(
        "bon", help="best-of-n sampling scored by a reward-model ensemble, with its gold-vs-KL curves",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Sample --n completions for each of --limit prompts of --task with the rollout engine, score "
                    "every completion with each member of the reward ensemble in --ensemble (trained by "
                    "method: reward or reward_ensemble) and with the gold reward (--gold, default the task's "
                    "grader), and pick the best by --aggregate (mean, wco = min, uwo = mean - lambda var). From "
                    "the one sampling pass it also gives, for every n <= N and every aggregate and member, the "
                    "expected gold and proxy score of the best-of-n pick (the unbiased estimator over all "
                    "n-subsets) against KL(n) = log n - (n-1)/n, with the Gao et al. fit d(a - b d), d = sqrt(KL). "
                    "Writes results.json, results.md, samples_bon.jsonl (completions, member scores, gold scores, "
                    "picks) and bon.png into --output.\n\n"
                    "  posttrain train recipes/reward/ensemble_heads.yaml        # the ensemble, once\n"
                    "  posttrain bon --model smollm2-135m-instruct --ensemble outputs/rm_ensemble_heads \\\n"
                    "      --task arithmetic --limit 32 --n 16 --aggregate wco --max-new-tokens 48 --output /tmp/bon")
    bon.add_argument("--model", required=True, help="the policy that samples (named model, local dir or Hub id)")
    bon.add_argument("--adapter", metavar="DIR", help="a PEFT adapter on the policy (not merged)")
    bon.add_argument("--ensemble", required=True, metavar="DIR", help="folder with ensemble.json (a trained "
                                                                      "reward model or ensemble)")
    bon.add_argument("--member", type=int, action="append", metavar="K",
                     help="score with these members only (repeatable; one member = a single reward model)")
    bon.add_argument("--task", default="arithmetic", help="a registered task (arithmetic, gsm8k, ...)")
    bon.add_argument("--option", action="append", metavar="KEY=VALUE", help="a task option (repeatable)")
    bon.add_argument("--split", default="test", help="task split (default test)")
    bon.add_argument("--path", help="the task's local data (JSONL file or folder)")
    bon.add_argument("--limit", type=int, default=32, help="prompts (default 32)")
    bon.add_argument("--n", type=int, default=16, help="samples per prompt, N (default 16)")
    bon.add_argument("--aggregate", default="mean", help="aggregate that picks: mean, wco, uwo (default mean)")
    bon.add_argument("--uwo-lambda", type=float, default=0.5, help="lambda of uwo (Coste et al.: 0.5 for BoN)")
    bon.add_argument("--raw-scores", action="store_true",
                     help="aggregate raw member scores, not scores standardised with each member's calibration in "
                          "ensemble.json (a reward model's offset is arbitrary, so raw WCO/UWO mostly follow the "
                          "member offsets)")
    bon.add_argument("--gold", default="accuracy", help="gold reward, a registered reward (default accuracy)")
    bon.add_argument("--temperature", type=float, default=1.0)
    bon.add_argument("--top-p", type=float, default=1.0)
    bon.add_argument("--max-new-tokens", type=int, default=256)
    bon.add_argument("--seed", type=int, default=0)
    bon.add_argument("--system-prompt")
    bon.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default 8)")
    bon.add_argument("--engine", choices=["hf", "vllm"], default="hf", help="rollout backend (default hf)")
    bon.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    bon.add_argument("--no-progress", action="store_true", help="no progress bars")
    bon.add_argument("--output", required=True, metavar="DIR", help="output folder")
    bon.set_defaults(func=_cmd_bon)
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
