import json
import subprocess
import sys

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
