"""Recipes: YAML -> typed dataclasses, `base:` inheritance, overrides, and every validation error path.

Most tests validate `trainer:` against a small fake config class (registered as method `fake`), so the
file does not import torch; one test uses TRL's real GRPOConfig and its odd annotations.
"""

import copy
import dataclasses
import enum
import subprocess
import sys
import types
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from posttrain import methods
from posttrain.recipe import (
    OWNED_TRAINER_KEYS,
    DataSpec,
    EvalSpec,
    ModelSpec,
    PeftSpec,
    Recipe,
    RecipeError,
    RewardSpec,
    RolloutSpec,
    TaskSpec,
    load_recipe,
    parse_overrides,
    recipe_from_dict,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


class Opaque:
    """A config field type that cannot be checked from YAML (like accelerate's ParallelismConfig)."""


class Optim(str, enum.Enum):
    ADAMW = "adamw_torch"
    SGD = "sgd"


@dataclasses.dataclass
class FakeConfig:
    """Stands in for a method's config class: TRL-like fields and annotations, no torch import."""

    output_dir: str | None = None
    seed: int = 42
    learning_rate: float = 1e-6
    max_steps: int = -1
    beta: float = 0.0
    gradient_checkpointing: bool = False
    report_to: None | str | list[str] = None
    loss_type: Literal["grpo", "dr_grpo"] = "grpo"
    optim: Optim | str = "adamw_torch"
    optimizers: list[Optim] | None = None
    model_init_kwargs: dict[str, Any] | str | None = None
    parallelism_config: Opaque | None = None
    reward_weights: list[float] | None = None
    num_generations: int = 8
    temperature: float = 1.0
    use_vllm: bool = False
    derived: int = dataclasses.field(default=0, init=False)


@pytest.fixture(autouse=True)
def fake_method(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("_recipe_fake_config")
    module.FakeConfig = FakeConfig
    monkeypatch.setitem(sys.modules, "_recipe_fake_config", module)
    monkeypatch.setitem(methods.METHODS, "fake", methods.MethodSpec("fake", "unused:Trainer", "_recipe_fake_config:FakeConfig", "grpo"))


MINIMAL = {"method": "fake", "model": {"name_or_path": "tiny-model"}, "output_dir": "/tmp/run"}

FULL_YAML = """\
# a full recipe: every section
method: fake
model:
  name_or_path: Qwen/Qwen3-0.6B
  dtype: bfloat16
  revision: main
  trust_remote_code: true
  peft: {r: 8, alpha: 16, dropout: 0.05, target_modules: [q_proj, v_proj], modules_to_save: [lm_head]}
data:
  train: gsm8k
  eval: {task: math500, split: test, limit: 50, options: {level: 5}}
  system_prompt: Think step by step.
rewards:
  - accuracy
  - {name: format, weight: 1, options: {strict: true}}
rollout: {engine: vllm, num_generations: 4, max_new_tokens: 128, temperature: 0.9, top_k: 20, vllm: {gpu_memory_utilization: 0.3}}
trainer: {learning_rate: 1e-5, max_steps: 10, report_to: [none], optim: sgd, beta: 0}
eval: {before: true, suites: [gsm8k, math500], every_n_steps: 50}
output_dir: /tmp/out
seed: 7
"""


def write(path: Path, data: dict | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def deep_update(data: dict, changes: dict) -> dict:
    """`changes` merged into a copy of `data`; the value `DELETE` removes a key."""
    out = copy.deepcopy(data)
    for key, value in changes.items():
        if value is DELETE:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = value
    return out


DELETE = object()


def problems_of(tmp_path: Path, changes: dict, overrides: tuple[str, ...] = ()) -> list[str]:
    path = write(tmp_path / "recipe.yaml", deep_update(MINIMAL, changes))
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    assert str(path) in str(info.value).splitlines()[0]  # the header names the file
    return info.value.problems


# --- loading ------------------------------------------------------------------------------------------


def test_full_recipe_loads_into_typed_dataclasses(tmp_path: Path) -> None:
    path = write(tmp_path / "full.yaml", FULL_YAML)
    recipe = load_recipe(path)
    assert recipe.source == str(path)
    assert recipe.method == "fake" and recipe.output_dir == "/tmp/out" and recipe.seed == 7
    assert recipe.model == ModelSpec(
        name_or_path="Qwen/Qwen3-0.6B",
        dtype="bfloat16",
        revision="main",
        trust_remote_code=True,
        peft=PeftSpec(r=8, alpha=16, dropout=0.05, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
    )
    assert recipe.data == DataSpec(
        train=TaskSpec(task="gsm8k"),
        eval=TaskSpec(task="math500", split="test", limit=50, options={"level": 5}),
        system_prompt="Think step by step.",
    )
    assert recipe.rewards == [RewardSpec(name="accuracy"), RewardSpec(name="format", weight=1.0, options={"strict": True})]
    assert isinstance(recipe.rewards[1].weight, float)  # int widened for a float field
    assert recipe.rollout == RolloutSpec(
        engine="vllm", num_generations=4, max_new_tokens=128, temperature=0.9, top_k=20, vllm={"gpu_memory_utilization": 0.3}
    )
    assert recipe.eval == EvalSpec(before=True, suites=["gsm8k", "math500"], every_n_steps=50)
    # `1e-5` is a float, not YAML 1.1's string; trainer values are kept as written
    assert recipe.trainer == {"learning_rate": 1e-5, "max_steps": 10, "report_to": ["none"], "optim": "sgd", "beta": 0}
    assert isinstance(recipe.trainer["learning_rate"], float)


def test_minimal_recipe_gets_defaults(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path / "r.yaml", MINIMAL))
    assert recipe.model == ModelSpec(name_or_path="tiny-model")
    assert recipe.model.dtype == "auto" and recipe.model.peft is None and recipe.model.trust_remote_code is False
    assert recipe.data == DataSpec() and recipe.data.train is None
    assert recipe.rewards == [] and recipe.trainer == {} and recipe.seed == 42
    assert recipe.rollout == RolloutSpec()
    assert (recipe.rollout.engine, recipe.rollout.num_generations, recipe.rollout.max_new_tokens) == ("hf", 8, 256)
    assert recipe.eval == EvalSpec() and recipe.eval.batch_size == 32 and recipe.eval.max_new_tokens is None
    assert PeftSpec() == PeftSpec(r=16, alpha=32, dropout=0.0, target_modules="all-linear", modules_to_save=None)


def test_null_resets_a_defaulted_field_and_keeps_optional_none(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path / "r.yaml", {**MINIMAL, "rollout": {"temperature": None, "top_k": None}, "rewards": None}))
    assert recipe.rollout.temperature == 1.0 and recipe.rollout.top_k is None and recipe.rewards == []


def test_recipe_from_dict_validates_data_built_in_code() -> None:
    assert recipe_from_dict(MINIMAL, source="code") == Recipe(method="fake", model=ModelSpec("tiny-model"), output_dir="/tmp/run")
    with pytest.raises(RecipeError) as info:
        recipe_from_dict({**MINIMAL, "base": "x.yaml", "seed": -1}, source="code")
    assert str(info.value).splitlines()[0] == "invalid recipe code: 2 problems"
    assert info.value.problems == ["base: only allowed in recipe files (resolved by load_recipe)", "seed: must be >= 0, got -1"]


# --- base: inheritance ----------------------------------------------------------------------------------


def test_base_chain_merges_mappings_replaces_lists_and_null_clears(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(
        tmp_path / "bases" / "root.yaml",
        {
            "method": "fake",
            "model": {"name_or_path": "root-model", "dtype": "bfloat16", "peft": {"r": 4}},
            "rewards": ["accuracy", "format"],
            "rollout": {"num_generations": 4, "temperature": 0.7},
            "trainer": {"learning_rate": 1e-5, "max_steps": 100},
            "output_dir": "/tmp/root",
        },
    )
    write(tmp_path / "variants" / "mid.yaml", {"base": "../bases/root.yaml", "rollout": {"temperature": 0.9}, "seed": 1})
    child = write(
        tmp_path / "variants" / "child.yaml",
        {"base": "mid.yaml", "model": {"peft": None}, "rewards": ["accuracy"], "trainer": {"max_steps": 5}},
    )
    monkeypatch.chdir(tmp_path / "bases")  # base paths are relative to the naming file, not the cwd
    recipe = load_recipe(child)
    assert recipe.model == ModelSpec(name_or_path="root-model", dtype="bfloat16", peft=None)  # merged, LoRA cleared
    assert recipe.rewards == [RewardSpec(name="accuracy")]  # list replaced, not appended
    assert (recipe.rollout.num_generations, recipe.rollout.temperature) == (4, 0.9)  # 2 levels deep
    assert recipe.trainer == {"learning_rate": 1e-5, "max_steps": 5}
    assert recipe.seed == 1 and recipe.output_dir == "/tmp/root"
    assert "base" not in recipe.to_dict()


@pytest.mark.parametrize("files", [{"a.yaml": "b.yaml", "b.yaml": "a.yaml"}, {"a.yaml": "a.yaml"}], ids=["two-files", "self"])
def test_base_cycle_names_the_files(tmp_path: Path, files: dict[str, str]) -> None:
    for name, base in files.items():
        write(tmp_path / name, {**MINIMAL, "base": base})
    with pytest.raises(RecipeError, match="base cycle") as info:
        load_recipe(tmp_path / "a.yaml")
    for name in files:
        assert name in str(info.value)


def test_missing_base_file_names_it_and_the_child(tmp_path: Path) -> None:
    child = write(tmp_path / "child.yaml", {**MINIMAL, "base": "nope.yaml"})
    with pytest.raises(RecipeError, match=r"child\.yaml: base: recipe file not found: .*nope\.yaml"):
        load_recipe(child)


# --- overrides ------------------------------------------------------------------------------------------

BASE_FOR_OVERRIDES = {**MINIMAL, "model": {"name_or_path": "m", "peft": {"r": 8}}, "rewards": ["accuracy", {"name": "format"}]}


@pytest.mark.parametrize(
    ("override", "get", "expected"),
    [
        ("trainer.max_steps=2", lambda r: r.trainer["max_steps"], 2),
        ("trainer.learning_rate=1e-5", lambda r: r.trainer["learning_rate"], 1e-5),
        ("output_dir=/tmp/x", lambda r: r.output_dir, "/tmp/x"),
        ("model.peft=null", lambda r: r.model.peft, None),
        ("rollout.temperature=0.7", lambda r: r.rollout.temperature, 0.7),
        ("rewards=[accuracy, format]", lambda r: r.rewards, [RewardSpec("accuracy"), RewardSpec("format")]),
        ("model.peft.target_modules=[q_proj,v_proj]", lambda r: r.model.peft.target_modules, ["q_proj", "v_proj"]),
        ("rewards.0.weight=0.5", lambda r: r.rewards[0], RewardSpec("accuracy", weight=0.5)),  # index into shorthand
        ("rewards.1.options={k: 1}", lambda r: r.rewards[1].options, {"k": 1}),
        ("data.train.task=gsm8k", lambda r: r.data.train, TaskSpec("gsm8k")),  # creates missing sections
        ("model.peft.r=4", lambda r: r.model.peft, PeftSpec(r=4)),
        ("data.system_prompt='a: b'", lambda r: r.data.system_prompt, "a: b"),
        ("seed = 3", lambda r: r.seed, 3),
    ],
)
def test_override_forms(tmp_path: Path, override: str, get, expected: Any) -> None:
    recipe = load_recipe(write(tmp_path / "r.yaml", BASE_FOR_OVERRIDES), [override])
    assert get(recipe) == expected


def test_overrides_apply_in_order_after_base(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", {**MINIMAL, "model": {"name_or_path": "m", "peft": None}})
    child = write(tmp_path / "child.yaml", {"base": "base.yaml", "seed": 1})
    recipe = load_recipe(child, ["model.peft.r=4", "seed=2", "data.train=gsm8k", "data.train.limit=8"])
    assert recipe.model.peft == PeftSpec(r=4) and recipe.seed == 2
    assert recipe.data.train == TaskSpec("gsm8k", limit=8)


def test_parse_overrides_returns_paths_and_yaml_values() -> None:
    assert parse_overrides(["rewards.0.weight=0.5", "a.b=[x, 1]", "c=null", "d=k=v"]) == [
        (["rewards", 0, "weight"], 0.5),
        (["a", "b"], ["x", 1]),
        (["c"], None),
        (["d"], "k=v"),
    ]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.max_steps"], "override 'trainer.max_steps': expected 'key.path=value' (no '=')"),
        (["a..b=1"], "override 'a..b=1': empty key or key part"),
        (["=1"], "override '=1': empty key or key part"),
        (["rewards=[a, b"], "override 'rewards=[a, b': value is not valid YAML"),
    ],
)
def test_bad_override_syntax(tmp_path: Path, overrides: list[str], message: str) -> None:
    path = write(tmp_path / "r.yaml", MINIMAL)
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    assert message in str(info.value) and str(path) in str(info.value)
    with pytest.raises(RecipeError, match="override"):
        parse_overrides(overrides)


def test_override_problems_are_reported_with_validation_problems(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, {"rewards": ["accuracy"]}, ("rewards.3.weight=1", "rewards.x=1", "seed=ten"))
    assert problems == [
        "override of 'rewards.3.weight': rewards[3]: index out of range (list has 1 items)",
        "override of 'rewards.x': rewards.x: a list needs an integer index (list has 1 items)",
        "seed: expected int, got str 'ten'",
    ]


def test_base_cannot_be_overridden(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, {}, ("base=other.yaml",))
    assert problems == ["override of 'base': base is resolved before overrides; name the file to load instead"]


def test_overrides_must_be_a_sequence_not_one_string(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        load_recipe(write(tmp_path / "r.yaml", MINIMAL), "seed=1")


# --- validation errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"ouput_dir": "x"}, "unknown key 'ouput_dir'. Did you mean 'output_dir'?"),
        ({"model": {"dtpye": "auto"}}, "unknown key 'model.dtpye'. Did you mean 'model.dtype'?"),
        ({"model": {"peft": {"rr": 4}}}, "unknown key 'model.peft.rr'. Did you mean 'model.peft.r'?"),
        ({"data": {"trian": "gsm8k"}}, "unknown key 'data.trian'. Did you mean 'data.train'?"),
        ({"data": {"train": {"task": "t", "splt": "x"}}}, "unknown key 'data.train.splt'. Did you mean 'data.train.split'?"),
        ({"rewards": ["a", {"name": "b", "wieght": 1}]}, "unknown key 'rewards[1].wieght'. Did you mean 'rewards[1].weight'?"),
        ({"rollout": {"temprature": 1}}, "unknown key 'rollout.temprature'. Did you mean 'rollout.temperature'?"),
        ({"eval": {"sutes": []}}, "unknown key 'eval.sutes'. Did you mean 'eval.suites'?"),
        ({"trainer": {"learnign_rate": 1e-5}}, "unknown key 'trainer.learnign_rate'. Did you mean 'trainer.learning_rate'?"),
        ({"rollout": {"zzz": 1}}, "unknown key 'rollout.zzz' (allowed: engine, num_generations,"),
        ({"trainer": {"zzz": 1}}, "unknown key 'trainer.zzz' (not a field of FakeConfig)"),
        ({"trainer": {"derived": 1}}, "unknown key 'trainer.derived'"),  # init=False fields are not settable
    ],
)
def test_unknown_keys_with_suggestions(tmp_path: Path, changes: dict, message: str) -> None:
    problems = problems_of(tmp_path, changes)
    assert len(problems) == 1 and problems[0].startswith(message)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"trainer": {"max_steps": "ten"}}, "trainer.max_steps: expected int, got str 'ten'"),
        ({"trainer": {"learning_rate": True}}, "trainer.learning_rate: expected float, got bool True"),
        ({"trainer": {"gradient_checkpointing": 1}}, "trainer.gradient_checkpointing: expected bool, got int 1"),
        ({"trainer": {"report_to": 5}}, "trainer.report_to: expected None | str | list[str], got int 5"),
        ({"trainer": {"report_to": ["a", 5]}}, "trainer.report_to[1]: expected str, got int 5"),
        ({"trainer": {"loss_type": "sft"}}, "trainer.loss_type: expected one of 'grpo', 'dr_grpo', got str 'sft'"),
        ({"trainer": {"optimizers": ["sgd", "adam"]}}, "trainer.optimizers[1]: expected one of 'adamw_torch', 'sgd', got str 'adam'"),
        ({"trainer": {"model_init_kwargs": 3}}, "trainer.model_init_kwargs: expected dict[str, any] | str | None, got int 3"),
        ({"trainer": {"max_steps": None}, "seed": "x"}, "seed: expected int, got str 'x'"),  # null clears max_steps
        ({"seed": True}, "seed: expected int, got bool True"),  # YAML `yes`
        ({"rollout": {"num_generations": True}}, "rollout.num_generations: expected int, got bool True"),
        ({"rollout": {"num_generations": 2.5}}, "rollout.num_generations: expected int, got float 2.5"),
        ({"rollout": {"num_generations": 0}}, "rollout.num_generations: must be >= 1, got 0"),
        ({"rollout": {"top_p": 1.5}}, "rollout.top_p: must be <= 1, got 1.5"),
        ({"rollout": {"vllm": [1]}}, "rollout.vllm: expected dict, got list [1]"),
        ({"rewards": [{"name": "a", "weight": "high"}]}, "rewards[0].weight: expected float, got str 'high'"),
        ({"rewards": "accuracy"}, "rewards: expected list[mapping], got str 'accuracy'"),
        ({"rewards": [5]}, "rewards[0]: expected mapping or str (the name), got int 5"),
        ({"data": {"train": 5}}, "data.train: expected mapping or str (the task), got int 5"),
        ({"data": {"train": {"task": "t", "options": {1: "x"}}}}, "data.train.options.1: expected str, got int 1"),
        ({"eval": {"suites": ["a", 1]}}, "eval.suites[1]: expected str, got int 1"),
        ({"eval": {"every_n_steps": "often"}}, "eval.every_n_steps: expected int, got str 'often'"),
        ({"model": "qwen"}, "model: expected mapping, got str 'qwen'"),
        ({"model": {"peft": {"target_modules": 5}}}, "model.peft.target_modules: expected str | list[str], got int 5"),
        ({"model": {"peft": {"target_modules": ["q", 1]}}}, "model.peft.target_modules[1]: expected str, got int 1"),
        ({"model": {"trust_remote_code": "yes please"}}, "model.trust_remote_code: expected bool, got str 'yes please'"),
        ({"trainer": [1]}, "trainer: expected mapping, got list [1]"),
        ({"method": 3}, "method: expected str, got int 3"),
    ],
)
def test_wrong_types_name_expected_and_got(tmp_path: Path, changes: dict, message: str) -> None:
    assert problems_of(tmp_path, changes) == [message]


def test_accepted_values_for_flexible_annotations(tmp_path: Path) -> None:
    trainer = {
        "learning_rate": 1,  # int for float
        "report_to": None,  # None for Optional
        "optim": "anything",  # Enum | str
        "optimizers": ["sgd"],  # list[Enum] by value
        "model_init_kwargs": {"torch_dtype": "bfloat16"},
        "parallelism_config": {"dp": 2},  # uncheckable class: accepted
        "beta": None,  # null for a non-optional field: dropped, the config default applies
    }
    recipe = load_recipe(write(tmp_path / "r.yaml", {**MINIMAL, "model": {"name_or_path": "m", "peft": {"target_modules": "all-linear"}}, "trainer": trainer}))
    assert recipe.trainer == {k: v for k, v in trainer.items() if k != "beta"}
    assert recipe.model.peft.target_modules == "all-linear"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model": {"name_or_path": DELETE}}, "missing required key 'model.name_or_path'"),
        ({"model": DELETE}, "missing required key 'model.name_or_path'"),
        ({"model": {"name_or_path": None}}, "missing required key 'model.name_or_path'"),
        ({"method": DELETE}, "missing required key 'method'"),
        ({"output_dir": DELETE}, "missing required key 'output_dir'"),
        ({"rewards": [{"weight": 1}]}, "missing required key 'rewards[0].name'"),
        ({"data": {"eval": {"split": "test"}}}, "missing required key 'data.eval.task'"),
    ],
)
def test_missing_required_keys(tmp_path: Path, changes: dict, message: str) -> None:
    assert problems_of(tmp_path, changes) == [message]


def test_unknown_method_suggests_and_still_reports_the_rest(tmp_path: Path) -> None:
    changes = {"method": "gpro", "ouput_dir": "x", "trainer": {"learnign_rate": 1, "temperature": 0.5}}
    problems = problems_of(tmp_path, changes)
    assert problems[0].startswith("method: unknown method 'gpro'") and problems[0].endswith("Did you mean 'grpo'?")
    assert "unknown key 'ouput_dir'. Did you mean 'output_dir'?" in problems
    assert "trainer.temperature is set by rollout.temperature" in problems  # owned keys need no config class
    assert not any("learnign_rate" in p for p in problems)  # trainer keys unchecked without a method
    assert len(problems) == 3


def test_config_class_that_fails_to_import_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(methods.METHODS, "broken", methods.MethodSpec("broken", "x:T", "_no_such_module_here:Config", "grpo"))
    problems = problems_of(tmp_path, {"method": "broken"})
    assert problems == [
        "method: cannot load config class _no_such_module_here:Config of method 'broken': "
        "ModuleNotFoundError: No module named '_no_such_module_here'"
    ]


@pytest.mark.parametrize("key", sorted(OWNED_TRAINER_KEYS))
def test_owned_trainer_keys_point_to_their_section(tmp_path: Path, key: str) -> None:
    assert problems_of(tmp_path, {"trainer": {key: None}}) == [f"trainer.{key} is set by {OWNED_TRAINER_KEYS[key]}"]


def test_owned_trainer_key_messages() -> None:
    assert OWNED_TRAINER_KEYS["temperature"] == "rollout.temperature"
    assert OWNED_TRAINER_KEYS["max_completion_length"] == "rollout.max_new_tokens"
    assert OWNED_TRAINER_KEYS["use_vllm"] == "rollout.engine" and OWNED_TRAINER_KEYS["vllm_mode"] == "rollout.vllm"
    assert OWNED_TRAINER_KEYS["reward_weights"] == "rewards[].weight"
    assert OWNED_TRAINER_KEYS["output_dir"].startswith("output_dir") and OWNED_TRAINER_KEYS["seed"].startswith("seed")
    assert set(OWNED_TRAINER_KEYS) == {
        "output_dir", "seed", "num_generations", "max_completion_length", "temperature", "top_p", "top_k",
        "min_p", "repetition_penalty", "use_vllm", "vllm_mode", "reward_weights",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model": {"dtype": "fp16"}}, "model.dtype: expected one of 'auto', 'float32', 'bfloat16', 'float16', got str 'fp16'"),
        ({"model": {"dtype": "bf16"}}, "model.dtype: expected one of 'auto', 'float32', 'bfloat16', 'float16', got str 'bf16'. Did you mean 'bfloat16'?"),
        ({"rollout": {"engine": "vlm"}}, "rollout.engine: expected one of 'hf', 'vllm', got str 'vlm'. Did you mean 'vllm'?"),
        ({"rollout": {"engine": 1}}, "rollout.engine: expected one of 'hf', 'vllm', got int 1"),
    ],
)
def test_bad_enum_values_list_the_choices(tmp_path: Path, changes: dict, message: str) -> None:
    assert problems_of(tmp_path, changes) == [message]


def test_multiple_errors_are_reported_together(tmp_path: Path) -> None:
    changes = {
        "model": {"name_or_path": DELETE, "peft": {"rr": 1}},
        "rewards": ["a", {"name": "b", "weight": "x"}],
        "trainer": {"max_steps": "ten", "top_p": 0.9},
        "output_dir": DELETE,
        "seed": True,
    }
    path = write(tmp_path / "multi.yaml", deep_update(MINIMAL, changes))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    lines = str(info.value).splitlines()
    assert lines[0] == f"invalid recipe {path}: 7 problems"
    assert lines[1:] == [
        "  - missing required key 'model.name_or_path'",
        "  - unknown key 'model.peft.rr'. Did you mean 'model.peft.r'?",
        "  - rewards[1].weight: expected float, got str 'x'",
        "  - trainer.max_steps: expected int, got str 'ten'",
        "  - trainer.top_p is set by rollout.top_p",
        "  - missing required key 'output_dir'",
        "  - seed: expected int, got bool True",
    ]
    assert isinstance(info.value, ValueError)


# --- files ----------------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"recipe file not found: .*nowhere\.yaml"):
        load_recipe(tmp_path / "nowhere.yaml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("method: fake\nmodel: {name_or_path: m\noutput_dir: x\n", r"invalid YAML in .*bad\.yaml: line 3"),
        ("method: fake\nseed: 1\nseed: 2\n", r"invalid YAML in .*bad\.yaml: line 3, column 1: found duplicate key 'seed'"),
        ("- a\n- b\n", r"bad\.yaml: top level must be a mapping, got list"),
    ],
)
def test_bad_yaml_names_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        load_recipe(write(tmp_path / "bad.yaml", text))


def test_yaml_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    text = "method: fake\nmodel: {name_or_path: m}\noutput_dir: x\nrollout: &r {top_k: 5}\neval: {<<: *r, n: 2}\n"
    problems = []
    try:
        load_recipe(write(tmp_path / "r.yaml", text))
    except RecipeError as err:
        problems = err.problems
    assert problems == ["unknown key 'eval.top_k' (allowed: before, after, limit, batch_size, max_new_tokens, temperature, n, suites, every_n_steps)"]


def test_save_round_trips(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", FULL_YAML)
    child = write(tmp_path / "child.yaml", {"base": "base.yaml", "model": {"peft": None}})
    recipe = load_recipe(child, ["trainer.max_steps=3", "rewards.1.weight=0.25"])
    saved = recipe.save(tmp_path / "run")
    assert saved == tmp_path / "run" / "recipe.yaml"
    text = saved.read_text()
    assert "base:" not in text
    again = load_recipe(saved)
    assert again == recipe and again.source == str(saved)
    assert again.trainer["max_steps"] == 3 and again.rewards[1].weight == 0.25 and again.model.peft is None
    assert yaml.safe_load(recipe.to_yaml()) == recipe.to_dict()
    assert "source" not in recipe.to_dict()
    assert list(recipe.to_dict()) == ["method", "model", "data", "rewards", "rollout", "trainer", "eval", "output_dir", "seed"]


def test_save_defaults_to_the_recipe_output_dir(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path / "r.yaml", {**MINIMAL, "output_dir": str(tmp_path / "out")}))
    assert recipe.save() == tmp_path / "out" / "recipe.yaml"
    assert load_recipe(tmp_path / "out" / "recipe.yaml") == recipe


def test_to_dict_is_plain_data(tmp_path: Path) -> None:
    data = load_recipe(write(tmp_path / "full.yaml", FULL_YAML)).to_dict()
    assert data["model"]["peft"] == {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]}
    assert data["rewards"][0] == {"name": "accuracy", "weight": 1.0, "options": {}}
    assert data["data"]["train"] == {"task": "gsm8k", "path": None, "split": None, "limit": None, "options": {}}
    yaml.safe_dump(data)  # raises on anything that is not plain data


def test_import_does_not_load_torch_or_trl() -> None:
    code = "import sys, posttrain.recipe; print(sorted(m for m in ('torch', 'trl', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_trainer_keys_against_trl_grpo_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TRL's real annotations: Enum | str, None | str | list[str], str | list[Enum], Optional classes."""
    monkeypatch.setitem(methods.METHODS, "trl_grpo", methods.MethodSpec("trl_grpo", "trl:GRPOTrainer", "trl.trainer.grpo_config:GRPOConfig", "grpo"))
    good = {
        "learning_rate": 1e-6,
        "lr_scheduler_type": "cosine",
        "report_to": "none",
        "debug": "underflow_overflow",
        "parallelism_config": None,
        "model_init_kwargs": {"dtype": "bfloat16"},
        "max_steps": 2,
        "beta": 0.04,
        "per_device_train_batch_size": 8,  # TRL's own check, run at load: divisible by num_generations (8)
        "gradient_checkpointing": True,
    }
    recipe = load_recipe(write(tmp_path / "r.yaml", {**MINIMAL, "method": "trl_grpo", "trainer": good}))
    assert recipe.trainer == good
    bad = {"learnign_rate": 1e-6, "max_steps": "ten", "temperature": 0.7, "bf16": "yes", "report_to": 1, "debug": 2}
    problems = problems_of(tmp_path, {"method": "trl_grpo", "trainer": bad})
    assert problems == [
        "unknown key 'trainer.learnign_rate'. Did you mean 'trainer.learning_rate'?",
        "trainer.max_steps: expected int, got str 'ten'",
        "trainer.temperature is set by rollout.temperature",
        "trainer.bf16: expected bool, got str 'yes'",
        "trainer.report_to: expected None | str | list[str], got int 1",
        "trainer.debug: expected str | list[DebugOption], got int 2",
    ]
