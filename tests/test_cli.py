import json
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.cli import build_parser, main


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "posttrain", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("argv", [[], ["train"], ["quickstart"], ["models"], ["models", "pull"], ["models", "list"]])
def test_help_everywhere(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*argv, "--help"])
    assert exit_info.value.code == 0
    assert "usage: posttrain" in capsys.readouterr().out


def test_bad_recipe_exits_2_with_key_path(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: grpo\nmodel: {name_or_path: tiny-qwen2}\noutput_dir: x\ntrainer: {learnign_rate: 1}\n")
    proc = run_cli("train", str(bad))
    assert proc.returncode == 2
    assert "trainer.learnign_rate" in proc.stderr and "Did you mean 'trainer.learning_rate'" in proc.stderr


def test_missing_recipe_file(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "no/such/recipe.yaml"])
    assert exit_info.value.code == 2
    assert "recipe not found" in capsys.readouterr().err


def test_models_list_and_pull(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path))
    with pytest.raises(SystemExit):
        main(["models", "pull", "tiny-qwen2"])
    path = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads((tmp_path / "models" / "tiny-qwen2" / "config.json").read_text())["model_type"] == "qwen2"
    assert path == str(tmp_path / "models" / "tiny-qwen2")
    with pytest.raises(SystemExit):
        main(["models", "list"])
    out = capsys.readouterr().out
    assert "tiny-qwen2" in out and "[pulled]" in out and "smollm2-135m-instruct" in out


def test_train_via_cli_with_overrides(tmp_path):
    proc = run_cli("train", "recipes/grpo/grpo.yaml", "model.name_or_path=tiny-qwen2", "trainer.max_steps=1",
                   "eval.before=false", "eval.after=false", "rollout.max_new_tokens=6", f"output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resolved recipe" in proc.stdout
    assert json.loads((tmp_path / "trainer_state.json").read_text())["global_step"] == 1


REPO = Path(__file__).resolve().parents[1]
RECIPE_FILES = sorted((REPO / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPE_FILES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_validate_accepts_every_shipped_recipe(recipe, capsys):
    with pytest.raises(SystemExit) as code:
        main(["validate", str(recipe)])
    assert code.value.code == 0
    assert "# resolved recipe" in capsys.readouterr().out


@pytest.mark.parametrize("overrides, message", [
    (["rollout.num_generations=1"], "rollout.num_generations: GRPO needs at least 2 completions per prompt"),
    (["rollout.num_generations=3"], "rollout.num_generations / trainer.per_device_train_batch_size: "
                                    "generation_batch_size (16) must be divisible by num_generations (3)"),
    (["trainer.loss_type=dapoo"], "trainer.loss_type: 'dapoo' is not one of TRL's GRPO losses"),
    (["rollout.engine=vllm", "rollout.vllm.mode=server", "rollout.vllm.base_url=http://a:8000,b:8000"],
     "rollout.vllm.base_url: base_url entry 1 ('b:8000') is not a server address like http://host:8000"),
    (["model.peft=null", "rollout.engine=vllm", "rollout.vllm.mode=server",
      "rollout.vllm.base_url=[http://a:8000,http://b:8000]"],
     "rollout.vllm.base_url: 2 servers need LoRA training (model.peft)"),
])
def test_validate_reports_trl_config_problems_before_any_model_loads(overrides, message, capsys, monkeypatch, tmp_path):
    import posttrain.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as code:
        main(["validate", "recipes/quickstart.yaml", *overrides, f"output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code.value.code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit) as code:  # `posttrain train` refuses the same recipe the same way
        main(["train", "recipes/quickstart.yaml", *overrides, f"output_dir={tmp_path / 'run'}"])
    assert code.value.code == 2 and message in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_validate_prints_the_effective_batch_shapes(capsys):
    with pytest.raises(SystemExit):
        main(["validate", "recipes/quickstart.yaml", "trainer.gradient_accumulation_steps=2"])
    out = capsys.readouterr().out
    assert "generation_batch_size: 32" in out and "prompts_per_optimizer_step: 4" in out


@pytest.mark.parametrize("key, overrides, printed", [
    ("model.peft.r", ["model.peft.r=64"], "64"),
    ("model.peft.r", ["model.peft=null"], "null"),  # below a null section
    ("model.peft.target_modules", [], "all-linear"),
    ("rewards.0.name", [], "accuracy"),
    ("data.train.options", [], "{min_value: 1, max_value: 20}"),  # in the recipe's order
    ("rollout.vllm.mode", ["rollout.engine=vllm", "rollout.vllm.mode=server",
                           "rollout.vllm.base_url=http://a:8000"], "server"),
    ("trainer.learning_rate", [], "0.0002"),
])
def test_validate_get_prints_one_resolved_value(key, overrides, printed, capsys):
    with pytest.raises(SystemExit) as code:
        main(["validate", "recipes/grpo/grpo.yaml", *overrides, "--get", key])
    assert code.value.code == 0
    assert capsys.readouterr().out == printed + "\n"  # nothing else on stdout: a script reads it


@pytest.mark.parametrize("key, message", [
    ("model.pef.r", "unknown key 'model.pef'. Did you mean 'model.peft'?"),
    ("trainer.warmup_ratio", "'trainer.warmup_ratio' is not set in the recipe (its default applies"),
    ("seed.x", "'seed' is a value (42), not a section"),
    ("rewards.3", "'rewards' has 1 entry; no '3'"),
])
def test_validate_get_names_a_key_it_cannot_read(key, message, capsys):
    with pytest.raises(SystemExit) as code:
        main(["validate", "recipes/grpo/grpo.yaml", "--get", key])
    captured = capsys.readouterr()
    assert code.value.code == 2 and message in captured.err and captured.out == ""


def test_recipes_list_copy_and_the_copy_trains_the_same_recipe(tmp_path, capsys):
    from posttrain.recipe import load_recipe

    with pytest.raises(SystemExit):
        main(["recipes", "list"])
    listed = capsys.readouterr().out
    assert "quickstart.yaml" in listed and "grpo/steer.yaml" in listed
    with pytest.raises(SystemExit) as code:
        main(["recipes", "copy", "quickstart", str(tmp_path)])
    assert code.value.code == 0
    copied = tmp_path / "quickstart.yaml"
    assert "base:" not in copied.read_text() and copied.read_text().startswith("# The quickstart")
    original = load_recipe(REPO / "recipes" / "quickstart.yaml")
    assert load_recipe(copied) == original  # the base chain merged in: the same recipe, standing alone
    with pytest.raises(SystemExit) as code:
        main(["recipes", "copy", "quickstart", str(tmp_path)])
    assert code.value.code == 2 and "exists" in capsys.readouterr().err


def test_shipped_recipe_names_resolve_as_their_headers_write_them():
    from posttrain.cli import find_recipe

    names = ("grpo/steer.yaml", "recipes/grpo/steer.yaml", "grpo/steer")
    assert len({find_recipe(n).resolve() for n in names}) == 1


def test_recipe_json_schema_accepts_every_shipped_recipe_and_catches_typos():
    jsonschema = pytest.importorskip("jsonschema")
    from posttrain.recipe import _resolve_file
    from posttrain.schema import recipe_json_schema

    schema = recipe_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for path in RECIPE_FILES:
        errors = list(validator.iter_errors(_resolve_file(path)))
        assert not errors, (path, [e.message for e in errors])
    bad = _resolve_file(REPO / "recipes" / "quickstart.yaml")
    bad["rollout"]["temprature"] = 0.7
    bad["model"]["peft"]["r"] = "sixteen"
    messages = " ".join(e.message for e in validator.iter_errors(bad))
    assert "temprature" in messages and "sixteen" in messages


def test_tasks_list_and_env(capsys):
    with pytest.raises(SystemExit):
        main(["tasks", "list"])
    out = capsys.readouterr().out
    assert "custom" in out and "arithmetic" in out and "options:" in out
    with pytest.raises(SystemExit):
        main(["env"])
    out = capsys.readouterr().out
    assert "- torch:" in out and "- trl:" in out and "- cuda:" in out


def test_a_wheel_install_ships_the_recipes_and_suites(tmp_path):
    """A non-editable install (a built wheel, not this checkout) finds the recipes and eval suites."""
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(REPO),
                    "-w", str(wheel_dir)], check=True)
    (wheel,) = wheel_dir.glob("posttrain-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True)
    code = ("import posttrain, posttrain.cli as c, posttrain.eval.suite as s; "
            "assert str(posttrain.__file__).startswith(%r), posttrain.__file__; "
            "print(c.find_recipe('grpo/steer.yaml')); print(s.find_suite('reasoning'))" % str(target))
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}).stdout.split()
    assert all(line.startswith(str(target)) and Path(line).is_file() for line in out), out
