"""STEER, EPO, DCPO and BNPO trainers on a tiny model: parity with TRL when switched off, their effect when
on, diagnostics, degenerate batches, LoRA, composition through the config, and checkpointed state."""

import json
import math
import re

import pytest
import torch
import trl

from posttrain.algos.entropy_terms import epo_beta
from posttrain.algos.token_weights import DCPOArgs, dcpo_alpha
from posttrain.models import load_model, load_tokenizer, lora_config
from posttrain.trainers import grpo
from posttrain.trainers.fused_head import compact_lm_head_on_cpu
from posttrain.trainers.grpo import (
    BNPOConfig,
    BNPOTrainer,
    DCPOConfig,
    DCPOTrainer,
    EntropyControlConfig,
    EntropyControlTrainer,
    EPOConfig,
    EPOTrainer,
    STEERConfig,
    STEERTrainer,
)
from tests.trainers.tiny_setting import config_kwargs, dataset, digit_reward

METHODS = {"steer": (STEERTrainer, STEERConfig), "epo": (EPOTrainer, EPOConfig),
           "dcpo": (DCPOTrainer, DCPOConfig), "bnpo": (BNPOTrainer, BNPOConfig)}
OFF = {"steer": {"steer_lambda_min": 1.0}, "epo": {"epo_lambda": 0.0}, "dcpo": {"dcpo_cap": 0.0}}


def any_digit(prompts, completions, **kwargs):
    """Binary reward a random tiny model earns about half the time."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [1.0 if re.search(r"\d", t) else 0.0 for t in texts]


any_digit.__name__ = "accuracy"


def constant(value):
    def reward(prompts, completions, **kwargs):
        return [value] * len(completions)

    reward.__name__ = "accuracy"
    return reward


def make(out, method, reward=digit_reward, peft=False, **kw):
    trainer_cls, config_cls = METHODS[method] if isinstance(method, str) else method
    return trainer_cls(model=load_model("tiny-qwen2"), reward_funcs=[reward], args=config_cls(**config_kwargs(out, **kw)),
                       train_dataset=dataset(), processing_class=load_tokenizer("tiny-qwen2"),
                       peft_config=lora_config(r=4, alpha=8) if peft else None)


def steps(trainer):
    return [h for h in trainer.state.log_history if "loss" in h]


def trl_run(out, reward=digit_reward, **kw):
    """TRL's GRPOTrainer, its fused LM head scoring only the completion positions as the base does on the CPU
    (the base's one change to the arithmetic: test_grpo_base.py::test_compact_lm_head_equals_every_position_scoring)."""
    t = trl.GRPOTrainer(model=load_model("tiny-qwen2"), reward_funcs=[reward], args=trl.GRPOConfig(**config_kwargs(out, **kw)),
                        train_dataset=dataset(), processing_class=load_tokenizer("tiny-qwen2"))
    with compact_lm_head_on_cpu(torch.device("cpu")):
        t.train()
    return t


@pytest.fixture(scope="module")
def trl_reference(tmp_path_factory):
    return trl_run(tmp_path_factory.mktemp("trl"))


def assert_same_training(ours, theirs):
    assert [h["loss"] for h in steps(ours)] == [h["loss"] for h in steps(theirs)]
    for (n, p), (_, q) in zip(ours.model.named_parameters(), theirs.model.named_parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("method", ["steer", "epo", "dcpo", "none"])
def test_switched_off_equals_trl(tmp_path, trl_reference, method):
    """STEER lambda_min = 1, EPO lambda = 0, DCPO alpha = 0 (cap 0), all components `none`: TRL's GRPO exactly."""
    spec = (EntropyControlTrainer, EntropyControlConfig) if method == "none" else method
    ours = make(tmp_path, spec, **OFF.get(method, {}))
    ours.train()
    assert_same_training(ours, trl_reference)


def test_bnpo_at_three_halves_is_grpo_up_to_its_constant(tmp_path):
    """alpha = beta = 3/2: A = (pi/8)(R - p)/sqrt(p(1 - p)); with binary rewards that is TRL's GRPO advantage
    times (pi/8) sqrt(G/(G-1)) (population vs unbiased std), so loss and gradients scale by that constant
    and one SGD step moves every weight by that constant times TRL's move."""
    kw = dict(max_steps=1, learning_rate=1.0, optim="sgd", max_grad_norm=0.0)
    theirs = trl_run(tmp_path / "trl", reward=any_digit, **kw)
    ours = make(tmp_path / "bnpo", "bnpo", reward=any_digit, bnpo_fixed_alpha=1.5, bnpo_fixed_beta=1.5, **kw)
    ours.train()
    g = 4
    c = math.pi / 8 * math.sqrt(g / (g - 1))
    (h_ours,) = steps(ours)
    a_ours, a_theirs = torch.tensor(list(ours._logs["advantages"])), torch.tensor(list(theirs._logs["advantages"]))
    assert a_theirs.abs().sum() > 0  # the batch carries signal
    assert torch.allclose(a_ours, c * a_theirs, rtol=1e-3, atol=1e-6)
    assert h_ours["bnpo/alpha"] == h_ours["bnpo/beta"] == 1.5
    start = dict(load_model("tiny-qwen2").named_parameters())
    cross = square = 0.0
    for (n, p), (_, q) in zip(ours.model.named_parameters(), theirs.model.named_parameters()):
        d_ours, d_theirs = (p - start[n]).detach().double(), (q - start[n]).detach().double()
        assert torch.allclose(d_ours, c * d_theirs, rtol=1e-3, atol=1e-6), n  # atol: float32 ulps of weights ~1
        cross, square = cross + (d_ours * d_theirs).sum().item(), square + (d_theirs**2).sum().item()
    assert square > 0 and cross / square == pytest.approx(c, rel=5e-4)  # rel: TRL adds 1e-4 to the std


def test_steer_weights_logged_and_change_training(tmp_path, trl_reference):
    t = make(tmp_path, "steer")
    t.train()
    for h in steps(t):
        assert h["steer/weight_min"] == pytest.approx(0.8)  # the largest |Omega| gets exactly lambda_min
        assert 0.8 <= h["steer/weight_mean"] < 1.0
    assert [h["loss"] for h in steps(t)] != [h["loss"] for h in steps(trl_reference)]


def test_steer_global_scope_and_linear_form(tmp_path):
    t = make(tmp_path, "steer", steer_max_scope="global", steer_form="linear", max_steps=1)
    t.train()
    (h,) = steps(t)
    assert h["steer/weight_min"] == pytest.approx(0.8) and math.isfinite(h["loss"])


def test_epo_term_is_minus_lambda_entropy_with_alpha_zero(tmp_path, trl_reference):
    """alpha = 0: the term is -lambda * H_traj, so the first loss is TRL's minus lambda times the entropy."""
    t = make(tmp_path, "epo", epo_lambda=1.0, epo_alpha=0.0)
    t.train()
    first, second = steps(t)
    assert first["loss"] == pytest.approx(steps(trl_reference)[0]["loss"] - first["epo/entropy_traj"], abs=1e-5)
    assert first["epo/beta"] == pytest.approx(2.0)
    assert second["epo/beta"] == pytest.approx(epo_beta(1, 2, 3.0))
    assert "epo/h_bar" not in first and second["epo/h_bar"] == pytest.approx(first["epo/entropy_traj"], rel=1e-6)
    assert first["epo/corridor_fraction"] == 1.0
    assert t.method_states["epo"].step == 2 and t.method_states["epo"].entropy_count == 2


def test_epo_corridor_penalises_outside_band(tmp_path):
    """kappa_r below 1: the current entropy sits above kappa_r * Hbar, so the penalty and its log are active."""
    t = make(tmp_path, "epo", epo_kappa_l=0.0, epo_kappa_r=0.5, epo_alpha=1.0, max_steps=2)
    t.train()
    second = steps(t)[1]
    assert second["epo/corridor_fraction"] == 0.0 and second["epo/smooth_penalty"] > 0


def record_token_weights(trainer):
    """Wrap the trainer's token-weight component so each call's context and output are kept."""
    import dataclasses

    calls = []
    fn = trainer._tw.fn

    def recording(advantages, ctx, args):
        out = fn(advantages, ctx, args)
        calls.append((advantages.detach().clone(), dataclasses.replace(ctx), out.detach().clone()))
        return out

    trainer._tw = dataclasses.replace(trainer._tw, fn=recording)
    return calls


def test_dcpo_logprobs_from_the_same_forward_match_trl(tmp_path):
    """The LM head redone on the kept hidden states gives TRL's own log-probs at the sampling temperature:
    the positions line up, so rho is taken on the right tokens."""
    t = make(tmp_path, "dcpo", max_steps=1, temperature=0.9)
    calls = record_token_weights(t)
    t.train()
    (_, ctx, _), = calls
    mask = ctx.mask.bool()
    assert torch.allclose(ctx.tempered_old_logps[1.0][mask], ctx.logp[mask], atol=1e-5)
    assert set(ctx.tempered_old_logps) == {1.0, 1.2, 0.8}


def test_dcpo_controller_and_diagnostics(tmp_path):
    t = make(tmp_path, "dcpo")
    t.train()
    first, second = steps(t)
    args = DCPOArgs()
    assert first["dcpo/h_prev"] == 0.0 and first["dcpo/temperature"] == pytest.approx(1.2)
    assert first["dcpo/alpha"] == pytest.approx(dcpo_alpha(0.0, first["dcpo/p_hat"], args), rel=1e-6)
    # H_prev of step 2 is the mean sampled-token NLL of step 1: about log|V| for a random model, above H0
    assert second["dcpo/h_prev"] > args.h0 and second["dcpo/temperature"] == pytest.approx(0.8)
    assert 0 < second["dcpo/alpha"] < 1


@pytest.mark.parametrize("method", ["steer", "epo", "dcpo", "bnpo"])
@pytest.mark.parametrize("case", ["all_equal", "none_correct", "one_prompt"])
def test_degenerate_batches_stay_finite(tmp_path, method, case):
    reward = {"all_equal": constant(1.0), "none_correct": constant(0.0), "one_prompt": any_digit}[case]
    kw = {"per_device_train_batch_size": 4} if case == "one_prompt" else {}
    t = make(tmp_path, method, reward=reward, max_steps=1, **kw)
    t.train()
    (h,) = steps(t)
    assert all(math.isfinite(v) for k, v in h.items() if isinstance(v, float) and k.split("/")[0] in (method, "loss", "grad_norm"))
    assert all(torch.isfinite(p).all() for p in t.model.parameters())
    if method == "bnpo" and case != "one_prompt":
        assert h["bnpo/alpha"] == h["bnpo/beta"] == 1.0  # no spread of group means: the degenerate fit


@pytest.mark.parametrize("method", ["steer", "epo", "dcpo", "bnpo"])
def test_lora_trains_adapter_only(tmp_path, method):
    t = make(tmp_path, method, peft=True, max_steps=1)
    before = {n: p.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad}
    t.train()
    assert all("lora" in n for n in before)
    assert any(not torch.equal(before[n], p) for n, p in t.model.named_parameters() if n in before)


def test_components_compose_through_the_config(tmp_path):
    """BNPO advantages with STEER weights, chosen by name: both diagnostics appear; QAE and Clip-Cov run."""
    t = make(tmp_path / "a", "bnpo", token_weight="steer", max_steps=1)
    t.train()
    (h,) = steps(t)
    assert "bnpo/alpha" in h and h["steer/weight_min"] == pytest.approx(0.8)
    t = make(tmp_path / "b", "steer", advantage="qae", token_weight="clip_cov", clip_cov_ratio=0.2, clip_cov_lb=-1e9,
             clip_cov_ub=1e9, max_steps=1)
    t.train()
    (h,) = steps(t)
    assert h["clip_cov/weight_min"] == 0.0 and 0.0 < h["clip_cov/weight_mean"] < 1.0


def test_unknown_component_and_wrong_config_are_errors(tmp_path):
    with pytest.raises(KeyError, match="did you mean 'steer'"):
        STEERConfig(**config_kwargs(tmp_path, token_weight="stear"))
    with pytest.raises(ValueError, match="lambda_min"):
        STEERConfig(**config_kwargs(tmp_path, steer_lambda_min=1.5))
    with pytest.raises(TypeError, match="EntropyControlConfig"):
        STEERTrainer(model=load_model("tiny-qwen2"), reward_funcs=[digit_reward], args=grpo.GRPOConfig(**config_kwargs(tmp_path)),
                     train_dataset=dataset(), processing_class=load_tokenizer("tiny-qwen2"))


@pytest.mark.parametrize("method", ["epo", "dcpo"])
def test_resume_restores_method_state(tmp_path, method):
    full = make(tmp_path / "full", method, max_steps=3, save_strategy="steps", save_steps=2)
    full.train()
    saved = json.loads((tmp_path / "full" / "checkpoint-2" / "posttrain_state.json").read_text())
    assert saved[method]["step"] == 2
    resumed = make(tmp_path / "resumed", method, max_steps=3)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    a, b = full.method_states[method].state_dict(), resumed.method_states[method].state_dict()
    assert a.keys() == b.keys() and b["step"] == 3
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-5), k
    assert steps(resumed)[-1]["loss"] == pytest.approx(steps(full)[-1]["loss"], abs=1e-6)


# --- the small additions to posttrain.algos this work needed ---------------------------------------------
def test_bnpo_fixed_alpha_beta_gives_the_closed_form():
    from posttrain.algos.advantages import BNPOArgs, bnpo

    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    a = bnpo(r, 4, BNPOArgs(fixed_alpha=1.5, fixed_beta=1.5))
    p = torch.tensor([0.25] * 4 + [0.75] * 4)
    assert torch.allclose(a, math.pi / 8 * (r - p) / torch.sqrt(p * (1 - p)), atol=1e-6)
    with pytest.raises(ValueError):
        BNPOArgs(fixed_alpha=0.5)


def test_turn_ids_corridor_fraction_and_per_turn_sums():
    from posttrain.algos.entropy_terms import EPOArgs, epo_loss_term, per_turn_sums, turn_ids_from_env_mask

    env = torch.tensor([[1, 1, 0, 0, 1, 0, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])
    ids = turn_ids_from_env_mask(env)
    assert ids.tolist() == [[0, 0, 0, 0, 1, 1, 2, 2], [0] * 8]
    h = torch.tensor([[1.0, 1.0, 9.0, 9.0, 4.0, 9.0, 2.0, 2.0], [3.0] * 8])
    mask = env.float()
    sums, counts = per_turn_sums(h, mask, ids, 4)
    assert sums.tolist() == [4.0, 4.0, 2.0, 0.0] and counts.tolist() == [2.0, 1.0, 1.0, 0.0]
    # turn means 1, 4, 2 and 3; corridor [0, 2 * 1.5] holds 1, 2 and 3 of the four
    _, diag = epo_loss_term(h, mask, ids, h_bar=1.5, k=0, total_steps=2, args=EPOArgs())
    assert diag["corridor_fraction"].item() == pytest.approx(0.75)
    _, diag = epo_loss_term(h, mask, ids, h_bar=None, k=0, total_steps=2, args=EPOArgs())
    assert diag["corridor_fraction"].item() == 1.0
