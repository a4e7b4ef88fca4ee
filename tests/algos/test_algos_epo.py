"""EPO: beta schedule, corridor penalty, the loss term with turns, and the cross-step state."""

from __future__ import annotations

import json
import math

import pytest
import torch

from posttrain.algos.entropy_terms import EPOArgs, epo_band_penalty, epo_beta, epo_loss_term
from posttrain.algos.state import EPOState

# Two trajectories. traj 0: turns [0, 0, 1] with H = [1, 3, 2] -> turn means [2, 2] -> 2
#                   traj 1: turn 0 with H = [4], then padding   -> 4
# H_traj = (2 + 4) / 2 = 3
ENTROPY = [[1.0, 3.0, 2.0], [4.0, 9.0, 9.0]]
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
TURNS = torch.tensor([[0, 0, 1], [0, 5, 5]])  # ids on padding are ignored


def _h() -> torch.Tensor:
    return torch.tensor(ENTROPY, dtype=torch.float64, requires_grad=True)


def test_beta_schedule() -> None:
    assert epo_beta(0, 100, 3.0) == 2.0
    # k = k_mid = 50: 1 + exp(-3)
    assert epo_beta(50, 100, 3.0) == pytest.approx(1 + math.exp(-3))
    betas = [epo_beta(k, 101, 3.0) for k in range(0, 102)]
    assert all(b1 > b2 for b1, b2 in zip(betas, betas[1:]))  # strictly decreasing
    assert all(1.0 < b <= 2.0 for b in betas)
    assert epo_beta(3, 1, 3.0) == pytest.approx(1 + math.exp(-9))  # one-step run: k_mid = 1
    with pytest.raises(ValueError):
        epo_beta(-1, 10, 3.0)


def test_trajectory_turn_averaging_hand_computed() -> None:
    args = EPOArgs(lam=0.5, alpha=0.0)  # alpha = 0: plain entropy bonus -lambda * H_traj
    term, diag = epo_loss_term(_h(), MASK, TURNS, h_bar=1.0, k=0, total_steps=10, args=args)
    assert term.item() == pytest.approx(-0.5 * 3.0)
    assert diag["entropy_traj"].item() == pytest.approx(3.0)
    # per-turn: turn 0 = mean(2, 4) = 3 over both trajectories, turn 1 = 2 (traj 0 only)
    assert diag["turn_entropy/0"].item() == pytest.approx(3.0)
    assert diag["turn_entropy/1"].item() == pytest.approx(2.0)
    assert "turn_entropy/5" not in diag
    # no turns: token-mean per trajectory: traj 0 = 2, traj 1 = 4 -> 3 as well here
    single, _ = epo_loss_term(_h(), MASK, None, h_bar=None, k=0, total_steps=10, args=args)
    assert single.item() == pytest.approx(-1.5)


def test_smoothing_penalty_hand_computed() -> None:
    # Hbar = 1, corridor [0, 2]: turn means 2, 2 (traj 0) -> P = 0; traj 1 turn mean 4 -> P = 4 - 2 = 2
    # L_smooth = alpha * mean_traj(mean_turn P) = 0.05 * (0 + 2) / 2 = 0.05; beta_0 = 2
    # term = -lambda (H_traj - beta L_smooth) = -0.1 * (3 - 2 * 0.05) = -0.29
    args = EPOArgs(lam=0.1)
    term, diag = epo_loss_term(_h(), MASK, TURNS, h_bar=1.0, k=0, total_steps=10, args=args)
    assert diag["smooth_penalty"].item() == pytest.approx(0.05)
    assert term.item() == pytest.approx(-0.29)
    # token level: P(H) per token: traj 0 [0, 1, 0] -> turn means [0.5, 0] -> 0.25; traj 1 [2] -> 2
    # L_smooth = 0.05 * (0.25 + 2) / 2 = 0.05625
    _, diag_tok = epo_loss_term(_h(), MASK, TURNS, 1.0, 0, 10, EPOArgs(lam=0.1, penalty_level="token"))
    assert diag_tok["smooth_penalty"].item() == pytest.approx(0.05625)


def test_lambda_zero_gives_no_term() -> None:
    h = _h()
    term, _ = epo_loss_term(h, MASK, TURNS, h_bar=1.0, k=0, total_steps=10, args=EPOArgs(lam=0.0))
    assert term.item() == 0.0
    term.backward()
    assert (h.grad == 0).all()


def test_first_step_has_no_penalty() -> None:
    # no earlier step -> Hbar undefined -> P = 0, only the bonus
    term, diag = epo_loss_term(_h(), MASK, TURNS, h_bar=None, k=0, total_steps=10, args=EPOArgs(lam=0.1))
    assert term.item() == pytest.approx(-0.3) and diag["smooth_penalty"].item() == 0.0
    assert "h_bar" not in diag


def test_penalty_zero_gradient_inside_corridor() -> None:
    args = EPOArgs(kappa_l=0.5, kappa_r=2.0)
    h = torch.tensor([0.2, 0.6, 1.0, 1.9, 2.5], requires_grad=True)  # corridor [0.5, 2] for Hbar = 1
    penalty = epo_band_penalty(h, 1.0, args)
    penalty.sum().backward()
    assert penalty.tolist() == pytest.approx([0.3, 0.0, 0.0, 0.0, 0.5])
    assert h.grad.tolist() == [-1.0, 0.0, 0.0, 0.0, 1.0]
    # in the loss term: with every turn inside the corridor the gradient equals the plain bonus's
    inside = torch.tensor([[1.0, 1.2, 1.5]], requires_grad=True)
    plain = torch.tensor([[1.0, 1.2, 1.5]], requires_grad=True)
    epo_loss_term(inside, torch.ones(1, 3), None, 1.0, 0, 10, EPOArgs(lam=0.1))[0].backward()
    epo_loss_term(plain, torch.ones(1, 3), None, 1.0, 0, 10, EPOArgs(lam=0.1, alpha=0.0))[0].backward()
    assert torch.equal(inside.grad, plain.grad)


def test_descent_on_negative_entropy_raises_entropy() -> None:
    # toy softmax policy over 6 tokens at 4 positions; one SGD step on the EPO term raises entropy
    z = torch.tensor([[3.0, 0.5, 0.1, -1.0, -2.0, 0.0]] * 4, requires_grad=True)

    def entropy(x: torch.Tensor) -> torch.Tensor:
        return -(torch.softmax(x, -1) * torch.log_softmax(x, -1)).sum(-1).unsqueeze(0)  # [1, 4]

    h0 = entropy(z).mean().item()
    term, _ = epo_loss_term(entropy(z), torch.ones(1, 4), None, None, 0, 10, EPOArgs(lam=0.5))
    term.backward()
    with torch.no_grad():
        z -= 1.0 * z.grad
    assert entropy(z).mean().item() > h0


def test_empty_mask_is_finite() -> None:
    h = _h()
    term, diag = epo_loss_term(h, torch.zeros(2, 3), TURNS, 1.0, 3, 10, EPOArgs())
    assert term.item() == 0.0
    term.backward()
    assert torch.isfinite(h.grad).all()
    assert all(torch.isfinite(v) for v in diag.values())


def test_negative_turn_ids_rejected() -> None:
    with pytest.raises(ValueError):
        epo_loss_term(_h(), MASK, torch.tensor([[0, -1, 0], [0, 0, 0]]), None, 0, 10, EPOArgs())


def test_state_round_trip() -> None:
    state = EPOState()
    assert state.h_bar is None and state.step == 0
    state.update(1.0)
    state.update(3.0)
    state.update(float("inf"))  # advances k, stays out of the history
    assert state.h_bar == 2.0 and state.step == 3
    restored = EPOState()
    restored.load_state_dict(json.loads(json.dumps(state.state_dict())))
    assert restored.h_bar == 2.0 and restored.step == 3
    restored.update(5.0)
    assert restored.h_bar == 3.0 and restored.step == 4


def test_args_validation() -> None:
    with pytest.raises(ValueError):
        EPOArgs(penalty_level="trajectory")
    with pytest.raises(ValueError):
        EPOArgs(kappa_l=3.0, kappa_r=2.0)
