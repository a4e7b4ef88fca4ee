"""DPO-Shift: the loss, its rewards, the schedules of f, and the invariants of ALGORITHMS.md."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from posttrain.algos.preference import SHIFT_SCHEDULES, ShiftArgs, dpo_shift_loss, shift_schedule


def _logps(seed: int = 0, b: int = 6) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(b, generator=g, dtype=torch.float64) * 40 + 5) for _ in range(4)]


def _trl_sigmoid_loss(pc, pr, rc, rr, beta):
    """TRL 1.16's DPOTrainer._compute_loss, loss_type "sigmoid", f_divergence_type "reverse_kl", op for op."""
    chosen_logratios = pc - rc
    rejected_logratios = pr - rr
    delta_score = chosen_logratios - rejected_logratios
    loss = 0.0
    loss += (-F.logsigmoid(beta * delta_score)).mean() * 1.0
    return loss, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def test_hand_computed_values() -> None:
    # r_w = -1 - (-2) = 1, r_l = -3 - (-1) = -2; beta 0.5, f 0.75: z = 0.5 (1 + 1.5) = 1.25
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-1.0, -3.0, -2.0, -1.0))
    losses, cr, rj = dpo_shift_loss(pc, pr, rc, rr, beta=0.5, f=0.75)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-1.25)), abs=1e-6)  # -log sigmoid(1.25) = 0.2519
    assert cr.item() == pytest.approx(0.5) and rj.item() == pytest.approx(-1.0)
    smoothed = dpo_shift_loss(pc, pr, rc, rr, beta=0.5, f=0.75, label_smoothing=0.1)[0]
    # conservative DPO: 0.9 * softplus(-1.25) + 0.1 * softplus(1.25) = 0.9 * 0.251929 + 0.1 * 1.501929
    assert smoothed.item() == pytest.approx(0.9 * 0.251929 + 0.1 * 1.501929, abs=1e-5)


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_f_one_is_trls_dpo_bit_for_bit(beta: float) -> None:
    ours = [t.clone().float().requires_grad_() for t in _logps(1)]
    theirs = [t.clone().float().requires_grad_() for t in _logps(1)]
    losses, cr, rj = dpo_shift_loss(*ours, beta=beta, f=1.0)
    loss = losses.mean()
    ref_loss, ref_cr, ref_rj = _trl_sigmoid_loss(*theirs, beta)
    assert torch.equal(loss, ref_loss) and torch.equal(cr, ref_cr) and torch.equal(rj, ref_rj)
    loss.backward()
    ref_loss.backward()
    for a, b in zip(ours, theirs):
        assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("f", [1.0, 0.95, 0.75, 0.3])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_gradient_ratio_is_minus_f(f: float, label_smoothing: float) -> None:
    pc, pr, rc, rr = (t.requires_grad_() for t in _logps(2))
    dpo_shift_loss(pc, pr, rc, rr, beta=0.3, f=f, label_smoothing=label_smoothing)[0].sum().backward()
    torch.testing.assert_close(pr.grad, -f * pc.grad, rtol=1e-12, atol=0)
    if label_smoothing == 0:
        assert (pc.grad < 0).all() and (pr.grad > 0).all()  # up for the chosen, down for the rejected
    # the reference enters with the opposite sign of the policy
    torch.testing.assert_close(rc.grad, -pc.grad)
    torch.testing.assert_close(rr.grad, -pr.grad)


def test_label_smoothing_is_conservative_dpo() -> None:
    pc, pr, rc, rr = _logps(3)
    for eps in (0.0, 0.1, 0.3):
        z = 0.2 * ((pc - rc) - 0.8 * (pr - rr))
        expected = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
        torch.testing.assert_close(dpo_shift_loss(pc, pr, rc, rr, 0.2, 0.8, eps)[0], expected)


def test_rewards_do_not_depend_on_f() -> None:
    logps = _logps(4)
    base = dpo_shift_loss(*logps, beta=0.1, f=1.0)
    for f in (0.95, 0.75, 0.5):
        out = dpo_shift_loss(*logps, beta=0.1, f=f)
        assert torch.equal(out[1], base[1]) and torch.equal(out[2], base[2])
        assert not torch.equal(out[0], base[0])
        assert not out[1].requires_grad and not out[2].requires_grad


def test_shapes_are_checked() -> None:
    a, b, c, d = _logps(5)
    with pytest.raises(ValueError, match="four \\[B\\] tensors"):
        dpo_shift_loss(a, b[:3], c, d, 0.1, 0.9)
    with pytest.raises(ValueError, match="four \\[B\\] tensors"):
        dpo_shift_loss(a[None], b[None], c[None], d[None], 0.1, 0.9)


def test_f_below_one_keeps_the_chosen_more_likely_when_gradients_align() -> None:
    """ALGORITHMS.md: f < 1 raises the chosen log-prob after one step relative to DPO on a toy batch where the
    chosen and rejected gradients align. Toy policy: independent softmaxes per position, Theta [T, V]; the chosen
    and rejected responses share their first two tokens (their gradients align there) and differ in the last."""
    g = torch.Generator().manual_seed(0)
    theta0 = torch.randn(3, 7, generator=g, dtype=torch.float64)
    chosen, rejected = torch.tensor([1, 4, 2]), torch.tensor([1, 4, 5])

    def logp(theta: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return theta.log_softmax(-1).gather(-1, y[:, None]).sum().reshape(1)

    grad_w = torch.func.grad(lambda t: logp(t, chosen).sum())(theta0)
    grad_l = torch.func.grad(lambda t: logp(t, rejected).sum())(theta0)
    assert (grad_w * grad_l).sum() > 0  # aligned

    def chosen_after_one_step(f: float) -> float:
        theta = theta0.clone().requires_grad_()
        ref_w, ref_l = logp(theta0, chosen), logp(theta0, rejected)
        dpo_shift_loss(logp(theta, chosen), logp(theta, rejected), ref_w, ref_l, beta=1.0, f=f)[0].sum().backward()
        with torch.no_grad():
            return logp(theta - 0.5 * theta.grad, chosen).item()

    dpo, shift_95, shift_75 = chosen_after_one_step(1.0), chosen_after_one_step(0.95), chosen_after_one_step(0.75)
    assert shift_75 > shift_95 > dpo


# --------------------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("name", SHIFT_SCHEDULES.names())
def test_every_schedule_stays_in_its_range(name: str) -> None:
    args = ShiftArgs(f=0.9, f_min=0.6, f_max=0.95)
    for t in range(11):
        f = SHIFT_SCHEDULES.get(name)(t, 10, args)
        assert math.isfinite(f) and args.f_min - 1e-12 <= f <= args.f_max + 1e-12


@pytest.mark.parametrize("kind, first, middle, last", [
    ("fixed", 0.95, 0.95, 0.95),
    ("linear_increase", 0.75, 0.875, 0.75 + 0.25 * 9 / 10),  # f_min + (f_max - f_min) t / T, T = 10
    ("linear_decrease", 1.0, 0.875, 1.0 - 0.25 * 9 / 10),
])
def test_schedules_at_the_first_middle_and_last_step(kind: str, first: float, middle: float, last: float) -> None:
    assert shift_schedule(kind, 0, 10) == pytest.approx(first, abs=1e-12)
    assert shift_schedule(kind, 5, 10) == pytest.approx(middle, abs=1e-12)
    assert shift_schedule(kind, 9, 10) == pytest.approx(last, abs=1e-12)


def test_schedule_arguments_are_validated() -> None:
    assert shift_schedule("linear_increase", 2, 4, f_min=0.5, f_max=0.9) == pytest.approx(0.7)
    assert shift_schedule("fixed", 3, 4, f=0.8) == 0.8
    with pytest.raises(KeyError, match="did you mean 'linear_increase'"):
        shift_schedule("linear_increas", 0, 4)
    with pytest.raises(ValueError, match="0 <= step <= total_steps"):
        shift_schedule("fixed", 5, 4)
    with pytest.raises(ValueError, match="f: must be in \\(0, 1\\]"):
        shift_schedule("fixed", 0, 4, f=0.0)
    with pytest.raises(ValueError, match="f_min: must be <= f_max"):
        ShiftArgs(f_min=0.9, f_max=0.8)
