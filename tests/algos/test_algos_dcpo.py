"""DCPO: temperature controller, alpha, rho, per-token advantages, tempered log-probs, state."""

from __future__ import annotations

import json
import math

import pytest
import torch

from posttrain.algos.state import DCPOState
from posttrain.algos.token_weights import (
    DCPOArgs,
    TokenContext,
    dcpo,
    dcpo_advantages,
    dcpo_alpha,
    dcpo_entropy_signal,
    dcpo_rho,
    dcpo_temperature,
    sampled_token_logprobs,
)


def _entropy(z: torch.Tensor) -> torch.Tensor:
    return -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)


def test_temperature_controller() -> None:
    args = DCPOArgs()  # H0 = 0.25, T_high = 1.2, T_low = 0.8
    assert dcpo_temperature(0.0, args) == 1.2  # initial state H_prev = 0: flatten first
    assert dcpo_temperature(0.25, args) == 1.2  # H_prev <= H0
    assert dcpo_temperature(0.26, args) == 0.8
    assert DCPOState().h_prev == 0.0


def test_alpha_hand_computed_and_bounds() -> None:
    args = DCPOArgs()
    # |0.25 - 0| = 0.25 capped at 0.1; p_hat = 0.5: alpha~ = 0.2, alpha = 0.2 / 1.2 = 1/6
    assert dcpo_alpha(0.0, 0.5, args) == pytest.approx(1 / 6)
    # |0.25 - 0.3| = 0.05 < cap; p_hat = 0.25: alpha~ = 0.2, alpha = 1/6
    assert dcpo_alpha(0.3, 0.25, args) == pytest.approx(1 / 6)
    assert dcpo_alpha(0.25, 0.5, args) == 0.0  # H_prev = H0: plain GRPO
    assert dcpo_alpha(0.0, 0.0, args) == 0.0  # no correct sample: no NaN, no reshaping
    assert dcpo_alpha(float("nan"), 0.5, args) == 0.0
    for h_prev in [0.0, 5.0, 100.0]:
        for p_hat in [1.0, 1 / 64, 1 / 4096, 1e-7]:
            assert 0.0 <= dcpo_alpha(h_prev, p_hat, args) < 1.0


def test_sampled_token_logprobs_matches_log_softmax_and_chunks() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 11, (3, 5), generator=g)
    for temperature in [1.0, 0.7, 1.3]:
        ref = torch.log_softmax(logits / temperature, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(sampled_token_logprobs(logits, ids, temperature), ref)
        chunked = sampled_token_logprobs(logits, ids, temperature, chunk_rows=4)
        torch.testing.assert_close(chunked, ref)
    half = sampled_token_logprobs(logits.to(torch.bfloat16), ids)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    with pytest.raises(ValueError):
        sampled_token_logprobs(logits, ids, 0.0)


def test_rho_is_one_at_temperature_one() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 7, generator=g)
    ids = torch.randint(0, 7, (2, 4), generator=g)
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 1]])
    rho = dcpo_rho(sampled_token_logprobs(logits, ids, 1.0), sampled_token_logprobs(logits, ids), mask)
    assert torch.equal(rho, mask)  # exactly 1 on valid tokens, 0 on padding


def test_argmax_token_rho_at_most_one_for_t_above_one() -> None:
    # softmax(z/T)[argmax] <= softmax(z)[argmax] for T > 1 (flattening lowers the mode), >= for T < 1
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(8, 16, 50, generator=g) * 3
    ids = logits.argmax(-1)
    base = sampled_token_logprobs(logits, ids)
    for temperature in [1.2, 2.0]:
        assert (dcpo_rho(sampled_token_logprobs(logits, ids, temperature), base) <= 1.0).all()
    assert (dcpo_rho(sampled_token_logprobs(logits, ids, 0.8), base) >= 1.0).all()


def test_rho_non_finite_is_one() -> None:
    rho = dcpo_rho(torch.tensor([[0.0, -math.inf]]), torch.tensor([[-math.inf, -math.inf]]))
    assert rho.tolist() == [[1.0, 1.0]]


@pytest.mark.parametrize("temperature, rises", [(1.2, True), (1.5, True), (0.8, False), (0.5, False)])
def test_expected_rho_weighted_reinforce_step_moves_entropy(temperature: float, rises: bool) -> None:
    # E_{o ~ pi}[rho(o) grad log pi(o)] = sum_o pi^T(o) grad log pi(o); w.r.t. logits this is pi^T - pi:
    # the step moves pi towards pi^T, flatter for T > 1 (entropy up), sharper for T < 1 (entropy down).
    z = torch.tensor([1.5, 0.3, -0.2, -1.0, 0.8], dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        pi = torch.softmax(z, -1)
        rho = torch.softmax(z / temperature, -1) / pi
    objective = (pi * rho * torch.log_softmax(z, -1)).sum()  # exact expectation over the 5 tokens
    (grad,) = torch.autograd.grad(objective, z)
    torch.testing.assert_close(grad, torch.softmax(z / temperature, -1).detach() - pi)
    h0 = _entropy(z.detach())
    h1 = _entropy(z.detach() + 0.05 * grad)
    assert (h1 > h0) if rises else (h1 < h0)


def test_dcpo_advantages_hand_computed() -> None:
    # A' = (1 - alpha) A + alpha y rho, alpha = 0.25:
    # seq 0: A = 1, y = 1, rho = [2, 0.5]: [0.75 + 0.5, 0.75 + 0.125] = [1.25, 0.875]
    # seq 1: A = -1, y = 0: [-0.75, -0.75]; with the mask the padded one is 0
    out = dcpo_advantages(
        torch.tensor([1.0, -1.0]),
        torch.tensor([1.0, 0.0]),
        torch.tensor([[2.0, 0.5], [3.0, 1.0]]),
        0.25,
        torch.tensor([[1.0, 1.0], [1.0, 0.0]]),
    )
    assert out.tolist() == [[1.25, 0.875], [-0.75, 0.0]]
    # alpha = 0: plain GRPO advantages
    base = dcpo_advantages(torch.tensor([1.0, -1.0]), torch.tensor([1.0, 0.0]), torch.rand(2, 2), 0.0)
    assert base.tolist() == [[1.0, 1.0], [-1.0, -1.0]]


def test_dcpo_registry_entry() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 3, 9, generator=g)
    ids = torch.randint(0, 9, (4, 3), generator=g)
    mask = torch.ones(4, 3)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    old_logp = sampled_token_logprobs(logits, ids)
    old_logp_t = sampled_token_logprobs(logits, ids, dcpo_temperature(0.0, DCPOArgs()))
    other = sampled_token_logprobs(logits, ids, 0.8)
    ctx = TokenContext(mask=mask, tempered_old_logps={1.0: old_logp, 1.2: old_logp_t, 0.8: other},
                       correct=torch.tensor([1.0, 0, 1, 0]))
    out = dcpo(adv, ctx, DCPOArgs())
    alpha = dcpo_alpha(0.0, 0.5, DCPOArgs())  # h_prev defaults to 0; local p_hat = 2/4
    y = torch.tensor([1.0, 0, 1, 0]).unsqueeze(-1)
    expected = (1 - alpha) * adv.unsqueeze(-1) + alpha * y * (old_logp_t - old_logp).exp()
    torch.testing.assert_close(out, expected)
    # H_prev = H0 -> GRPO exactly; no correct sample -> GRPO exactly (no NaN)
    ctx.h_prev = 0.25
    assert torch.equal(dcpo(adv, ctx, DCPOArgs()), adv.unsqueeze(-1).expand(4, 3))
    ctx.h_prev, ctx.correct = 0.0, torch.zeros(4)
    assert torch.equal(dcpo(adv, ctx, DCPOArgs()), adv.unsqueeze(-1).expand(4, 3))
    # H_prev above H0: the T_low log-probs are the ones read
    ctx.h_prev, ctx.correct, ctx.p_hat = 5.0, torch.tensor([1.0, 0, 1, 0]), 0.5
    alpha = dcpo_alpha(5.0, 0.5, DCPOArgs())
    torch.testing.assert_close(dcpo(adv, ctx, DCPOArgs()), (1 - alpha) * adv.unsqueeze(-1) + alpha * y * (other - old_logp).exp())
    # a temperature that was not computed is an error, not a silent fallback to the current policy
    ctx.tempered_old_logps = {1.0: old_logp, 1.2: old_logp_t}
    with pytest.raises(ValueError, match=r"tempered_old_logps at \[0.8\]"):
        dcpo(adv, ctx, DCPOArgs())


def test_dcpo_rho_is_one_at_temperature_one_and_declared_needs() -> None:
    from posttrain.algos import TOKEN_WEIGHTS
    from posttrain.algos.token_weights import dcpo_temperatures

    entry = TOKEN_WEIGHTS.entry("dcpo")
    assert entry.needs == {"tempered_old_logps", "correct"} and entry.state is DCPOState
    assert dcpo_temperatures(DCPOArgs(t_high=1.5, t_low=0.5)) == (1.0, 1.5, 0.5)
    lp = torch.randn(2, 3)
    assert torch.equal(dcpo_rho(lp, lp), torch.ones(2, 3))


def test_dcpo_state_round_trip() -> None:
    state = DCPOState()
    state.update(0.4)
    state.update(float("nan"))  # ignored, keeps 0.4
    blob = json.dumps(state.state_dict())
    restored = DCPOState()
    restored.load_state_dict(json.loads(blob))
    assert restored.h_prev == 0.4 and restored.step == 2
    assert restored.state_dict() == state.state_dict()


def test_entropy_signal() -> None:
    # nll: valid -log p = [1, 2, 3] -> sum 6 over 3 tokens (H_prev = 2); entropy: [0.5, 0.5, 2] -> 3 / 3
    logp = torch.tensor([[-1.0, -2.0], [-3.0, -50.0]])
    entropy = torch.tensor([[0.5, 0.5], [2.0, float("nan")]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    total, count = dcpo_entropy_signal(logp, mask, DCPOArgs())
    assert (total.item(), count.item()) == (6.0, 3.0)
    total, count = dcpo_entropy_signal(logp, mask, DCPOArgs(entropy_signal="entropy"), entropy)
    assert (total.item(), count.item()) == (3.0, 3.0)
    with pytest.raises(ValueError):
        dcpo_entropy_signal(logp, mask, DCPOArgs(entropy_signal="entropy"))
    with pytest.raises(ValueError):
        DCPOArgs(entropy_signal="kl")
