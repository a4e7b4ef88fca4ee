import math

import pytest
import torch

from posttrain.models import load_model, load_tokenizer
from posttrain.rollout import HFEngine, SamplingParams


@pytest.fixture(scope="module")
def engine():
    model = load_model("tiny-qwen2")
    tok = load_tokenizer("tiny-qwen2")
    return HFEngine(model, tok, batch_size=3, progress=False)


def _prompts(engine, n=4):
    tok = engine.tokenizer
    return [tok.apply_chat_template([{"role": "user", "content": f"What is {i} + {i}?"}], tokenize=False,
                                    add_generation_prompt=True) for i in range(n)]


def test_shapes_and_logprobs_match_a_forward_pass(engine):
    prompts = _prompts(engine)
    out = engine.generate(prompts, SamplingParams(n=2, temperature=0.7, max_new_tokens=6, seed=1, logprobs=True,
                                                  entropies=True))
    assert [o.prompt for o in out] == prompts and all(len(o.completions) == 2 for o in out)
    c = out[1].completions[0]
    assert len(c.token_ids) == len(c.logprobs) == len(c.entropies) <= 6
    assert c.finish_reason in ("stop", "length")
    assert all(lp <= 0 for lp in c.logprobs) and all(0 <= h <= math.log(len(engine.tokenizer)) + 1e-4 for h in c.entropies)
    # Recompute with one forward pass over prompt + completion at the same temperature.
    ids = torch.tensor([out[1].prompt_token_ids + c.token_ids])
    with torch.no_grad():
        logits = engine.model(ids).logits[0, len(out[1].prompt_token_ids) - 1 : -1] / 0.7
    ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
    assert torch.allclose(torch.tensor(c.logprobs), ref, atol=1e-4)


def test_same_seed_same_completions(engine):
    sp = SamplingParams(n=3, temperature=1.0, max_new_tokens=8, seed=123)
    a = engine.generate(_prompts(engine), sp)
    b = engine.generate(_prompts(engine), sp)
    assert [[c.token_ids for c in o.completions] for o in a] == [[c.token_ids for c in o.completions] for o in b]


def test_greedy_is_batch_invariant(engine):
    prompts = _prompts(engine, 5)
    batched = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=6))
    single = [engine.generate([p], SamplingParams(temperature=0, max_new_tokens=6))[0] for p in prompts]
    assert [o.completions[0].token_ids for o in batched] == [o.completions[0].token_ids for o in single]


def test_empty_prompt_list(engine):
    assert engine.generate([], SamplingParams()) == []


def test_prompt_longer_than_context_is_rejected(engine):
    long = "1 + " * 2000
    with pytest.raises(ValueError, match="prompt 1 has .* tokens"):
        engine.generate(["hi", long], SamplingParams(max_new_tokens=4))


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -1}, "temperature must be >= 0"),
    ({"top_p": 0}, "top_p must be in"),
    ({"n": 0}, "n must be an integer"),
    ({"max_new_tokens": 0}, "max_new_tokens must be"),
    ({"n": 4, "temperature": 0}, "identical copies"),
])
def test_bad_sampling_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_empty_prompt_gets_the_same_error_as_vllm(engine):
    with pytest.raises(ValueError, match=r"^prompt 1 is empty \(0 tokens\)$"):
        engine.generate(["hi", ""], SamplingParams(max_new_tokens=4))
    with pytest.raises(ValueError, match=r"^prompt 0 is empty \(0 tokens\)$"):
        engine.generate_ids([[]], SamplingParams(max_new_tokens=4))


def test_stops_on_every_generation_config_eos_id(engine):
    """vLLM stops on all of the generation config's EOS ids; the HF engine must stop at the same place."""
    prompt = _prompts(engine, 1)
    greedy = SamplingParams(temperature=0, max_new_tokens=6)
    first = engine.generate(prompt, greedy)[0].completions[0]
    assert len(first.token_ids) > 1 and first.token_ids[0] != engine.tokenizer.eos_token_id
    config = engine.model.generation_config
    saved = config.eos_token_id
    try:
        config.eos_token_id = [engine.tokenizer.eos_token_id, first.token_ids[0]]
        out = engine.generate(prompt, greedy)[0].completions[0]
    finally:
        config.eos_token_id = saved
    assert out.token_ids == first.token_ids[:1] and out.finish_reason == "stop"


def test_context_length_is_what_the_harness_caps_against(engine):
    assert engine.context_length == engine.model.config.max_position_embeddings
    assert HFEngine(engine.model, engine.tokenizer, max_context=64).context_length == 64


@pytest.mark.parametrize("sampling", [
    SamplingParams(n=2, temperature=0.7, top_p=0.9, repetition_penalty=1.3, max_new_tokens=7, seed=5, logprobs=True,
                   entropies=True),
    SamplingParams(temperature=0, max_new_tokens=7, logprobs=True, entropies=True),
], ids=["sampled", "greedy"])
def test_step_statistics_equal_those_of_the_full_logits(engine, sampling):
    """The per-step log-probs and entropies (only [rows, T] kept) equal what transformers' output_logits gives
    for the same generation, with processors (top-p, repetition penalty) active."""
    from posttrain.algos.entropy import token_entropy
    from posttrain.rollout.hf import seeded_rng

    prompts = _prompts(engine, 3)
    ours = engine.generate(prompts, sampling)
    tok = engine.tokenizer
    encoded = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(3), key=lambda i: -len(encoded[i]))  # the engine's batch order (batch_size 3: one batch)
    width = max(map(len, encoded))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(encoded[i])) + encoded[i] for i in order])
    mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in order])
    kwargs = engine._generate_kwargs(sampling)
    with torch.no_grad(), seeded_rng(sampling.seed):
        ref = engine.model.generate(input_ids=ids, attention_mask=mask, output_logits=True, **kwargs)
    logits = torch.stack(ref.logits, dim=1).float()
    temperature = 1.0 if sampling.greedy else sampling.temperature
    logp = torch.log_softmax(logits / temperature, -1).gather(-1, ref.sequences[:, width:, None]).squeeze(-1)
    ent = token_entropy(logits, temperature)
    for pos, i in enumerate(order):
        for j, c in enumerate(ours[i].completions):
            row = pos * sampling.n + j
            assert c.token_ids == ref.sequences[row, width : width + len(c.token_ids)].tolist()
            torch.testing.assert_close(torch.tensor(c.logprobs), logp[row, : len(c.token_ids)], atol=1e-5, rtol=0)
            torch.testing.assert_close(torch.tensor(c.entropies), ent[row, : len(c.token_ids)], atol=1e-5, rtol=0)


def test_results_come_back_in_prompt_order_across_length_sorted_batches():
    model, tok = load_model("tiny-qwen2"), load_tokenizer("tiny-qwen2")
    prompts = [f"What is {'1 + ' * (i % 4)}{i}?" for i in range(7)]
    one_by_one = [HFEngine(model, tok, batch_size=1, progress=False).generate([p], SamplingParams(
        temperature=0, max_new_tokens=5))[0] for p in prompts]
    batched = HFEngine(model, tok, batch_size=3, progress=False).generate(prompts, SamplingParams(
        temperature=0, max_new_tokens=5))
    assert [o.prompt for o in batched] == prompts
    assert [o.completions[0].token_ids for o in batched] == [o.completions[0].token_ids for o in one_by_one]
