"""Engine details that need no vLLM install: the server client's model lookup, adapter names and its spread over
several servers, TRL's view of a server engine's context, seeded HF generation forking the accelerator RNG."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch


def _server(monkeypatch, models):
    from posttrain.rollout import vllm

    monkeypatch.setattr(vllm.VLLMServerEngine, "_models",
                        lambda self, url: models[url] if isinstance(models, dict) else models)
    return vllm.VLLMServerEngine


def test_server_that_does_not_serve_the_model_names_what_it_serves(monkeypatch):
    engine_cls = _server(monkeypatch, [{"id": "a/b", "max_model_len": 128}, {"id": "c"}])
    with pytest.raises(ValueError, match=r"does not serve 'x/y'; it serves 'a/b', 'c'"):
        engine_cls("http://localhost:1", tokenizer=[0] * 10, model_name="x/y")
    assert engine_cls("http://localhost:1", tokenizer=[0] * 10, model_name="c").model_name == "c"
    engine = engine_cls("http://localhost:1", tokenizer=[0] * 10)
    assert engine.model_name == "a/b" and engine.context_length == 128


def test_server_of_other_weights_is_refused_unless_model_name_says_which(monkeypatch, tmp_path):
    """make_engine passes the trained model as expected_model: a server of another model would generate every
    rollout of the run silently. The same folder under another spelling, or a shipped name's cached folder, is
    the same model; model_name is the way to vouch for a served name that is neither."""
    from posttrain.rollout import make_engine

    folder = tmp_path / "qwen"
    folder.mkdir()
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "models" / "tiny-qwen2").mkdir(parents=True)  # where the shipped name's folder is
    engine_cls = _server(monkeypatch, {"http://a:1": [{"id": "Qwen/Qwen2.5-Math-1.5B"}],
                                       "http://b:1": [{"id": str(folder)}],
                                       "http://c:1": [{"id": str(tmp_path / "cache" / "models" / "tiny-qwen2")}]})
    with pytest.raises(ValueError, match=r"http://a:1 serves 'Qwen/Qwen2.5-Math-1.5B', not the model this run uses "
                                         r"\('Qwen/Qwen2.5-1.5B-Instruct', model.name_or_path\).*"
                                         r"rollout.vllm.model_name: Qwen/Qwen2.5-Math-1.5B"):
        make_engine("vllm", "Qwen/Qwen2.5-1.5B-Instruct", [0] * 10, mode="server", base_url="http://a:1")
    assert make_engine("vllm", "Qwen/Qwen2.5-Math-1.5B", [0] * 10, mode="server", base_url="http://a:1")
    assert make_engine("vllm", "Qwen/Qwen2.5-1.5B-Instruct", [0] * 10, mode="server", base_url="http://a:1",
                       model_name="Qwen/Qwen2.5-Math-1.5B").model_name == "Qwen/Qwen2.5-Math-1.5B"
    assert make_engine("vllm", f"{tmp_path}/../{tmp_path.name}/qwen/", [0] * 10, mode="server", base_url="http://b:1")
    assert make_engine("vllm", "tiny-qwen2", [0] * 10, mode="server", base_url="http://c:1")
    with pytest.raises(ValueError, match="not the model this run uses"):
        make_engine("vllm", str(tmp_path), [0] * 10, mode="server", base_url="http://b:1")
    assert engine_cls("http://a:1", tokenizer=[0] * 10)  # the engine alone, as a client: whatever is served


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
        engine.sessions = {url: Session() for url in engine.servers}
        engine._sync_lora(model=None)
    loaded = [n for i, n in enumerate(names) if n is not None]
    assert len(loaded) == 2 and loaded[0] != loaded[1] and all(n.endswith("-1") for n in loaded)


def test_server_urls_take_one_a_list_or_commas_and_name_a_bad_entry():
    from posttrain.rollout.vllm import server_urls

    assert server_urls("http://a:8000/") == ["http://a:8000"]
    assert server_urls("http://a:8000, https://b:9000") == ["http://a:8000", "https://b:9000"]
    assert server_urls(["http://a:8000", "http://b:8000"]) == ["http://a:8000", "http://b:8000"]
    with pytest.raises(ValueError, match=r"entry 1 \('b:8000'\) is not a server address"):
        server_urls(["http://a:8000", "b:8000"])
    with pytest.raises(ValueError, match=r"entry 0 \('http://a:8000/v1'\)"):
        server_urls("http://a:8000/v1")
    with pytest.raises(ValueError, match="names a server twice"):
        server_urls("http://a:8000,http://a:8000/")
    with pytest.raises(ValueError, match="names no server"):
        server_urls([])


@pytest.mark.parametrize("servers", range(1, 10))
@pytest.mark.parametrize("world", range(1, 10))
def test_server_share_gives_every_rank_a_server_and_every_server_a_rank(servers, world):
    from collections import Counter

    from posttrain.rollout.vllm import server_share

    urls = [f"http://s{i}:8000" for i in range(servers)]
    shares = [server_share(urls, rank, world) for rank in range(world)]
    assert all(shares) and sorted({u for share in shares for u in share}) == sorted(urls)
    if servers >= world:  # each server has one rank; ranks' shares differ in size by at most one
        assert sorted(u for share in shares for u in share) == sorted(urls)
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    else:  # each rank has one server; servers' loads differ by at most one rank
        load = Counter(share[0] for share in shares)
        assert all(len(share) == 1 for share in shares) and max(load.values()) - min(load.values()) <= 1


def test_servers_must_serve_the_same_model(monkeypatch):
    engine_cls = _server(monkeypatch, {"http://a:1": [{"id": "m", "max_model_len": 256}],
                                       "http://b:1": [{"id": "m", "max_model_len": 128}],
                                       "http://c:1": [{"id": "other"}]})
    engine = engine_cls("http://a:1,http://b:1", tokenizer=[0] * 10)
    assert engine.servers == engine.share == ["http://a:1", "http://b:1"] and engine.context_length == 128
    with pytest.raises(ValueError, match=r"http://a:1 serves 'm', http://b:1 serves 'm', http://c:1 serves 'other'"):
        engine_cls(["http://a:1", "http://b:1", "http://c:1"], tokenizer=[0] * 10)
    with pytest.raises(ValueError, match=r"the vLLM server at http://c:1 does not serve 'm'"):
        engine_cls(["http://a:1", "http://c:1"], tokenizer=[0] * 10, model_name="m")
    with pytest.raises(ValueError, match="weight_sync_url"):
        engine_cls("http://a:1,http://b:1", tokenizer=[0] * 10, weight_sync_url="http://a:1")


class _Completions:
    """A server's /v1/completions: each choice's token is its prompt's first id, then the request's seed."""

    def __init__(self, log):
        self.log = log

    def post(self, url, json, timeout):
        self.log.append((url.split("/v1")[0], [p[0] for p in json["prompt"]], json.get("seed")))
        choices = [{"index": i * json["n"] + j, "token_ids": [p[0], json.get("seed", -1) + j], "text": "",
                    "finish_reason": "length", "logprobs": {"token_logprobs": [-1.0, -2.0], "top_logprobs": [{}, {}]}}
                   for i, p in enumerate(json["prompt"]) for j in range(json["n"])]
        return SimpleNamespace(status_code=200, text="", headers={"content-type": "application/json"},
                               json=lambda: {"choices": choices})


@pytest.mark.parametrize("seed", [None, 100])
def test_a_ranks_servers_split_the_prompts_with_the_seeds_of_the_whole_call(monkeypatch, seed):
    from posttrain.rollout import SamplingParams

    urls = ["http://a:1", "http://b:1", "http://c:1"]
    engine_cls = _server(monkeypatch, [{"id": "m"}])
    engine = engine_cls(urls, tokenizer=[0] * 10)
    engine.tokenizer = SimpleNamespace(decode=lambda ids, **kw: str(ids))  # only the texts read it
    log = []
    engine.sessions = {url: _Completions(log) for url in urls}
    prompts = [[10 + i] for i in range(7)]
    out = engine.generate_ids(prompts, SamplingParams(n=2, max_new_tokens=2, logprobs=True, seed=seed))
    # 7 prompts over 3 servers: 3, 2, 2 in order; every prompt's completions come back to its place
    if seed is None:  # one batched request a server
        assert sorted((u, tuple(p)) for u, p, _ in log) == [
            ("http://a:1", (10, 11, 12)), ("http://b:1", (13, 14)), ("http://c:1", (15, 16))]
    assert [c.token_ids[0] for o in out for c in o.completions] == [10 + i for i in range(7) for _ in range(2)]
    if seed is not None:  # one request a prompt, seeded as in one server's call: seed + prompt index x n
        assert sorted((p[0], s) for _, p, s in log) == [(10 + i, 100 + 2 * i) for i in range(7)]
        assert [c.token_ids[1] for o in out for c in o.completions] == [100 + 2 * i + j for i in range(7) for j in range(2)]
        assert {u for u, p, _ in log if p[0] in (13, 14)} == {"http://b:1"}


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


class _Info:
    """GET /server_info: 404 without vLLM's development endpoints, else its config with `weight_transfer`."""

    def __init__(self, status, weight_transfer=None):
        self.status, self.weight_transfer, self.asked = status, weight_transfer, []

    def get(self, url, params=None, timeout=None):
        self.asked.append(url)
        body = {"vllm_config": {"weight_transfer_config": self.weight_transfer}}
        return SimpleNamespace(status_code=self.status, ok=self.status == 200, json=lambda: body)


@pytest.mark.parametrize("info, problem", [(_Info(404), "no development endpoints"),
                                           (_Info(200), "no weight-transfer engine"),
                                           (_Info(500), "/server_info answered 500"),
                                           (_Info(200, {"backend": "nccl"}), None)])
def test_full_weight_sync_checks_its_server_when_the_engine_starts(monkeypatch, info, problem):
    """A trainer of full weights learns before its first step that the server cannot take them (TRL's client
    finds out at the first sync, after a step), with the flags that fix it."""
    import requests

    engine_cls = _server(monkeypatch, [{"id": "m"}])
    monkeypatch.setattr(requests, "Session", lambda: info)
    if problem is None:
        engine = engine_cls("http://a:1", tokenizer=[0] * 10, full_weight_sync=True)
        assert engine.weight_sync_url == "http://a:1" and info.asked == ["http://a:1/server_info"]
    else:
        with pytest.raises(RuntimeError, match=rf"http://a:1 cannot take full-weight sync \({problem}\): start it "
                                               r"with VLLM_SERVER_DEV_MODE=1 and --weight-transfer-config.*"
                                               r"launch/vllm_server.sh MODEL --full-weights"):
            engine_cls("http://a:1", tokenizer=[0] * 10, full_weight_sync=True)
    assert engine_cls("http://a:1", tokenizer=[0] * 10)  # LoRA sync (files) asks nothing of the kind
    with pytest.raises(ValueError, match="full-weight sync goes to one vLLM server"):
        engine_cls("http://a:1,http://b:1", tokenizer=[0] * 10, full_weight_sync=True)


def test_full_weight_sync_is_one_update_of_every_parameter(monkeypatch):
    """As TRL's own server sync: the server is told every tensor (name, dtype, shape) and takes them in one update
    (one packed NCCL broadcast), then its prefix cache is reset; the NCCL group is set up at the first sync only."""
    import trl.generation.vllm_client as trl_client

    calls = []

    class Client:
        def __init__(self, base_url, group_port):
            calls.append(("client", base_url, group_port))

        def init_communicator(self, device):
            calls.append(("init", device))

        def update_named_params(self, metadata, named_params):
            calls.append(("update", metadata, [(n, t.clone()) for n, t in named_params]))

        def reset_prefix_cache(self):
            calls.append(("reset",))

    monkeypatch.setattr(trl_client, "VLLMClient", Client)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    engine = _server(monkeypatch, [{"id": "m"}])("http://a:1", tokenizer=[0] * 10, weight_sync_url="http://a:2")
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2, bias=False)).to(torch.bfloat16)
    for _ in range(2):
        engine.sync_weights(model)
        with torch.no_grad():
            model[1].weight.add_(1.0)
    assert [c[0] for c in calls] == ["client", "init", "update", "reset", "update", "reset"]
    assert calls[0] == ("client", "http://a:2", 51216)
    metadata = [("0.weight", "bfloat16", [4, 3]), ("0.bias", "bfloat16", [4]), ("1.weight", "bfloat16", [2, 4])]
    assert calls[2][1] == calls[4][1] == metadata
    first, second = dict(calls[2][2]), dict(calls[4][2])
    assert list(first) == [m[0] for m in metadata]
    assert torch.equal(second["1.weight"], first["1.weight"] + 1) and torch.equal(second["0.bias"], first["0.bias"])
