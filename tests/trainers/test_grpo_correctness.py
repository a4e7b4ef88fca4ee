"""Configurations that used to train something else silently (issue 12), each against a brute-force or
hand computation: the sampling policy's statistics when a generation batch spans optimizer steps, one notion of
correct, the LM-head scaling of DCPO's re-projection, BNPO's reward range and decomposition, the completions
table, a no-op entropy term, a component added by registration alone."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.algos import TOKEN_WEIGHTS
from posttrain.algos.advantages import BNPOArgs, bnpo, decomposed_advantages
from posttrain.models import load_model, load_tokenizer, lora_config, pull_model
from posttrain.trainers.grpo import (
    TRAINED_ADVANTAGE_COLUMN,
    BNPOConfig,
    BNPOTrainer,
    DCPOConfig,
    DCPOTrainer,
    EntropyControlConfig,
    EntropyControlTrainer,
    STEERConfig,
    STEERTrainer,
    lm_head_scaling,
)
from tests.trainers.test_grpo_methods import any_digit, record_token_weights, steps
from tests.trainers.tiny_setting import config_kwargs, dataset, digit_reward

TEMPERATURE = 0.9


class Snapshotting:
    """Keeps the policy's weights as they were when each generation batch was sampled."""

    def _generate_and_score_completions(self, inputs):
        model = self.accelerator.unwrap_model(self.model)
        self.snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        self.generation_of_call.append(len(self.snapshots) - 1)
        return super()._generate_and_score_completions(inputs)

    def _compute_loss(self, model, inputs):
        self.loss_inputs.append((len(self.snapshots) - 1, {k: v for k, v in inputs.items()}))
        return super()._compute_loss(model, inputs)


class SnapshotSTEER(Snapshotting, STEERTrainer):
    pass


class SnapshotDCPO(Snapshotting, DCPOTrainer):
    pass


def _make(cls, config_cls, out, reward=digit_reward, peft=False, model=None, **kw):
    trainer = cls(model=model or load_model("tiny-qwen2"), reward_funcs=reward if isinstance(reward, list) else [reward],
                  args=config_cls(**config_kwargs(out, **kw)), train_dataset=dataset(),
                  processing_class=load_tokenizer("tiny-qwen2"),
                  peft_config=lora_config(r=4, alpha=8) if peft else None)
    trainer.snapshots, trainer.generation_of_call, trainer.loss_inputs = [], [], []
    return trainer


def _sampling_policy_stats(snapshot, inputs, factors):
    """Brute force: a fresh model with the sampling-time weights, full logits, entropies and tempered log-probs."""
    model = AutoModelForCausalLM.from_pretrained(str(pull_model("tiny-qwen2")), dtype=torch.float32)
    missing, unexpected = model.load_state_dict(snapshot, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embeddings
    model.eval()
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    t = inputs["completion_ids"].size(1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits[:, -t - 1 : -1].double()
    target = inputs["completion_ids"].unsqueeze(-1)
    z = logits / TEMPERATURE
    entropy = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    tempered = {f: torch.log_softmax(logits / (TEMPERATURE * f), -1).gather(-1, target).squeeze(-1) for f in factors}
    return entropy, tempered


SETTINGS = {
    "num_iterations_2": dict(num_iterations=2, max_steps=3),
    "steps_per_generation_2": dict(steps_per_generation=2, max_steps=3),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_steer_h_old_is_the_sampling_policys_entropy(tmp_path, setting):
    """When one generation batch spans optimizer steps, STEER's H_old must be the sampling policy's entropy,
    not the current policy's (which has moved): checked against a forward of the weights kept at sampling."""
    t = _make(SnapshotSTEER, STEERConfig, tmp_path, temperature=TEMPERATURE, **SETTINGS[setting])
    calls = record_token_weights(t)
    t.train()
    assert len(calls) == len(t.loss_inputs) >= 3
    moved = 0.0
    for (_, ctx, _), (generation, inputs) in zip(calls, t.loss_inputs):
        entropy, _ = _sampling_policy_stats(t.snapshots[generation], inputs, ())
        mask = ctx.mask.bool()
        torch.testing.assert_close(ctx.entropy_old[mask].double(), entropy[mask], atol=2e-4, rtol=1e-4)
        moved = max(moved, (ctx.entropy[mask] - ctx.entropy_old[mask]).abs().max().item())
    assert moved > 1e-3  # the current policy did move away from the sampling one: the old code would have failed


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_dcpo_rho_is_taken_at_the_sampling_policy(tmp_path, setting):
    t = _make(SnapshotDCPO, DCPOConfig, tmp_path, temperature=TEMPERATURE, **SETTINGS[setting])
    calls = record_token_weights(t)
    t.train()
    for (_, ctx, _), (generation, inputs) in zip(calls, t.loss_inputs):
        _, tempered = _sampling_policy_stats(t.snapshots[generation], inputs, (1.0, 1.2, 0.8))
        mask = ctx.mask.bool()
        for factor in (1.0, 1.2, 0.8):
            torch.testing.assert_close(ctx.tempered_old_logps[factor][mask].double(), tempered[factor][mask],
                                       atol=2e-4, rtol=1e-4)
    # TRL's old log-probs (the ratio's denominator) are left as TRL computed them
    (_, ctx, _) = calls[1]
    assert not torch.allclose(ctx.ratio[ctx.mask.bool()], torch.ones(()), atol=1e-6)


def test_peft_reference_forward_is_not_taken_for_the_sampling_policy(tmp_path):
    """With LoRA and a KL term, the generation's first policy forward (aligned steps, no old forward) is the
    reference (adapter disabled): it must not be used as H_old."""
    t = _make(SnapshotSTEER, STEERConfig, tmp_path, peft=True, beta=0.1, max_steps=2, temperature=TEMPERATURE)
    calls = record_token_weights(t)
    t.train()
    for _, ctx, _ in calls:
        assert torch.equal(ctx.entropy_old, ctx.entropy)  # aligned: the loss forward's policy is the sampling one


def test_dcpo_correct_is_the_shared_notion_not_any_positive_reward(tmp_path):
    """A wrong but well-formatted answer (accuracy 0, format 1) is not correct: DCPO's y and p_hat use the
    accuracy reward above correct_threshold, like the group statistics; the old code used total > 0.05."""
    def accuracy(prompts, completions, **kw):
        return [0.0] * len(completions)

    def format_(prompts, completions, **kw):
        return [1.0] * len(completions)

    format_.__name__ = "format"
    t = _make(DCPOTrainer, DCPOConfig, tmp_path, reward=[accuracy, format_], max_steps=1)
    t.train()
    (h,) = steps(t)
    assert h["dcpo/p_hat"] == 0.0 and h["dcpo/alpha"] == 0.0 and h["groups/frac_all_wrong"] == 1.0


@pytest.mark.parametrize("setting", [{"logit_scale": 0.5}, {"lm_head_multiplier": 2.0}, {"output_multiplier": 0.7},
                                     {"logits_scaling": 4.0}, {"final_logit_softcapping": 1.5}])
def test_dcpo_reprojection_applies_every_logit_scaling_trl_applies(tmp_path, setting):
    """DCPO's log-probs from the kept hidden states must equal TRL's own on models that scale or soft-cap their
    logits (TRL's fused head reads these config fields); the old code ignored three of them silently."""
    model = load_model("tiny-qwen2")
    for key, value in setting.items():
        setattr(model.config, key, value)
    assert lm_head_scaling(model.config) != (1.0, None)
    t = _make(DCPOTrainer, DCPOConfig, tmp_path, model=model, max_steps=1, temperature=TEMPERATURE)
    calls = record_token_weights(t)
    t.train()
    (_, ctx, _), = calls
    mask = ctx.mask.bool()
    torch.testing.assert_close(ctx.tempered_old_logps[1.0][mask], ctx.logp[mask], atol=1e-5, rtol=1e-5)


def test_lm_head_scaling_reads_fields_in_trls_order():
    from types import SimpleNamespace as NS

    assert lm_head_scaling(NS(model_type="x")) == (1.0, None)
    assert lm_head_scaling(NS(model_type="x", logit_scale=None, output_multiplier=3.0)) == (3.0, None)
    assert lm_head_scaling(NS(model_type="granite", logits_scaling=4.0)) == (0.25, None)
    assert lm_head_scaling(NS(model_type="hyperclovax", logits_scaling=4.0)) == (4.0, None)
    assert lm_head_scaling(NS(model_type="x", logit_scale=2.0, final_logit_softcapping=30.0)) == (2.0, 30.0)


def test_bnpo_warns_once_about_rewards_outside_its_range_or_raises(tmp_path):
    def two(prompts, completions, **kw):
        return [2.0 * (i % 2) for i in range(len(completions))]

    two.__name__ = "accuracy"
    t = _make(BNPOTrainer, BNPOConfig, tmp_path / "w", reward=two, max_steps=2)
    with pytest.warns(RuntimeWarning, match=r"rewards in \[0, 2\]") as record:
        t.train()
    assert sum("rewards in [0, 2]" in str(w.message) for w in record) == 1  # once per run, not per step
    t = _make(BNPOTrainer, BNPOConfig, tmp_path / "r", reward=two, max_steps=1, bnpo_out_of_range="raise")
    with pytest.raises(ValueError, match=r"rewards in \[0, 2\]"):
        t.train()


def test_bnpo_decomposition_weights_and_per_function_fits(tmp_path):
    def longer(prompts, completions, **kw):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return [1.0 if len(t) > 20 else 0.0 for t in texts]

    t = _make(BNPOTrainer, BNPOConfig, tmp_path, reward=[any_digit, longer], max_steps=1, advantage_decompose=True,
              reward_weights=[3.0, 1.0])
    t.train()
    (h,) = steps(t)
    assert {"bnpo/alpha/accuracy", "bnpo/beta/accuracy", "bnpo/alpha/longer", "bnpo/beta/longer"} <= set(h)
    rpf = torch.tensor([list(t._logs["rewards"]["accuracy"]), list(t._logs["rewards"]["longer"])]).T
    expected = decomposed_advantages(bnpo, rpf, 4, BNPOArgs(), torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(torch.tensor(list(t._logs["advantages"])), expected)


def test_completions_table_shows_what_was_trained_on(tmp_path):
    t = _make(STEERTrainer, STEERConfig, tmp_path, max_steps=1)
    calls = record_token_weights(t)
    t.train()
    trained = list(t._logs["extra"][TRAINED_ADVANTAGE_COLUMN])
    sequence = list(t._logs["advantages"])
    assert len(trained) == len(sequence) == 8 and all(math.isfinite(v) for v in trained)
    (adv, ctx, out), = calls
    m = ctx.mask
    means = ((out * m).sum(1) / m.sum(1)).tolist()
    assert sorted(trained) == pytest.approx(sorted(means), abs=1e-6)
    assert any(abs(a - b) > 1e-6 for a, b in zip(trained, sequence))  # STEER's weights shrink some tokens
    import json

    lines = [json.loads(x) for x in (tmp_path / "rollouts.jsonl").read_text().splitlines()]
    assert sorted(x["advantage_trained"] for x in lines) == pytest.approx(sorted(trained), abs=1e-6)


def test_none_entropy_term_is_skipped(tmp_path):
    """The `none` term added entropy * 0 to the loss, switching on the entropy-gradient pass of TRL's fused
    kernel on every step; it is a declared no-op now and never runs."""
    t = _make(STEERTrainer, STEERConfig, tmp_path, max_steps=1)
    ran = []
    t._et = dataclasses.replace(t._et, fn=lambda *a: ran.append(1) or (torch.zeros(()), {}))
    t.train()
    assert ran == [] and t._et.noop


class ToyState:
    def __init__(self):
        self.values, self.step = [], 0

    def context(self):
        return {}

    def update(self, value):
        self.values.append(value)
        self.step += 1

    def state_dict(self):
        return {"values": self.values, "step": self.step}

    def load_state_dict(self, state):
        self.values, self.step = list(state["values"]), state["step"]


def test_a_new_component_is_one_registration(tmp_path, monkeypatch):
    """A token weight that halves every advantage, needs the sampling policy's entropy, keeps a state updated
    from a signal, and logs a diagnostic: registered in the registry alone, run by the unchanged trainer."""
    from posttrain.algos.token_weights import broadcast_advantages

    @dataclasses.dataclass(frozen=True)
    class HalfArgs:
        factor: float = 0.5

    def half(advantages, ctx, args):
        ctx.need("half", "entropy_old")
        return broadcast_advantages(advantages, ctx.mask) * args.factor

    def signal(ctx, args):
        return (ctx.entropy_old * ctx.mask).sum(), ctx.mask.sum()

    entry = TOKEN_WEIGHTS._entries.copy()
    monkeypatch.setattr(TOKEN_WEIGHTS, "_entries", entry)
    TOKEN_WEIGHTS.register("half", args=HalfArgs, needs={"entropy_old"}, state=ToyState, state_signal=signal,
                           config={"factor": lambda c: c.steer_lambda_min / 2},
                           diagnostics=lambda a, out, ctx, args: {"factor": args.factor})(half)
    t = _make(EntropyControlTrainer, EntropyControlConfig, tmp_path, token_weight="half", steer_lambda_min=0.6,
              max_steps=2, num_iterations=2)
    t.train()
    first, second = steps(t)
    assert first["half/factor"] == pytest.approx(0.3)
    state = t.method_states["half"]
    assert state.step == 2 and all(0 < v < math.log(len(load_tokenizer("tiny-qwen2"))) + 1e-3 for v in state.values)


def test_positional_config_is_read(tmp_path):
    t = STEERTrainer(load_model("tiny-qwen2"), [digit_reward], STEERConfig(**config_kwargs(tmp_path, max_steps=1)),
                     train_dataset=dataset(), processing_class=load_tokenizer("tiny-qwen2"))
    assert t._tw.name == "steer"
    with pytest.raises(TypeError, match="needs an EntropyControlConfig"):
        STEERTrainer(load_model("tiny-qwen2"), [digit_reward], None, train_dataset=dataset(),
                     processing_class=load_tokenizer("tiny-qwen2"))
