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


# --- continuous batching ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def varied():
    """tiny-qwen2 with its weights perturbed (seeded) and a frequent token as a second EOS: greedy completions of
    many lengths, so rows finish at different steps and waiting prompts join a running batch."""
    import copy

    model, tok = load_model("tiny-qwen2"), load_tokenizer("tiny-qwen2")
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    model.generation_config.eos_token_id = [tok.eos_token_id, 88]
    prompts = [f"What is {'1 + ' * (i % 5)}{i}? Answer" for i in range(11)]
    return model, tok, prompts


def _decode_rows(model):
    """Rows of every one-token (decoding) forward of `model`, appended to the returned list."""
    rows = []

    def hook(module, args, kwargs, output):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[1] == 1:
            rows.append(ids.shape[0])

    return rows, model.register_forward_hook(hook, with_kwargs=True)


PREFIX = "You are a careful assistant. Think, then answer in one short line, without any explanation. "


@pytest.mark.parametrize("batch_size, prefix", [(1, ""), (2, ""), (3, ""), (4, ""), (1, PREFIX), (3, PREFIX)])
def test_continuous_batching_gives_the_static_batches_greedy_outputs_without_steps_on_finished_rows(
        varied, batch_size, prefix):
    """Greedy outputs, log-probs and entropies as static `generate` batches give, rows joining a running batch
    (and, with a shared prefix, starting from its cache)."""
    from collections import Counter

    from posttrain.rollout.hf import _ContinuousDecoder

    model, tok, prompts = varied
    prompts = [prefix + p for p in prompts]
    sp = SamplingParams(temperature=0, max_new_tokens=12, logprobs=True, entropies=True)
    saved = model.generation_config.eos_token_id
    if prefix:
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        decoder = _ContinuousDecoder(model, tok.pad_token_id, [tok.eos_token_id], 2)
        decoder._prefix(ids, torch.device("cpu"))
        assert len(decoder.prefix) >= _ContinuousDecoder.MIN_PREFIX
        # the fixture's extra EOS rarely comes after this prefix: stop on its three most frequent tokens instead
        first = HFEngine(model, tok, batch_size=16, progress=False, continuous=False).generate(prompts, sp)
        frequent = Counter(t for o in first for t in o.completions[0].token_ids[1:]).most_common(3)
        model.generation_config.eos_token_id = [tok.eos_token_id] + [t for t, _ in frequent]
    rows, handle = _decode_rows(model)
    try:
        ref = HFEngine(model, tok, batch_size=batch_size, progress=False, continuous=False).generate(prompts, sp)
        static_rows = sum(rows)
        rows.clear()
        out = HFEngine(model, tok, batch_size=batch_size, progress=False).generate(prompts, sp)
    finally:
        handle.remove()
        model.generation_config.eos_token_id = saved
    lengths = [len(o.completions[0].token_ids) for o in ref]
    assert len(set(lengths)) > 2  # the fixture does what it says: rows finish at different steps
    for a, b in zip(ref, out):
        ca, cb = a.completions[0], b.completions[0]
        assert (cb.token_ids, cb.finish_reason, cb.text) == (ca.token_ids, ca.finish_reason, ca.text)
        # float32 rounding of another batch composition (and of a prefix prefilled apart): relative as well
        torch.testing.assert_close(torch.tensor(cb.logprobs), torch.tensor(ca.logprobs), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(torch.tensor(cb.entropies), torch.tensor(ca.entropies), atol=1e-4, rtol=1e-4)
    # the first token of a row comes from its prefill, and no forward follows its last one: L - 1 decoding
    # forwards per row, where static batches run every row as long as the longest of its batch
    assert sum(rows) == sum(n - 1 for n in lengths)
    assert max(rows) <= batch_size
    if batch_size > 1:
        assert sum(rows) < static_rows


def test_continuous_batching_with_a_lora_adapter_equals_static_batches(varied):
    from peft import LoraConfig, get_peft_model

    model, tok, prompts = varied
    import copy

    peft = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                           init_lora_weights=False))
    sp = SamplingParams(temperature=0, max_new_tokens=10)
    ref = HFEngine(peft, tok, batch_size=3, progress=False, continuous=False).generate(prompts, sp)
    out = HFEngine(peft, tok, batch_size=3, progress=False).generate(prompts, sp)
    assert [o.completions[0].token_ids for o in out] == [o.completions[0].token_ids for o in ref]
    base = HFEngine(model, tok, batch_size=3, progress=False).generate(prompts, sp)
    assert [o.completions[0].token_ids for o in out] != [o.completions[0].token_ids for o in base]  # adapter used


def test_continuous_top_k_1_is_greedy(varied):
    model, tok, prompts = varied
    engine = HFEngine(model, tok, batch_size=2, progress=False)
    greedy = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=8))
    top1 = engine.generate(prompts, SamplingParams(n=2, temperature=0.8, top_k=1, max_new_tokens=8, seed=0))
    for g, t in zip(greedy, top1):
        assert all(c.token_ids == g.completions[0].token_ids for c in t.completions)


@pytest.mark.parametrize("options", [{"temperature": 0.7}, {"temperature": 1.0, "top_p": 0.6},
                                     {"temperature": 1.3, "top_k": 5}, {"temperature": 1.0, "min_p": 0.2}])
def test_continuous_sampling_draws_from_the_warped_distribution(varied, options):
    """2000 first tokens of one prompt against the distribution `generate`'s warpers define, by total variation."""
    from transformers import GenerationConfig

    model, tok, prompts = varied
    ids = tok(prompts[3], add_special_tokens=False)["input_ids"]
    out = HFEngine(model, tok, batch_size=1, progress=False).generate_ids(
        [ids], SamplingParams(n=2000, max_new_tokens=1, seed=0, **options))
    counts = torch.bincount(torch.tensor([c.token_ids[0] for c in out[0].completions]),
                            minlength=model.config.vocab_size).float()
    config = GenerationConfig(do_sample=True, top_k=options.get("top_k", 0), **{
        k: v for k, v in options.items() if k != "top_k"})
    warpers = model._get_logits_processor(generation_config=config, input_ids_seq_length=len(ids),
                                          encoder_input_ids=None, prefix_allowed_tokens_fn=None,
                                          logits_processor=None)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[:, -1].float()
    expected = torch.softmax(warpers(torch.tensor([ids]), logits), -1)[0]
    assert 0.5 * (counts / 2000 - expected).abs().sum() < 0.06


def test_continuous_decoder_is_not_used_where_it_would_differ(varied):
    from posttrain.rollout.hf import _ContinuousDecoder

    model, tok, _ = varied
    assert _ContinuousDecoder.supports(model, SamplingParams(temperature=0))
    assert not _ContinuousDecoder.supports(model, SamplingParams(repetition_penalty=1.2))
    saved = model.config.layer_types
    try:
        model.config.layer_types = ["sliding_attention", "full_attention"]
        assert not _ContinuousDecoder.supports(model, SamplingParams(temperature=0))
    finally:
        model.config.layer_types = saved
