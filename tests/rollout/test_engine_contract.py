"""Engine details that need no vLLM install: the server client's model lookup and adapter names, TRL's view of a
server engine's context, seeded HF generation forking the accelerator RNG."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch


def _server(monkeypatch, models):
    from posttrain.rollout import vllm

    monkeypatch.setattr(vllm.VLLMServerEngine, "_models", lambda self: models)
    return vllm.VLLMServerEngine


def test_server_that_does_not_serve_the_model_names_what_it_serves(monkeypatch):
    engine_cls = _server(monkeypatch, [{"id": "a/b", "max_model_len": 128}, {"id": "c"}])
    with pytest.raises(ValueError, match=r"does not serve 'x/y'; it serves 'a/b', 'c'"):
        engine_cls("http://localhost:1", tokenizer=[0] * 10, model_name="x/y")
    assert engine_cls("http://localhost:1", tokenizer=[0] * 10, model_name="c").model_name == "c"
    engine = engine_cls("http://localhost:1", tokenizer=[0] * 10)
    assert engine.model_name == "a/b" and engine.context_length == 128


def test_adapter_names_are_unique_per_engine(monkeypatch, tmp_path):
    """A resumed trainer builds a new engine whose version counter restarts; the server keeps adapters by name."""
    from posttrain.rollout import vllm

    engine_cls = _server(monkeypatch, [{"id": "m"}])
    names = []

    class Session:
        def post(self, url, json, timeout):
            names.append(json.get("lora_name"))
            return SimpleNamespace(status_code=200, text="")

    monkeypatch.setattr(vllm, "_save_adapter", lambda model, directory, write=True: directory)
    for _ in range(2):
        engine = engine_cls("http://localhost:1", tokenizer=[0] * 10, adapter_dir=str(tmp_path))
        engine.session = Session()
        engine._sync_lora(model=None)
    loaded = [n for i, n in enumerate(names) if n is not None]
    assert len(loaded) == 2 and loaded[0] != loaded[1] and all(n.endswith("-1") for n in loaded)


def test_trl_sees_the_context_of_a_server_engine():
    """TRL's tool loop reads vllm_generation.llm.llm_engine.model_config.max_model_len in colocate mode, which
    posttrain's engine integration uses for servers too."""
    from posttrain.rollout.vllm import TRLGeneration

    model = SimpleNamespace(config=SimpleNamespace(get_text_config=lambda: SimpleNamespace(max_position_embeddings=99)))
    trainer = SimpleNamespace(accelerator=SimpleNamespace(unwrap_model=lambda m: m), model=model,
                              state=SimpleNamespace(global_step=0))
    engine = SimpleNamespace(follow=lambda *a: None, context_length=None)
    assert TRLGeneration(engine, trainer).llm.llm_engine.model_config.max_model_len == 99
    engine.context_length = 64
    assert TRLGeneration(engine, trainer).llm.llm_engine.model_config.max_model_len == 64


def test_seeded_generation_forks_the_cuda_rng_when_there_is_one(monkeypatch):
    """torch.manual_seed seeds every device; without forking the CUDA RNG a seeded evaluation during training
    resets the trainer's CUDA generator at each evaluation."""
    from contextlib import nullcontext

    from posttrain.rollout import hf

    calls = []
    monkeypatch.setattr(torch.random, "fork_rng", lambda devices=None: calls.append(("fork", devices)) or nullcontext())
    monkeypatch.setattr(torch, "manual_seed", lambda seed: calls.append(("seed", seed)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with hf.seeded_rng(3):
        pass
    with hf.seeded_rng(None):
        pass
    assert calls == [("fork", [0]), ("seed", 3)]


def test_seeded_generation_restores_the_cpu_rng():
    from posttrain.rollout.hf import seeded_rng

    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    with seeded_rng(123):
        torch.rand(5)
    assert torch.equal(torch.rand(3), expected)


def test_flat_topk_stats_equal_the_per_position_dict_computation():
    """The vectorised top-k entropy over vLLM's FlatLogprobs equals topk_entropy position by position (sampled
    token inside and outside the top k, -inf and residual-free positions)."""
    import math
    import random

    pytest.importorskip("vllm")
    from vllm.logprobs import FlatLogprobs

    from posttrain.rollout.vllm import flat_topk_stats, topk_entropy

    rng = random.Random(0)
    k, vocab = 5, 50
    flat, dicts = FlatLogprobs(), []
    for pos in range(40):
        raw = sorted((rng.gauss(0, 2) for _ in range(vocab)), reverse=True)
        z = math.log(sum(math.exp(x) for x in raw))
        lps = [x - z for x in raw]
        if pos == 3:
            lps = [0.0] + [-math.inf] * (vocab - 1)  # all mass on one token
        ranked = list(range(vocab))
        rng.shuffle(ranked)  # token ids of ranks 1..vocab
        sampled_rank = rng.choice([1, 2, k, k + 1, 17])
        entries = [(ranked[sampled_rank - 1], lps[sampled_rank - 1], sampled_rank)]
        entries += [(ranked[r - 1], lps[r - 1], r) for r in range(1, k + 1)]
        flat.append_fast([e[0] for e in entries], [e[1] for e in entries], [e[2] for e in entries],
                         [None] * len(entries))
        dicts.append({t: (lp, r) for t, lp, r in entries})
    sampled, estimate = flat_topk_stats(flat, k, vocab)
    for pos, top in enumerate(dicts):
        first_token = flat.token_ids[flat.start_indices[pos]]
        assert sampled[pos] == top[first_token][0]
        assert estimate[pos] == pytest.approx(topk_entropy(top, k, vocab)[0], rel=1e-12, abs=1e-12)
