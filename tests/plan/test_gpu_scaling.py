"""bench/gpu_scaling.py, the prepared GPU check of docs/scaling.md, runs end to end on the CPU (a tiny Qwen2.5 of the
real vocabulary, no accelerate launch): each setup trains, logs its perf/ figures and gets the planner's estimate,
so a session lent a GPU runs it as it is."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_scaling_smoke_run_on_cpu(tmp_path):
    proc = subprocess.run([sys.executable, "bench/gpu_scaling.py", "--size", "tiny", "--launch", "none", "--steps", "2",
                           "--max-new-tokens", "6", "--accumulation", "1", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["meta"]["device"] == "CPU" and [r["setup"] for r in results["results"]] == ["full", "lora"]
    for r in results["results"]:
        assert r["returncode"] == 0 and len(r["steps"]) == 2
        assert r["perf"]["median_step_seconds"] > 0 and r["perf"]["median_tokens_per_second"] > 0
        assert 0 < r["plan_gb"]["total"] and r["plan_gb"]["weights"] > 0
    full, lora = results["results"]
    assert lora["plan_gb"]["optimizer"] < full["plan_gb"]["optimizer"]  # LoRA trains far fewer parameters
    table = (tmp_path / "table.md").read_text()
    assert "| none | full | 0 |" in table and "| none | lora | 0 |" in table
