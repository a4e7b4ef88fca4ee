"""STEER: Omega, the exponential and linear weights, and the invariants of ALGORITHMS.md."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.algos.token_weights import STEERArgs, TokenContext, steer, steer_omega, steer_weights


def _clipped_token_loss(adv: torch.Tensor, ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """TRL's clipped token loss, token-mean."""
    per_token = -torch.min(ratio * adv, ratio.clamp(0.8, 1.28) * adv)
    return (per_token * mask).sum() / mask.sum()


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    adv = torch.randn(6, generator=g)
    logp = -torch.rand(6, 9, generator=g) * 4
    ratio = torch.exp(0.2 * torch.randn(6, 9, generator=g))
    entropy_old = torch.rand(6, 9, generator=g) * 3
    mask = (torch.rand(6, 9, generator=g) > 0.2).float()
    return adv, ratio, logp, entropy_old, mask


def test_omega_hand_computed() -> None:
    # A = 1, r = 1, p = 0.5, H_old = 1: Omega = 1 * 1 * (1 - 0.5) * (ln 0.5 + 1) = 0.5 * 0.306853 = 0.153426
    # A = -2, r = 1.5, p = 0.1, H_old = 0.5: Omega = -2 * 1.5 * 0.9 * (ln 0.1 + 0.5) = -2.7 * -1.802585 = 4.866980
    adv = torch.tensor([1.0, -2.0])
    omega = steer_omega(
        adv,
        torch.tensor([[1.0], [1.5]]),
        torch.tensor([[math.log(0.5)], [math.log(0.1)]]),
        torch.tensor([[1.0], [0.5]]),
        torch.ones(2, 1),
    )
    torch.testing.assert_close(omega, torch.tensor([[0.153426], [4.866980]]), atol=1e-5, rtol=0)


def test_omega_clamps_p_and_zeroes_non_finite_and_padding() -> None:
    # p = 1 -> clamped to 1 - 1e-8 (finite, tiny); logp = -inf -> p = 1e-8, log p = -18.42 (finite);
    # H_old = inf -> non-finite -> 0; padding -> 0
    logp = torch.tensor([[0.0, -math.inf, -1.0, -1.0]])
    entropy = torch.tensor([[1.0, 1.0, math.inf, 1.0]])
    omega = steer_omega(torch.tensor([1.0]), torch.ones(1, 4), logp, entropy, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    assert torch.isfinite(omega).all()
    assert omega[0, 0].abs() < 1e-6  # (1 - p) ~ 1e-8 in float32
    assert omega[0, 1].item() == pytest.approx(1 * (1 - 1e-8) * (math.log(1e-8) + 1.0), rel=1e-5)
    assert omega[0, 2] == 0 and omega[0, 3] == 0


def test_lambda_min_one_gives_base_loss_exactly() -> None:
    adv, ratio, logp, entropy_old, mask = _batch()
    ctx = TokenContext(mask=mask, logp=logp, ratio=ratio, entropy_old=entropy_old)
    weighted = steer(adv, ctx, STEERArgs(lambda_min=1.0))
    base = adv.unsqueeze(-1).expand_as(mask) * mask
    assert torch.equal(weighted, base)
    assert torch.equal(_clipped_token_loss(weighted, ratio, mask), _clipped_token_loss(base, ratio, mask))


def test_zero_advantages_give_unit_weights() -> None:
    _, ratio, logp, entropy_old, mask = _batch()
    omega = steer_omega(torch.zeros(6), ratio, logp, entropy_old, mask)
    weights = steer_weights(omega, mask, STEERArgs())
    assert torch.equal(weights, mask)  # 1 on valid tokens, 0 on padding


def test_weights_range_max_token_and_monotone() -> None:
    args = STEERArgs(lambda_min=0.8)
    adv, ratio, logp, entropy_old, mask = _batch(seed=1)
    omega = steer_omega(adv * 5, ratio, logp, entropy_old, mask)
    weights = steer_weights(omega, mask, args)
    valid = mask.bool()
    assert (weights[~valid] == 0).all()
    assert (weights[valid] >= 0.8).all() and (weights[valid] <= 1.0).all()
    mag = omega.abs()[valid]
    assert mag.max() >= 0.02
    assert weights[valid][mag == mag.max()].eq(0.8).all()  # exactly lambda_min
    order = torch.argsort(mag)
    assert (torch.diff(weights[valid][order]) <= 0).all()  # non-increasing in |Omega|
    assert not weights.requires_grad


@pytest.mark.parametrize("lambda_min", [0.5, 0.7, 0.8, 0.9, 0.95])
def test_max_token_gets_exactly_lambda_min(lambda_min: float) -> None:
    # exp(-k M) = lambda_min only up to rounding, which can land an ulp above lambda_min; must be exact
    for seed in range(250):
        mag = torch.rand(1, 20, generator=torch.Generator().manual_seed(seed)) * 3
        w = steer_weights(mag, torch.ones(1, 20), STEERArgs(lambda_min=lambda_min))
        assert w[0, mag.argmax()].item() == torch.tensor(lambda_min).item()


def test_weights_hand_computed_exponential_and_floor() -> None:
    # |Omega| = [0.1, 0.05, 0]: M = 0.1, k = -ln 0.8 / 0.1, lambda = 0.8^(|Omega|/0.1) = [0.8, sqrt(0.8), 1]
    omega = torch.tensor([[0.1, -0.05, 0.0]])
    w = steer_weights(omega, torch.ones(1, 3), STEERArgs())
    torch.testing.assert_close(w, torch.tensor([[0.8, math.sqrt(0.8), 1.0]]))
    # M = 0.01 < 0.02: k = -ln 0.8 / 0.02, the max token gets 0.8^(0.01/0.02) = sqrt(0.8), not 0.8
    w_small = steer_weights(torch.tensor([[0.01, 0.0]]), torch.ones(1, 2), STEERArgs())
    torch.testing.assert_close(w_small, torch.tensor([[math.sqrt(0.8), 1.0]]))
    # global max 0.2 instead of the micro-batch max 0.1: 0.8^(0.1/0.2) = sqrt(0.8)
    w_global = steer_weights(omega, torch.ones(1, 3), STEERArgs(), global_max=0.2)
    torch.testing.assert_close(w_global[0, 0], torch.tensor(math.sqrt(0.8)))


def test_weights_linear_form() -> None:
    # m = 0, M = 1: lambda = 1 - |Omega| * (1 - 0.8) = [1, 0.9, 0.8]; padding 0
    args = STEERArgs(form="linear")
    w = steer_weights(torch.tensor([[0.0, -0.5, 1.0, 7.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]]), args)
    torch.testing.assert_close(w, torch.tensor([[1.0, 0.9, 0.8, 0.0]]))
    # all |Omega| equal -> (lambda_min + lambda_max) / 2
    w_eq = steer_weights(torch.tensor([[0.3, -0.3]]), torch.ones(1, 2), STEERArgs(form="linear", lambda_max=0.95))
    torch.testing.assert_close(w_eq, torch.tensor([[0.875, 0.875]]))
    # empty mask: nothing, finite
    assert torch.equal(steer_weights(torch.ones(1, 2), torch.zeros(1, 2), args), torch.zeros(1, 2))


def test_global_scope_needs_the_gathered_max() -> None:
    adv, ratio, logp, entropy_old, mask = _batch()
    ctx = TokenContext(mask=mask, logp=logp, ratio=ratio, entropy_old=entropy_old)
    with pytest.raises(ValueError, match="reduce_max"):
        steer(adv, ctx, STEERArgs(max_scope="global"))
    seen = []
    ctx.reduce_max = lambda local: seen.append(local) or torch.tensor(1e9)  # another process has a huge |Omega|
    out = steer(adv, ctx, STEERArgs(max_scope="global"))
    torch.testing.assert_close(out, adv.unsqueeze(-1) * mask, atol=1e-6, rtol=1e-6)  # every local weight -> ~1
    omega = steer_omega(adv, ratio, logp, entropy_old, mask)
    assert len(seen) == 1 and seen[0].item() == pytest.approx(omega.abs().max().item())
    ctx.reduce_max = lambda local: local  # one process: the local max, the same as micro_batch scope
    torch.testing.assert_close(steer(adv, ctx, STEERArgs(max_scope="global")), steer(adv, ctx, STEERArgs()))


def test_args_validation() -> None:
    for bad in [dict(lambda_min=0.0), dict(lambda_min=0.9, lambda_max=0.8), dict(form="cubic"), dict(max_scope="x")]:
        with pytest.raises(ValueError):
            STEERArgs(**bad)


@pytest.mark.parametrize(
    "logits, token, adv",
    [
        ([2.0, 0.0], 0, 1.0),  # reinforce the likely token: log p + H > 0 -> Omega > 0 -> entropy falls
        ([2.0, 0.0], 1, 1.0),  # reinforce the unlikely token: Omega < 0 -> entropy rises
        ([2.0, 0.0], 0, -1.0),
        ([2.0, 0.0], 1, -0.5),
        ([-0.3, 0.4], 0, 2.0),
        ([0.0, 1.5], 1, -1.0),
    ],
)
def test_two_token_softmax_entropy_change_sign(logits: list[float], token: int, adv: float) -> None:
    # On a 2-token softmax, a small gradient step on A * log p(token) changes H by
    # -2 eta A p (1 - p)(log p + H): sign(dH) = -sign(Omega), Omega = A * 1 * (1 - p)(log p + H).
    z = torch.tensor(logits, dtype=torch.float64, requires_grad=True)

    def entropy(x: torch.Tensor) -> torch.Tensor:
        return -(torch.softmax(x, -1) * torch.log_softmax(x, -1)).sum()

    log_p = torch.log_softmax(z, -1)[token]
    h_before = entropy(z).detach()
    omega = steer_omega(
        torch.tensor([adv], dtype=torch.float64),
        torch.ones(1, 1, dtype=torch.float64),
        log_p.detach().view(1, 1),
        h_before.view(1, 1),
        torch.ones(1, 1),
    ).item()
    (grad,) = torch.autograd.grad(adv * log_p, z)
    with torch.no_grad():
        h_after = entropy(z + 1e-3 * grad)  # ascent on A log p = descent on the policy loss
    assert abs(omega) > 1e-6
    assert math.copysign(1.0, (h_after - h_before).item()) == -math.copysign(1.0, omega)
