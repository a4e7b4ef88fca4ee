"""The runner dispatches on the method's kind through the registries; a kind's sections are its own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pytest

from posttrain import methods, pipelines
from posttrain.pipelines.base import Pipeline, RunOutcome
from posttrain.recipe import EvalSpec, RecipeError, recipe_from_dict
from posttrain.train import run_recipe


@dataclass
class ToyData:
    pairs: str
    size: int = 3


@dataclass
class ToyEval(EvalSpec):
    extra: bool = False


CALLS: list[str] = []


class ToyPipeline(Pipeline):
    kind: ClassVar[str] = "toy"
    data_spec: ClassVar[type] = ToyData
    eval_spec: ClassVar[type] = ToyEval
    sections: ClassVar[frozenset[str]] = frozenset({"rollout"})
    owned_trainer_keys: ClassVar[dict[str, str]] = {"output_dir": "output_dir (top level)",
                                                    "learning_rate": "data.size"}

    def check(self, recipe):
        return [] if recipe.data.size > 0 else ["data.size: must be > 0"]

    def prepare(self, ctx):
        assert not (ctx.output_dir / "recipe.yaml").exists(), "nothing is written before prepare"
        CALLS.append("prepare")
        return {"n": ctx.recipe.data.size}

    def load(self, ctx):
        CALLS.append("load")
        return "model", "tokenizer"

    def run(self, ctx, prepared):
        CALLS.append(f"run:{ctx.model}:{prepared['n']}")
        return RunOutcome(summary={"method": ctx.recipe.method, "n": prepared["n"]}, log_history=[{"loss": 1.0}])


@pytest.fixture
def toy_kind(monkeypatch):
    monkeypatch.setitem(pipelines.PIPELINES, "toy", f"{__name__}:ToyPipeline")
    monkeypatch.setitem(methods.METHODS, "toy_method",
                        methods.MethodSpec("toy_method", "transformers:Trainer", "transformers:TrainingArguments",
                                           "toy"))
    CALLS.clear()


def _toy(tmp_path, **extra: Any) -> dict[str, Any]:
    return {"method": "toy_method", "model": {"name_or_path": "tiny-qwen2"}, "data": {"pairs": "p.jsonl"},
            "output_dir": str(tmp_path), **extra}


def test_data_and_eval_use_the_kinds_dataclasses(toy_kind, tmp_path):
    r = recipe_from_dict(_toy(tmp_path, eval={"extra": True, "limit": 4}))
    assert r.data == ToyData(pairs="p.jsonl") and isinstance(r.eval, ToyEval) and r.eval.extra and r.eval.limit == 4


def test_a_section_the_kind_does_not_read_is_an_error(toy_kind, tmp_path):
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(_toy(tmp_path, rewards=["accuracy"], rollout={"max_new_tokens": 4}))
    assert err.value.problems == ["rewards: method 'toy_method' (kind 'toy') does not read a rewards section "
                                  "(its sections: data, eval, rollout, trainer); remove it"]


def test_kind_data_keys_and_owned_trainer_keys_are_checked(toy_kind, tmp_path):
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(_toy(tmp_path, data={"pairs": "p", "sise": 2}, trainer={"learning_rate": 1e-3}))
    assert "unknown key 'data.sise'. Did you mean 'data.size'?" in err.value.problems
    assert "trainer.learning_rate is set by data.size" in err.value.problems


def test_the_kinds_cross_section_check_runs_at_load(toy_kind, tmp_path):
    with pytest.raises(RecipeError, match="data.size: must be > 0"):
        recipe_from_dict(_toy(tmp_path, data={"pairs": "p", "size": 0}))


def test_runner_prepares_before_loading_and_writes_the_report(toy_kind, tmp_path):
    result = run_recipe(recipe_from_dict(_toy(tmp_path)))
    assert CALLS == ["prepare", "load", "run:model:3"]
    assert result.summary == {"method": "toy_method", "n": 3}
    assert (tmp_path / "recipe.yaml").is_file() and (tmp_path / "report" / "recipe.yaml").is_file()
    assert (tmp_path / "report" / "summary.json").is_file() and (tmp_path / "report" / "metrics.jsonl").is_file()


def test_every_registered_method_has_a_pipeline_with_its_kind():
    for name, spec in methods.METHODS.items():
        assert pipelines.get_pipeline(spec.kind).kind == spec.kind, name


def test_grpo_recipe_refuses_nothing_it_reads(tmp_path):
    r = recipe_from_dict({"method": "grpo", "model": {"name_or_path": "tiny-qwen2"}, "rewards": ["accuracy"],
                          "rollout": {"num_generations": 4}, "output_dir": str(tmp_path)})
    assert r.rollout.num_generations == 4 and r.rewards[0].name == "accuracy"
