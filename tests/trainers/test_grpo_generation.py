"""Training rollouts without vLLM: posttrain's continuous-batching decoder stands in for TRL's model.generate
only where it reproduces TRL's effective generation config, and returns what TRL's path returns."""

import logging
from types import SimpleNamespace

import pytest

from posttrain.models import load_model, load_tokenizer, lora_config
from posttrain.trainers.grpo import GRPOConfig, GRPOTrainer
from tests.trainers.tiny_setting import config_kwargs, dataset, digit_reward


def make(out, peft=False, **kw):
    return GRPOTrainer(model=load_model("tiny-qwen2"), reward_funcs=[digit_reward],
                       args=GRPOConfig(**config_kwargs(out, **kw)), train_dataset=dataset(),
                       processing_class=load_tokenizer("tiny-qwen2"),
                       peft_config=lora_config(r=4, alpha=8) if peft else None)


def prompt_ids(trainer, groups, copies):
    tok = trainer.processing_class
    ids = [tok.apply_chat_template([{"role": "user", "content": f"What is {g} + {g + 1}?"}],
                                   add_generation_prompt=True, tokenize=True, return_dict=False) for g in range(groups)]
    return [list(p) for p in ids for _ in range(copies)] if isinstance(copies, int) else \
        [list(ids[g]) for g, c in enumerate(copies) for _ in range(c)]


def generate(trainer, ids, continuous):
    trainer.args.hf_continuous_batching = continuous
    trainer.__dict__.pop("_continuous_sampling_params", None)
    return trainer._generate_single_turn(ids, None, {}, 4)


@pytest.mark.parametrize("copies", [4, [3, 1, 2]], ids=["groups", "uneven"])
@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_same_completions_as_trl_generate(tmp_path, peft, copies):
    """At a temperature where sampling is argmax, both paths give the same ids, cut after the first EOS
    (included), in the prompts' order; and no log-probs, as TRL's own transformers path."""
    trainer = make(tmp_path, peft=peft, temperature=1e-4, max_completion_length=24)
    ids = prompt_ids(trainer, 3, copies)
    ours, ours_lp = generate(trainer, ids, True)
    theirs, theirs_lp = generate(trainer, ids, False)
    assert ours_lp is None and theirs_lp is None
    assert ours == theirs
    assert len(ours) == len(ids) and all(1 <= len(c) <= 24 for c in ours)


def test_eos_rows_stop_and_keep_the_eos(tmp_path):
    trainer = make(tmp_path, temperature=1e-4, max_completion_length=24)
    ids = prompt_ids(trainer, 2, 2)
    free = generate(trainer, ids, True)[0]
    # declare each row's 3rd generated token an end token: both paths stop there, the EOS kept
    trainer.eos_token_ids = sorted({c[2] for c in free})
    ours, theirs = generate(trainer, ids, True)[0], generate(trainer, ids, False)[0]
    assert ours == theirs
    assert all(c[-1] in trainer.eos_token_ids and len(c) <= 3 for c in ours)


def test_continuous_path_replaces_model_generate(tmp_path):
    trainer = make(tmp_path)
    calls = []
    original = trainer.model.generate
    trainer.model.generate = lambda *a, **k: calls.append(1) or original(*a, **k)
    trainer.train()
    assert calls == []
    assert all(h["completions/mean_length"] > 0 for h in trainer.state.log_history if "loss" in h)
    trainer.args.hf_continuous_batching = False
    trainer.__dict__.pop("_continuous_sampling_params")
    trainer.args.max_steps = 3
    trainer.train()
    assert calls


def test_sampling_follows_the_effective_generation_config(tmp_path):
    trainer = make(tmp_path, temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, max_completion_length=9)
    s = trainer._continuous_sampling()
    assert (s.temperature, s.top_k, s.top_p, s.min_p, s.max_new_tokens) == (0.7, 5, 0.9, 0.05, 9)
    assert (s.repetition_penalty, s.logprobs, s.entropies, s.seed) == (1.0, False, False, None)
    # TRL's defaults: no top-k (0), no top-p, temperature 1
    s = make(tmp_path / "d")._continuous_sampling()
    assert (s.temperature, s.top_k, s.top_p, s.min_p) == (1.0, None, 1.0, None)


@pytest.mark.parametrize("kw, reason", [
    ({"repetition_penalty": 1.2}, "RepetitionPenaltyLogitsProcessor"),
    ({"generation_kwargs": {"no_repeat_ngram_size": 2}}, "NoRepeatNGramLogitsProcessor"),
    ({"generation_kwargs": {"typical_p": 0.9}}, "TypicalLogitsWarper"),
    ({"hf_continuous_batching": False}, "off"),
], ids=["repetition_penalty", "no_repeat_ngram", "typical_p", "off"])
def test_unsupported_configs_keep_trls_generate(tmp_path, caplog, kw, reason):
    trainer = make(tmp_path, **kw)
    with caplog.at_level(logging.INFO, logger="posttrain.trainers.grpo"):
        assert trainer._continuous_sampling() is None
    assert reason in caplog.text
    ids = prompt_ids(trainer, 1, 2)
    trainer.args.hf_continuous_batching = kw.get("hf_continuous_batching", True)
    completions, logprobs = trainer._generate_single_turn(ids, None, {}, 2)
    assert len(completions) == 2 and logprobs is None


def _accelerator(fsdp: bool = False, zero_stage: int | None = None, processes: int = 2):
    plugin = SimpleNamespace(zero_stage=zero_stage) if zero_stage is not None else None
    return SimpleNamespace(is_fsdp2=fsdp, num_processes=processes,
                           state=SimpleNamespace(fsdp_plugin=None, deepspeed_plugin=plugin))


@pytest.mark.parametrize("accelerator, gather, continuous", [
    (_accelerator(fsdp=True), True, False),
    (_accelerator(zero_stage=3), False, False),
    (_accelerator(zero_stage=3), True, True),  # ZeRO-3 gathers the whole model for generation by default
    (_accelerator(zero_stage=2), False, True),
    (_accelerator(fsdp=True, processes=1), True, True),
], ids=["fsdp", "zero3_sharded", "zero3_gathered", "zero2", "fsdp_one_process"])
def test_parameters_sharded_while_generating_keep_trls_generate(tmp_path, caplog, accelerator, gather, continuous):
    """Sharded parameters are all-gathered in every decoding step, a collective: the decoder, whose ranks stop after
    different numbers of steps, would mismatch them (tests/trainers/test_grpo_methods_multiproc.py runs FSDP2)."""
    trainer = make(tmp_path, ds3_gather_for_generation=gather)
    trainer.accelerator = SimpleNamespace(**vars(accelerator), unwrap_model=trainer.accelerator.unwrap_model)
    with caplog.at_level(logging.INFO, logger="posttrain.trainers.grpo"):
        sampling = trainer._continuous_sampling()
    assert (sampling is not None) == continuous
    if not continuous:
        assert "sharded over ranks during generation" in caplog.text
