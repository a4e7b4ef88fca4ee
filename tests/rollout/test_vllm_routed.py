"""Serving a continual checkpoint through vLLM: one LoRA adapter per group, each prompt generated with the adapter
its instruction routes to (`posttrain eval --engine vllm --adapter <stage folder>`).

Run: pytest -m vllm tests/rollout/test_vllm_routed.py -q
"""

import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from posttrain.recipe import load_recipe  # noqa: E402
from posttrain.train import run_recipe  # noqa: E402

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "continual"


def test_vllm_generates_each_group_with_its_own_lora(shared_data, tmp_path, monkeypatch):
    from posttrain.eval.api import run_eval
    from posttrain.rollout.vllm import VLLMEngine

    run = tmp_path / "run"
    run_recipe(load_recipe(RECIPES / "tiny.yaml", [f"data.path={shared_data / 'continual'}", f"output_dir={run}",
                                                   "data.train_limit=8", "data.test_limit=3", "trainer.max_steps=1",
                                                   "eval.every_n_steps=null", "eval.base=false"]))
    seen: list[tuple[str | None, int]] = []
    generate_ids = VLLMEngine.generate_ids

    def spy(self, prompt_ids, sampling=None, **kw):
        request = self._lora_request
        seen.append((None if request is None else request.lora_path, len(prompt_ids)))
        return generate_ids(self, prompt_ids, sampling, **kw)

    monkeypatch.setattr(VLLMEngine, "generate_ids", spy)
    checkpoint = run / "stage2_amazon"
    results = run_eval("tiny-qwen2", run / "continual_suite.yaml", tmp_path / "ev", adapter=str(checkpoint),
                       engine="vllm", batch_size=8, progress=False)
    assert results["model"]["routing"] == {"group_0": 6, "group_1": 3}
    by_folder: dict[str | None, int] = {}
    for path, n in seen:
        by_folder[path] = by_folder.get(path, 0) + n
    assert by_folder == {str((checkpoint / "group_0").resolve()): 6, str((checkpoint / "group_1").resolve()): 3}
    for task in ("sst2", "agnews", "amazon"):
        assert results["tasks"][task]["metrics"]["n_prompts"] == 3
