"""The `grpo` kind: online RL with rewards and the rollout engine (GRPO and the entropy-control methods).

Reads `data` (a train task and an optional held-out eval task), `rewards`, `rollout`, `eval` and `trainer`
(fields of the method's GRPOConfig). Flow: tasks and rewards are built before the model loads; then
greedy accuracy on the held-out task before training, GRPO, and the same evaluation after, through the
evaluation harness. With `rollout.engine: vllm` one engine generates for training and both evaluations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from posttrain.distributed import main_process_only
from posttrain.pipelines.base import (
    Pipeline,
    RunContext,
    RunOutcome,
    base_trainer_kwargs,
    evaluate_task_accuracy,
    load_task,
    on_gpu,
    peft_config,
    train_and_save,
)
from posttrain.recipe import OWNED_TRAINER_KEYS, DataSpec, Recipe, RecipeError

__all__ = ["GRPOPipeline", "LOSS_TYPES", "trainer_config"]

# The loss types TRL 1.16's GRPOTrainer._compute_loss implements (an unknown one fails only at the first loss there).
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")
# TRL's config errors -> the recipe keys a user changes to fix them
_TRL_ERROR_KEYS = (
    ("divisible by num_generations", "rollout.num_generations / trainer.per_device_train_batch_size"),
    ("generations per prompt", "rollout.num_generations"),
    ("steps_per_generation", "trainer.steps_per_generation"),
    ("generation_batch_size", "trainer.generation_batch_size"),
    ("bf16", "trainer.bf16"),
    ("fp16", "trainer.fp16"),
)


def trainer_config(recipe: Recipe, config_class: type) -> Any:
    """The method's TRL config from the recipe: `trainer:` fields plus what `rollout:` and `rewards:` own."""
    rollout = recipe.rollout
    kwargs = base_trainer_kwargs(recipe)
    kwargs.update(
        num_generations=rollout.num_generations,
        max_completion_length=rollout.max_new_tokens,
        temperature=rollout.temperature,
        top_p=rollout.top_p,
        top_k=rollout.top_k or 0,
        min_p=rollout.min_p,
        repetition_penalty=rollout.repetition_penalty,
    )
    if recipe.rewards:
        kwargs["reward_weights"] = [r.weight for r in recipe.rewards]
    if rollout.engine == "vllm":
        # posttrain's vLLM engine generates (the pipeline passes it as rollout_engine, so use_vllm stays False);
        # TRL keeps only its importance-sampling knobs from `rollout.vllm:`.
        kwargs.update({f"vllm_{k}": v for k, v in _vllm_options(rollout)[1].items()})
    return config_class(**kwargs)


def _config_class(recipe: Recipe) -> type:
    from posttrain.methods import get_method

    return get_method(recipe.method).config_class()


def _vllm_options(rollout: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """`rollout.vllm:` split into (engine options, TRL importance-sampling options); `vllm_` prefixes dropped."""
    options = {k.removeprefix("vllm_"): v for k, v in rollout.vllm.items()}
    trl_side = {k: v for k, v in options.items() if k.startswith("importance_sampling")}
    return {k: v for k, v in options.items() if k not in trl_side}, trl_side


def _server_problems(recipe: Recipe) -> list[str]:
    """`rollout.vllm` server addresses (server mode), checked before any model loads: each an http(s) URL, and
    several servers only with a LoRA adapter (full-weight sync goes to one server, over NCCL)."""
    options = _vllm_options(recipe.rollout)[0]
    if recipe.rollout.engine != "vllm" or options.get("mode", "colocate") != "server":
        return []
    key = next((k for k in ("base_url", "server_base_url") if k in options), None)
    if key is None:
        return []
    from posttrain.rollout.vllm import server_urls

    try:
        urls = server_urls(options[key])
    except ValueError as err:
        return [f"rollout.vllm.{key}: {err}"]
    if len(urls) > 1 and recipe.model.peft is None:
        return [f"rollout.vllm.{key}: {len(urls)} servers need LoRA training (model.peft), whose adapter is loaded "
                "on every server after each step; full-weight sync goes to one server over NCCL"]
    return []


COLOCATED_GPU_MEMORY_SHARE = 0.3  # TRL's GRPOConfig.vllm_gpu_memory_utilization default


def _rollout_engine(recipe: Recipe, tokenizer: Any) -> Any:
    """The vLLM engine training, best-of-n and evaluation share (`rollout.engine: vllm`)."""
    from posttrain.rollout import make_engine

    m = recipe.model
    options: dict[str, Any] = {"dtype": m.dtype, "seed": recipe.seed}
    if m.peft is not None:
        options.update(enable_lora=True, max_lora_rank=m.peft.r)
    options.update(_vllm_options(recipe.rollout)[0])
    if options.get("mode", "colocate") == "server" and m.peft is None:
        options.setdefault("full_weight_sync", True)  # its server is checked before the first step
    if options.get("mode", "colocate") == "colocate" and on_gpu():
        # vLLM's own default (0.9 of the GPU) leaves the colocated training step nothing; TRL's colocate default
        options.setdefault("gpu_memory_utilization", COLOCATED_GPU_MEMORY_SHARE)
    return make_engine("vllm", m.name_or_path, tokenizer, **options)


@dataclass
class GRPOPrepared:
    config: Any
    train_task: Any
    train_ds: Any
    rewards: list[Any]
    eval_task: Any = None
    eval_ds: Any = None


class GRPOPipeline(Pipeline):
    kind: ClassVar[str] = "grpo"
    data_spec: ClassVar[type] = DataSpec
    sections: ClassVar[frozenset[str]] = frozenset({"rewards", "rollout"})
    owned_trainer_keys: ClassVar[dict[str, str]] = OWNED_TRAINER_KEYS
    fused_lm_head: ClassVar[bool] = True  # TRL's trainer scores tokens in tiles of the LM head

    def check(self, recipe: Recipe) -> list[str]:
        """What TRL would refuse later (at trainer construction, or at the first loss), as recipe problems with
        the keys to change: TRL's GRPOConfig is built here, so its own checks run before any model loads."""
        problems = []
        if recipe.rollout.num_generations < 2:
            problems.append(f"rollout.num_generations: GRPO needs at least 2 completions per prompt for its group "
                            f"advantages, got {recipe.rollout.num_generations}")
        loss = recipe.trainer.get("loss_type")
        if loss is not None and loss not in LOSS_TYPES:
            problems.append(f"trainer.loss_type: {loss!r} is not one of TRL's GRPO losses ({', '.join(LOSS_TYPES)})")
        problems += _server_problems(recipe)
        config_class = _config_class(recipe)
        if problems or not any(c.__module__.startswith("trl.") for c in config_class.__mro__):
            return problems  # a config class that is not TRL's has no TRL checks to run
        try:
            trainer_config(recipe, config_class)
        except (ValueError, TypeError, KeyError) as err:
            message = str(err.args[0] if err.args else err)
            key = next((k for pattern, k in _TRL_ERROR_KEYS if pattern in message), "trainer")
            problems.append(f"{key}: {message}")
        return problems

    def keeps_reference_copy(self, recipe: Recipe) -> bool:
        # TRL's GRPOTrainer loads one for a KL term (beta != 0) under full fine-tuning; with LoRA the model with its
        # adapter disabled is the reference
        return recipe.model.peft is None and trainer_config(recipe, _config_class(recipe)).beta != 0.0

    def evaluates_its_own_copy(self, recipe: Recipe) -> bool:
        return recipe.rollout.engine == "vllm"  # the evaluation generates with the rollout engine

    def describe(self, recipe: Recipe) -> dict[str, Any]:
        config = trainer_config(recipe, _config_class(recipe))
        fields = ("per_device_train_batch_size", "gradient_accumulation_steps", "num_generations",
                  "generation_batch_size", "steps_per_generation", "num_iterations", "max_completion_length",
                  "loss_type", "beta", "learning_rate", "max_steps", "temperature", "save_strategy")
        out = {f: getattr(getattr(config, f), "value", getattr(config, f)) for f in fields if hasattr(config, f)}
        out["prompts_per_generation"] = config.generation_batch_size // config.num_generations
        out["prompts_per_optimizer_step"] = (config.per_device_train_batch_size * config.gradient_accumulation_steps
                                             // config.num_generations)
        return out

    def prepare(self, ctx: RunContext) -> GRPOPrepared:
        from posttrain.rewards import get_reward

        recipe = ctx.recipe
        config = trainer_config(recipe, ctx.method.config_class())
        # Tasks, options and reward names are checked before the (slow) model load.
        if recipe.data.train is None:
            raise ValueError(f"recipe {recipe.source}: data.train is required to train")
        spec = recipe.data.train
        train_task = load_task(spec, recipe.data.system_prompt)
        train_ds = train_task.load(split=spec.split or "train", path=spec.path, limit=spec.limit)
        rewards = []
        for i, r in enumerate(recipe.rewards):
            try:
                rewards.append(get_reward(r.name, train_task, **r.options))
            except (KeyError, TypeError, ValueError) as err:
                message = err.args[0] if err.args else str(err)
                raise RecipeError(f"rewards[{i}] ({r.name}): {message}", recipe.source) from None
        rewards = rewards or train_task.reward_funcs()
        prepared = GRPOPrepared(config, train_task, train_ds, rewards)
        if recipe.data.eval is not None and (recipe.eval.before or recipe.eval.after):
            es = recipe.data.eval
            prepared.eval_task = load_task(es, recipe.data.system_prompt)
            prepared.eval_ds = prepared.eval_task.load(split=es.split or "test", path=es.path,
                                                       limit=recipe.eval.limit or es.limit)
        return prepared

    def run(self, ctx: RunContext, p: GRPOPrepared) -> RunOutcome:
        from posttrain.eval.callback import add_eval_callback  # eval.suites every eval.every_n_steps (None if unset)

        recipe, model, tokenizer = ctx.recipe, ctx.model, ctx.tokenizer
        m = recipe.model
        summary: dict[str, Any] = {"method": recipe.method, "model": m.name_or_path, "peft": m.peft is not None}
        if p.eval_task is not None:
            summary["n_eval"] = len(p.eval_ds)
            summary["eval_task"] = recipe.data.eval.task
        engine = _rollout_engine(recipe, tokenizer) if recipe.rollout.engine == "vllm" else None
        if p.eval_task is not None and recipe.eval.before and not ctx.resume:
            def evaluate_before() -> None:
                print(f"[posttrain] evaluating before training on {len(p.eval_ds)} {p.eval_task.name} problems ...",
                      flush=True)
                before = evaluate_task_accuracy(model, tokenizer, recipe, p.eval_task, p.eval_ds,
                                                ctx.report_dir / "samples_before.jsonl", engine)
                summary["accuracy_before"] = before["accuracy"]
                summary["eval_before"] = before
                print(f"[posttrain] accuracy before: {before['accuracy']:.3f}", flush=True)

            main_process_only(evaluate_before, what="eval_before")  # the other ranks wait, past the PG timeout

        trainer = ctx.method.trainer_class()(
            model=model, reward_funcs=p.rewards, args=p.config, train_dataset=p.train_ds, processing_class=tokenizer,
            peft_config=peft_config(recipe), answer_extractor=p.train_task.extract_answer,
            **({"rollout_engine": engine} if engine is not None else {}),
            # Multi-turn environments (posttrain.envs) drive generation through TRL's rollout_func.
            **({"rollout_func": p.train_task.rollout_func(p.train_ds)} if hasattr(p.train_task, "rollout_func")
               else {}),
        )
        eval_callback = add_eval_callback(trainer, recipe, tokenizer, ctx.report_dir)
        train_and_save(trainer, ctx, summary)
        if eval_callback is not None:
            summary["eval_during_training"] = eval_callback.summary()
            summary["entropy_collapse"] = eval_callback.collapse_message()

        if ctx.is_main and p.eval_task is not None and recipe.eval.after:
            print(f"[posttrain] evaluating after training on {len(p.eval_ds)} problems ...", flush=True)
            trained = trainer.accelerator.unwrap_model(trainer.model)
            after = evaluate_task_accuracy(trained, tokenizer, recipe, p.eval_task, p.eval_ds,
                                           ctx.report_dir / "samples_after.jsonl",
                                           engine)  # synced to the trained weights before it generates
            summary["accuracy_after"] = after["accuracy"]
            summary["eval_after"] = after
            print(f"[posttrain] accuracy after: {after['accuracy']:.3f}", flush=True)
        return RunOutcome(summary=summary, log_history=trainer.state.log_history)
