"""The vLLM rollout backend on CPU (vllm-cpu), tiny-qwen2: logprobs match the trainer after optimizer steps
(full and LoRA sync), GRPO trains through it (directly and via `rollout.engine: vllm`), and the
engine's contract (seeds, bad parameters, empty and over-long prompts).

Run: /tmp/vv/bin/pytest -m vllm tests/rollout/test_vllm_engine.py -q   (or `make test-slow`)
"""

import math
import os

import pytest

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from posttrain.models import load_model, load_tokenizer, lora_config, pull_model  # noqa: E402
from posttrain.rollout import SamplingParams, make_engine  # noqa: E402
from posttrain.rollout.vllm import topk_entropy  # noqa: E402

TEMPERATURE = 0.9
TOLERANCE = 1e-2


@pytest.fixture(scope="module")
def path():
    return str(pull_model("tiny-qwen2"))


@pytest.fixture(scope="module")
def tok(path):
    return load_tokenizer(path)


@pytest.fixture(scope="module")
def engine(path, tok):
    """One engine for the module (startup is the expensive part); LoRA-capable so both sync paths run on it."""
    e = make_engine("vllm", path, tok, dtype="float32", max_model_len=256, seed=0, enable_lora=True, max_lora_rank=8)
    yield e
    e.close()


def _prompts(tok, n=3):
    return [tok.apply_chat_template([{"role": "user", "content": f"What is {i} + {i + 2}?"}], tokenize=False,
                                    add_generation_prompt=True) for i in range(n)]


def _trainer_logprobs(model, prompt_ids, completion_ids, temperature=TEMPERATURE):
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1 : -1].float() / temperature
    logp = torch.log_softmax(logits, -1)
    return logp.gather(-1, torch.tensor(completion_ids)[:, None]).squeeze(-1), logp


def _max_gap(engine_outputs, model):
    gaps = []
    for o in engine_outputs:
        for c in o.completions:
            ref, _ = _trainer_logprobs(model, o.prompt_token_ids, c.token_ids)
            gaps.append((ref - torch.tensor(c.logprobs)).abs().max().item())
    return max(gaps)


def _optimizer_step(model, outputs, lr_scale=1.0):
    """One policy-gradient-like step (raise the log-probability of the samples) that moves the weights a lot."""
    model.train()
    loss = 0.0
    for o in outputs:
        for c in o.completions:
            ids = torch.tensor([o.prompt_token_ids + c.token_ids])
            logits = model(ids).logits[0, len(o.prompt_token_ids) - 1 : -1] / TEMPERATURE
            loss = loss - torch.log_softmax(logits, -1).gather(-1, torch.tensor(c.token_ids)[:, None]).mean()
    loss.backward()
    model.optimizer.step()
    model.optimizer.zero_grad()
    model.eval()


def _sampling(**kw):
    base = dict(n=2, temperature=TEMPERATURE, max_new_tokens=12, seed=7, logprobs=True)
    base.update(kw)
    return SamplingParams(**base)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_logprobs_match_trainer_after_optimizer_steps(engine, path, tok, lora):
    base = load_model(path, "float32")
    engine.sync_weights(base)  # back to the checkpoint, whatever earlier tests pushed
    model = base
    if lora:
        from peft import get_peft_model

        model = get_peft_model(load_model(path, "float32"), lora_config(r=8, alpha=16))
    model.optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    prompts = _prompts(tok)
    for step in range(3):
        seconds = engine.sync_weights(model)
        assert 0 < seconds < 30
        out = engine.generate(prompts, _sampling(seed=step))
        assert _max_gap(out, model) < TOLERANCE, f"step {step}"
        _optimizer_step(model, out)
        # The step moved the policy: without a sync the engine is measurably stale (so the check above can fail).
        stale = engine.generate(prompts, _sampling(seed=100 + step))
        assert _max_gap(stale, model) > 10 * TOLERANCE, f"step {step}: the optimizer step did not change the policy"
    engine.sync_weights(model)
    assert _max_gap(engine.generate(prompts, _sampling(seed=9)), model) < TOLERANCE


def test_lora_sync_needs_enable_lora(engine, path):
    from peft import get_peft_model

    model = get_peft_model(load_model(path, "float32"), lora_config(r=8, alpha=16))
    engine.enable_lora = False  # as if built without it (a second engine would cost a startup)
    try:
        with pytest.raises(ValueError, match="enable_lora=True"):
            engine.sync_weights(model)
    finally:
        engine.enable_lora = True


def test_same_seed_same_completions(engine, path, tok):
    engine.sync_weights(load_model(path, "float32"))
    prompts = _prompts(tok) + _prompts(tok)[:1]  # a repeated prompt must still get its own samples
    s = _sampling(n=3, temperature=1.0, max_new_tokens=10, seed=123)
    a, b = engine.generate(prompts, s), engine.generate(prompts, s)
    ids = lambda out: [c.token_ids for o in out for c in o.completions]  # noqa: E731
    assert ids(a) == ids(b)
    assert [c.logprobs for o in a for c in o.completions] == [c.logprobs for o in b for c in o.completions]
    assert ids(a) != ids(engine.generate(prompts, _sampling(n=3, temperature=1.0, max_new_tokens=10, seed=124)))
    assert len({tuple(t) for t in ids(a)}) > len(ids(a)) // 2  # samples differ within and across prompts
    assert [c.token_ids for c in a[0].completions] != [c.token_ids for c in a[3].completions]


def test_output_shape_text_and_greedy(engine, tok):
    prompts = _prompts(tok, 2)
    out = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=6, logprobs=True))
    assert [o.prompt for o in out] == prompts
    for o in out:
        (c,) = o.completions
        assert o.prompt_token_ids == tok(o.prompt, add_special_tokens=False)["input_ids"]
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
        assert c.finish_reason == ("length" if len(c.token_ids) == 6 else "stop")
        assert len(c.logprobs) == len(c.token_ids) and c.entropies is None
    again = engine.generate_ids([o.prompt_token_ids for o in out], SamplingParams(temperature=0, max_new_tokens=6))
    assert [o.completions[0].token_ids for o in again] == [o.completions[0].token_ids for o in out]
    assert again[0].completions[0].logprobs is None


def test_entropies_from_top_k_bound_the_exact_entropy(engine, path, tok):
    model = load_model(path, "float32")
    engine.sync_weights(model)
    out = engine.generate(_prompts(tok, 2), _sampling(entropies=True, logprobs=False))
    c, o = out[0].completions[0], out[0]
    assert c.logprobs is None and len(c.entropies) == len(c.token_ids)
    _, logp = _trainer_logprobs(model, o.prompt_token_ids, c.token_ids)
    exact = -(logp.exp() * logp).sum(-1)
    for t, h in enumerate(c.entropies):
        top = torch.topk(logp[t], engine.entropy_top_k)
        dist = {int(i): (float(v), r + 1) for r, (v, i) in enumerate(zip(top.values, top.indices))}
        sampled = c.token_ids[t]  # vLLM also returns the sampled token when it ranks below k
        dist.setdefault(sampled, (logp[t, sampled].item(), engine.entropy_top_k + 1))
        lower, upper = topk_entropy(dist, engine.entropy_top_k, engine.vocab_size)
        assert h == pytest.approx(lower, abs=1e-3)
        assert lower - 1e-3 <= exact[t].item() <= upper + 1e-3


def test_topk_entropy_is_exact_without_residual_mass():
    probs = [0.5, 0.25, 0.25]
    dist = {i: (math.log(p), i + 1) for i, p in enumerate(probs)}
    est, upper = topk_entropy(dist, 3, vocab_size=100)
    assert est == upper == pytest.approx(-sum(p * math.log(p) for p in probs))
    est, upper = topk_entropy({0: (math.log(0.5), 1)}, 1, vocab_size=3)  # two unseen tokens share 0.5
    assert est == pytest.approx(-0.5 * math.log(0.5) * 2) and upper == pytest.approx(-0.5 * math.log(0.5) + 0.5 * math.log(4))


def test_bad_sampling_parameters_are_clear_errors(engine, tok):
    with pytest.raises(ValueError, match="bad sampling parameters: top_p must be in"):
        engine.generate(_prompts(tok, 1), SamplingParams(top_p=0))
    with pytest.raises(ValueError, match="temperature 0 .* identical copies"):
        SamplingParams(n=4, temperature=0)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        SamplingParams(max_new_tokens=0)


def test_empty_prompt_list(engine):
    assert engine.generate([], _sampling()) == []
    assert engine.generate_ids([], _sampling()) == []


def test_over_long_prompt_is_a_clear_error_and_the_engine_survives(engine, tok):
    prompts = _prompts(tok, 2)
    long = " ".join(["seven plus seven"] * 200)
    assert len(tok(long, add_special_tokens=False)["input_ids"]) > engine.max_model_len
    with pytest.raises(ValueError, match=r"prompt 1 has \d+ tokens.*max_model_len=256"):
        engine.generate([prompts[0], long], _sampling())
    # fits alone, but not with the completion budget
    fits = tok.decode(tok(long, add_special_tokens=False)["input_ids"][: engine.max_model_len - 4])
    with pytest.raises(ValueError, match="prompt 0 has"):
        engine.generate([fits], _sampling(max_new_tokens=12))
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        engine.generate_ids([[]], _sampling())
    assert len(engine.generate(prompts, _sampling())) == 2  # no hang, nothing left queued


def test_stop_strings_in_generation_kwargs(engine, tok):
    """TRL's generation_kwargs reach the engine as `extra`: stop strings need detokenisation, which the engine turns
    on; keys the engine sets itself are refused with the setting to change instead."""
    prompts = _prompts(tok, 3)
    free = engine.generate(prompts, _sampling(max_new_tokens=16))
    stop = next(ch for o in free for c in o.completions for ch in c.text if ch.strip())
    out = engine.generate_ids([o.prompt_token_ids for o in free], _sampling(max_new_tokens=16), extra={"stop": [stop]})
    assert all(stop not in c.text for o in out for c in o.completions)
    assert any(len(c.text) < len(f.text) for o, fo in zip(out, free) for c, f in zip(o.completions, fo.completions))
    with pytest.raises(ValueError, match=r"may not set 'max_tokens' \(set SamplingParams.max_new_tokens"):
        engine.generate_ids([free[0].prompt_token_ids], _sampling(), extra={"max_tokens": 3})


def test_harness_caps_max_new_tokens_to_the_vllm_context(engine, tok, tmp_path):
    """A suite whose max_new_tokens does not fit beside a prompt is cut to fit, as with the HF engine, instead of
    aborting mid-run."""
    from posttrain.data import get_task
    from posttrain.eval.harness import evaluate_task

    task = get_task("arithmetic")
    rows = [dict(r) for r in task.load(split="test", limit=2)]
    sampling = SamplingParams(temperature=0, max_new_tokens=engine.context_length, entropies=True)
    result = evaluate_task(engine, tok, task, rows, sampling, tmp_path / "s.jsonl", progress=False)
    assert result["info"]["max_new_tokens_capped"] == 2 and result["n_prompts"] == 2


def test_sleep_and_wake_are_noops_on_cpu(engine, tok):
    assert engine.on_cpu
    engine.sleep()
    engine.wake_up()
    assert len(engine.generate(_prompts(tok, 1), _sampling())) == 1


def test_make_engine_errors():
    with pytest.raises(ValueError, match="unknown rollout engine 'vlm'"):
        make_engine("vlm", "tiny-qwen2")
    with pytest.raises(ValueError, match="'colocate' or 'server'"):
        make_engine("vllm", "tiny-qwen2", mode="remote")


# --- GRPO through the engine --------------------------------------------------------------------------------

def _digit_reward(prompts, completions, **kwargs):
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [min(sum(ch.isdigit() for ch in t) / 4, 1.0) for t in texts]


_digit_reward.__name__ = "accuracy"


def test_grpo_trains_through_the_engine(engine, path, tok, tmp_path):
    from posttrain.trainers.grpo import GRPOConfig, GRPOTrainer

    engine.sync_weights(load_model(path, "float32"))
    calls = []
    generate_ids = engine.generate_ids
    engine.generate_ids = lambda *a, **k: calls.append(len(a[0])) or generate_ids(*a, **k)
    try:
        ds = Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}]}
                                for a in range(4) for b in range(4)])
        args = GRPOConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8, num_generations=4,
                          max_completion_length=10, logging_steps=1, use_cpu=True, bf16=False, report_to=[],
                          save_strategy="no", seed=0, learning_rate=5e-2, disable_tqdm=True, temperature=TEMPERATURE)
        trainer = GRPOTrainer(model=load_model(path, "float32"), reward_funcs=[_digit_reward], args=args,
                              train_dataset=ds, processing_class=tok, rollout_engine=engine)
        assert trainer.rollout_engine is engine and trainer.use_vllm
        trainer.train()
    finally:
        engine.generate_ids = generate_ids
    assert trainer.state.global_step == 3
    assert calls == [8, 8, 8]  # every rollout came from the engine
    logs = [h for h in trainer.state.log_history if "sampling/sampling_logp_difference/max" in h]
    assert len(logs) == 3
    # TRL's importance-sampling correction compared our logprobs with its forward: the engine was in sync.
    assert all(h["sampling/sampling_logp_difference/max"] < TOLERANCE for h in logs)
    # The evaluation path (trainer.rollout_engine) syncs the last step's weights before generating.
    out = trainer.rollout_engine.generate(_prompts(tok, 2), _sampling())
    assert _max_gap(out, trainer.accelerator.unwrap_model(trainer.model).eval()) < TOLERANCE


def test_logprob_gap_is_logged_and_a_stale_engine_is_flagged(engine, path, tok, tmp_path):
    """rollout/logprob_gap_{mean,max}: small with the weight sync, and a warning at the first step that samples
    from stale weights (the sync switched off, as a silently failing sync would)."""
    import warnings

    from posttrain.trainers.grpo import GRPOConfig, GRPOTrainer

    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}]}
                            for a in range(4) for b in range(4)])

    def run(out, stale):
        engine.sync_weights(load_model(path, "float32"))
        args = GRPOConfig(output_dir=str(out), max_steps=2, per_device_train_batch_size=8, num_generations=4,
                          max_completion_length=10, logging_steps=1, use_cpu=True, bf16=False, report_to=[],
                          save_strategy="no", seed=0, learning_rate=0.3, disable_tqdm=True, temperature=TEMPERATURE)
        trainer = GRPOTrainer(model=load_model(path, "float32"), reward_funcs=[_digit_reward], args=args,
                              train_dataset=ds, processing_class=tok, rollout_engine=engine)
        sync = engine.sync_if_stale
        if stale:
            engine.sync_if_stale = lambda force=False: None
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                trainer.train()
        finally:
            engine.sync_if_stale = sync
        gaps = [h for h in trainer.state.log_history if "rollout/logprob_gap_mean" in h]
        return gaps, [w for w in caught if "stale weights" in str(w.message)]

    gaps, warned = run(tmp_path / "synced", stale=False)
    assert len(gaps) == 2 and all(h["rollout/logprob_gap_max"] < TOLERANCE for h in gaps) and not warned
    gaps, warned = run(tmp_path / "stale", stale=True)
    assert gaps[0]["rollout/logprob_gap_mean"] < TOLERANCE  # step 1 samples from the weights it started with
    assert gaps[1]["rollout/logprob_gap_mean"] > 0.05 and len(warned) == 1


def test_rollout_engine_and_use_vllm_together_is_an_error(engine, path, tok, tmp_path):
    from posttrain.trainers.grpo import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=str(tmp_path), use_vllm=True, use_cpu=True, bf16=False, report_to=[],
                      per_device_train_batch_size=4, num_generations=4)
    with pytest.raises(ValueError, match="leave use_vllm=False"):
        GRPOTrainer(model=load_model(path), reward_funcs=[_digit_reward], args=args,
                    train_dataset=Dataset.from_list([{"prompt": "1+1="}] * 4), processing_class=tok, rollout_engine=engine)


def test_run_recipe_with_vllm_engine(tmp_path):
    """`rollout.engine: vllm` through the recipe pipeline (grpo.yaml trains a LoRA adapter: the LoRA sync path)."""
    from posttrain.recipe import load_recipe
    from posttrain.train import run_recipe

    r = load_recipe("recipes/grpo/grpo.yaml", [
        "model.name_or_path=tiny-qwen2", "trainer.max_steps=2", f"output_dir={tmp_path}", "rollout.engine=vllm",
        "rollout.num_generations=4", "rollout.max_new_tokens=12", "trainer.per_device_train_batch_size=8",
        "rollout.vllm={max_model_len: 256}", "eval.before=false", "eval.after=true", "eval.limit=4",
        "data.train.limit=16"])
    result = run_recipe(r)
    assert result.summary["steps"] == 2
    assert 0.0 <= result.summary["accuracy_after"] <= 1.0
    logged = [h for h in (tmp_path / "report" / "metrics.jsonl").read_text().splitlines() if "sampling_logp_difference" in h]
    assert len(logged) == 2


def test_multi_turn_rollout_generates_through_the_vllm_engine(tmp_path):
    """EPO on the guessing game with `rollout.engine: vllm`: the environment's rollout_func plays every turn on
    the shared engine (synced to the trainer's weights), several turns are played, feedback stays masked."""
    import json

    from posttrain.recipe import load_recipe
    from posttrain.train import run_recipe

    r = load_recipe("recipes/grpo/epo_guessing.yaml", [
        "model.name_or_path=tiny-qwen2", "model.peft=null", "trainer.max_steps=2", "trainer.per_device_train_batch_size=8",
        "rollout.num_generations=4", "rollout.max_new_tokens=48", "data.train.options.tokens_per_turn=6",
        "rollout.engine=vllm", "rollout.vllm={max_model_len: 512}", f"output_dir={tmp_path}"])
    result = run_recipe(r)
    assert result.summary["steps"] == 2
    steps = [h for line in (tmp_path / "report" / "metrics.jsonl").read_text().splitlines()
             if "loss" in (h := json.loads(line))]
    assert len(steps) == 2
    for h in steps:
        assert "turn_entropy/0" in h and "turn_entropy/1" in h
        assert h["completions/mean_length"] < 48
        # the agent's tokens came from the engine in sync with the trainer (feedback tokens are NaN, left out)
        assert h["sampling/sampling_logp_difference/max"] < TOLERANCE


def test_seeded_batch_longer_than_one_prefill_budget(engine, tok):
    """Seeded requests whose prompts together exceed vLLM's token budget per step: with chunked prefill vLLM 0.32
    rewinds a CPU generator's offset and fails ("CPU Generator does not use offset"); the engine turns it off."""
    prompts = _prompts(tok, 160)  # about 30 tokens each: > 4096 prompt tokens with n = 2
    out = engine.generate(prompts, _sampling(n=2, max_new_tokens=2, seed=3))
    assert len(out) == 160 and all(len(o.completions) == 2 for o in out)
