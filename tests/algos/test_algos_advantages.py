"""GRPO (parity with TRL 1.16), BNPO and QAE advantages."""

from __future__ import annotations

import ast
import importlib.util
import math
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import pytest
import torch

from posttrain.algos.advantages import (
    BNPOArgs,
    GRPOArgs,
    QAEArgs,
    bnpo,
    bnpo_advantages,
    bnpo_beta_fit,
    bnpo_inverse_pdf,
    bnpo_range_problem,
    decomposed_advantages,
    grpo,
    nanstd,
    qae,
)

# ---------------------------------------------------------------------------------- TRL's own code
# TRL is not imported (that alone takes ~10 s): its source is read, and the two pieces we must match are
# executed as written there: `trl.trainer.utils.nanstd` and the advantage block of
# `GRPOTrainer._generate_and_score_completions` ("sum_then_normalize" branch).
_BLOCK_START = "mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)"
_BLOCK_END = "is_std_zero = torch.isclose(std_rewards"


def _trl_dir() -> Path:
    spec = importlib.util.find_spec("trl")
    if spec is None or spec.origin is None:
        pytest.skip("trl is not installed")
    return Path(spec.origin).parent


@pytest.fixture(scope="module")
def trl_nanstd() -> Callable[..., torch.Tensor]:
    src = (_trl_dir() / "trainer" / "utils.py").read_text()
    node = next(n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name == "nanstd")
    namespace: dict[str, Any] = {"torch": torch}
    exec(compile(ast.Module(body=[node], type_ignores=[]), "trl_nanstd", "exec"), namespace)
    return namespace["nanstd"]


@pytest.fixture(scope="module")
def trl_advantages(trl_nanstd: Callable[..., torch.Tensor]) -> Callable[[torch.Tensor, int, Any], torch.Tensor]:
    src = (_trl_dir() / "trainer" / "grpo_trainer.py").read_text()
    start = src.index(_BLOCK_START)
    start = src.rindex("\n", 0, start) + 1
    block = textwrap.dedent(src[start : src.index(_BLOCK_END, start)])
    assert "advantages = advantages / (std_rewards + 1e-4)" in block
    assert "advantages = torch.nan_to_num(advantages, nan=0.0)" in src
    code = compile(block, "trl_grpo_advantages", "exec")

    def run(rewards: torch.Tensor, num_generations: int, scale_rewards: Any) -> torch.Tensor:
        mode = {True: "group", False: "none"}.get(scale_rewards, scale_rewards)  # as GRPOConfig does
        namespace = {
            "torch": torch,
            "nanstd": trl_nanstd,
            "rewards": rewards.clone(),
            "num_generations": num_generations,
            "self": SimpleNamespace(scale_rewards=mode),
        }
        exec(code, namespace)
        return torch.nan_to_num(namespace["advantages"], nan=0.0)

    return run


def test_nanstd_is_trl_nanstd(trl_nanstd: Callable[..., torch.Tensor]) -> None:
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    x[1, 2] = float("nan")
    x[3] = float("nan")
    x[4, 1:] = float("nan")  # one value: NaN std
    assert torch.equal(nanstd(x, dim=1).isnan(), trl_nanstd(x, dim=1).isnan())
    assert torch.equal(torch.nan_to_num(nanstd(x, dim=1)), torch.nan_to_num(trl_nanstd(x, dim=1)))
    assert torch.equal(nanstd(x[0]), trl_nanstd(x[0]))


def _reward_batches() -> list[tuple[torch.Tensor, int]]:
    g = torch.Generator().manual_seed(0)
    mixed = torch.rand(24, generator=g)
    mixed[4:8] = 0.5  # uniform group
    mixed[9] = float("nan")  # unscorable completion
    mixed[12:16] = float("nan")  # unscorable group
    binary = (torch.rand(32, generator=g) > 0.6).float()
    wide = torch.randn(12, generator=g, dtype=torch.float64) * 3
    return [(mixed, 4), (binary, 8), (torch.rand(6, generator=g), 1), (torch.tensor([0.3]), 1), (binary, 32), (wide, 3)]


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none", True, False])
def test_grpo_matches_trl_bit_for_bit(trl_advantages: Callable[..., torch.Tensor], scale_rewards: Any) -> None:
    for rewards, group_size in _reward_batches():
        ours = grpo(rewards, group_size, GRPOArgs(scale_rewards=scale_rewards))
        theirs = trl_advantages(rewards, group_size, scale_rewards)
        assert torch.equal(ours, theirs), (scale_rewards, group_size)


def test_grpo_hand_computed() -> None:
    # group [1, 0, 0, 0]: mean 0.25; unbiased var = (0.75^2 + 3 * 0.25^2) / 3 = 0.25 -> std 0.5
    # A = (R - 0.25) / (0.5 + 1e-4); group [1, 1, 1, 1]: A = 0
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0], dtype=torch.float64) / 0.5001
    expected[4:] = 0
    # (TRL's Bessel factor count / (count - 1) is computed in float32 even for float64 rewards: 1e-7)
    torch.testing.assert_close(grpo(rewards, 4, GRPOArgs()), expected, rtol=0, atol=1e-7)
    # "none": Dr. GRPO, no std
    torch.testing.assert_close(grpo(rewards, 4, GRPOArgs(scale_rewards=False))[:4], expected[:4] * 0.5001)
    # "batch": batch std over all 8 values: mean 5/8, unbiased var = (5 * (3/8)^2 + 3 * (5/8)^2) / 7 = 15/56
    batch = grpo(rewards, 4, GRPOArgs(scale_rewards="batch"))
    torch.testing.assert_close(batch[0], torch.tensor(0.75 / (math.sqrt(15 / 56) + 1e-4), dtype=torch.float64))
    with pytest.raises(ValueError):
        GRPOArgs(scale_rewards="groups")


# ----------------------------------------------------------------------------------------------- BNPO
def test_bnpo_alpha_beta_one_is_group_mean_baseline() -> None:
    # group means [0, 0.5, 1]: m = 0.5, unbiased v = (0.25 + 0 + 0.25) / 2 = 0.25,
    # c = 0.25 / 0.25 - 1 = 0 -> a = b = 0 -> alpha = beta = 1: A = R - p (BetaPDF(.; 1, 1) = 1)
    rewards = torch.tensor([0.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    fit = bnpo_beta_fit(torch.tensor([0.0, 0.5, 1.0]))
    assert (fit.alpha, fit.beta) == (1.0, 1.0)
    assert torch.equal(bnpo(rewards, 2, BNPOArgs()), torch.tensor([0.0, 0.0, 0.5, -0.5, 0.0, 0.0]))
    # and directly, any rewards: REINFORCE with the group-mean baseline
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    torch.testing.assert_close(bnpo_advantages(r, 4, 1.0, 1.0, BNPOArgs()), r - torch.tensor([0.5] * 4 + [0.75] * 4))


def test_bnpo_alpha_beta_three_halves_is_grpo_with_population_std() -> None:
    # group means [0.25, 0.5, 0.75]: m = 0.5, unbiased v = 2 * 0.25^2 / 2 = 1/16, c = 0.25 * 16 - 1 = 3,
    # a = b = 1.5 -> alpha = beta = 1 + 1.5/3 = 1.5. BetaPDF(p; 1.5, 1.5) = sqrt(p(1-p)) / B(1.5, 1.5)
    # and B(1.5, 1.5) = Gamma(1.5)^2 / Gamma(3) = (sqrt(pi)/2)^2 / 2 = pi/8, so A = (pi/8)(R - p)/sqrt(p(1-p)).
    rewards = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0], dtype=torch.float64)
    fit = bnpo_beta_fit(torch.tensor([0.25, 0.5, 0.75]))
    assert fit.a == pytest.approx(1.5) and fit.b == pytest.approx(1.5)
    assert fit.alpha == pytest.approx(1.5) and fit.beta == pytest.approx(1.5)
    p = torch.tensor([0.25] * 4 + [0.5] * 4 + [0.75] * 4, dtype=torch.float64)
    expected = (math.pi / 8) * (rewards - p) / torch.sqrt(p * (1 - p))
    torch.testing.assert_close(bnpo(rewards, 4, BNPOArgs()), expected)
    # e.g. R = 1 in the p = 0.25 group: (pi/8) * 0.75 / sqrt(0.1875) = 0.68017...
    assert bnpo(rewards, 4, BNPOArgs())[0].item() == pytest.approx(0.680174, abs=1e-6)
    # up to the constant pi/8 this is GRPO with the population std sqrt(p(1-p)) of binary rewards
    pop = rewards.view(3, 4).std(dim=1, unbiased=False).repeat_interleave(4)
    torch.testing.assert_close(bnpo(rewards, 4, BNPOArgs()), (math.pi / 8) * (rewards - p) / pop)


def test_bnpo_zero_sum_and_uniform_groups() -> None:
    g = torch.Generator().manual_seed(3)
    rewards = torch.rand(16 * 8, generator=g, dtype=torch.float64)
    rewards[:8] = 1.0  # all correct
    rewards[8:16] = 0.0  # all wrong
    adv = bnpo(rewards, 8, BNPOArgs())
    assert torch.isfinite(adv).all()
    torch.testing.assert_close(adv.view(16, 8).sum(dim=1), torch.zeros(16, dtype=torch.float64), atol=1e-9, rtol=0)
    assert (adv[:16] == 0).all()
    assert adv[16:].abs().sum() > 0


def test_bnpo_method_of_moments_recovers_beta() -> None:
    torch.manual_seed(0)
    for a, b in [(2.0, 5.0), (0.7, 0.9), (4.0, 1.5)]:
        samples = torch.distributions.Beta(torch.tensor(a), torch.tensor(b)).sample((40_000,))
        fit = bnpo_beta_fit(samples)
        assert fit.a == pytest.approx(a, rel=0.06) and fit.b == pytest.approx(b, rel=0.06)
        assert fit.alpha == pytest.approx(max(1 + a / 3, 1), rel=0.02)


def test_bnpo_degenerate_batches() -> None:
    one = (1.0, 1.0)
    assert bnpo_beta_fit(torch.tensor([0.4]))[2:] == one  # one prompt
    assert bnpo_beta_fit(torch.tensor([0.5, 0.5, 0.5]))[2:] == one  # v = 0
    assert bnpo_beta_fit(torch.tensor([]))[2:] == one
    assert bnpo_beta_fit(torch.tensor([float("nan"), 0.5]))[2:] == one  # NaNs dropped -> one value
    # v > m(1 - m): c < 0, a, b < 0 -> clamped to 1
    assert bnpo_beta_fit(torch.tensor([0.0, 0.0, 1.0, 1.0]))[2:] == one
    for rewards in [torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.ones(8), torch.zeros(8)]:
        adv = bnpo(rewards, 4, BNPOArgs())
        assert torch.isfinite(adv).all()
    # one prompt: alpha = beta = 1, A = R - 0.75
    one_prompt = bnpo(torch.tensor([1.0, 0.0, 1.0, 1.0]), 4, BNPOArgs())
    torch.testing.assert_close(one_prompt, torch.tensor([0.25, -0.75, 0.25, 0.25]))
    # densities vanishing at the edges stay finite: 1/BetaPDF clamped to 1e6, 0 * 1e6 = 0
    inv = bnpo_inverse_pdf(torch.tensor([0.0, 1.0, 0.5]), 2.0, 3.0)
    assert inv[0] == 1e6 and inv[1] == 1e6 and torch.isfinite(inv).all()
    assert bnpo_inverse_pdf(torch.tensor([0.0, 1.0]), 1.0, 1.0).tolist() == [1.0, 1.0]


def test_bnpo_reward_range_and_decomposition() -> None:
    r01 = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0])
    # rewards in [-1, 1] mapped to [0, 1] give the same advantages as the 0/1 rewards
    pm1 = r01 * 2 - 1
    torch.testing.assert_close(bnpo(pm1, 4, BNPOArgs(reward_min=-1.0, reward_max=1.0)), bnpo(r01, 4, BNPOArgs()))
    # decomposition: mean over reward functions of each function's own BNPO advantage
    second = torch.tensor([0.0, 1, 1, 1, 0, 1, 0, 0, 1, 0, 0, 0])
    both = torch.stack([r01, second], dim=1)
    expected = (bnpo(r01, 4, BNPOArgs()) + bnpo(second, 4, BNPOArgs())) / 2
    torch.testing.assert_close(decomposed_advantages(bnpo, both, 4, BNPOArgs()), expected)
    with pytest.raises(ValueError):
        BNPOArgs(reward_min=1.0, reward_max=1.0)


def test_decomposition_applies_reward_weights_and_ignores_unscored_columns() -> None:
    r01 = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0])
    second = torch.tensor([0.0, 1, 1, 1, 0, 1, 0, 1])
    a1, a2 = bnpo(r01, 4, BNPOArgs()), bnpo(second, 4, BNPOArgs())
    both = torch.stack([r01, second], dim=1)
    weighted = decomposed_advantages(bnpo, both, 4, BNPOArgs(), torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(weighted, (3 * a1 + a2) / 4)
    # a function that returned None (NaN) for the first group: those rows take the other function's advantage
    holes = both.clone()
    holes[:4, 1] = float("nan")
    out = decomposed_advantages(bnpo, holes, 4, BNPOArgs())
    a2_second_group = bnpo(holes[:, 1].contiguous(), 4, BNPOArgs())
    torch.testing.assert_close(out[:4], a1[:4])  # not diluted by the missing column's 0
    torch.testing.assert_close(out[4:], (a1[4:] + a2_second_group[4:]) / 2)
    nothing = torch.full((4, 2), float("nan"))
    assert decomposed_advantages(bnpo, nothing, 4, BNPOArgs()).tolist() == [0.0] * 4


def test_bnpo_range_problem_warns_or_raises() -> None:
    in_range = torch.tensor([0.0, 1.0, 0.5, float("nan")])
    assert bnpo_range_problem(in_range, 4, BNPOArgs()) is None
    two = torch.tensor([0.0, 2.0, 1.0, 1.5])  # accuracy + format in [0, 2]
    message = bnpo_range_problem(two, 4, BNPOArgs())
    assert "rewards in [0, 2]" in message and "[reward_min, reward_max] = [0, 1]" in message
    assert bnpo_range_problem(two, 4, BNPOArgs(reward_max=2.0)) is None
    with pytest.raises(ValueError, match=r"rewards in \[-1, 1\]"):
        bnpo_range_problem(torch.tensor([-1.0, 1.0, 1.0, -1.0]), 4, BNPOArgs(out_of_range="raise"))
    with pytest.raises(ValueError, match="out_of_range"):
        BNPOArgs(out_of_range="ignore")


# ------------------------------------------------------------------------------------------------ QAE
def test_qae_two_regime_gate() -> None:
    # G = 10, K = 0.4: inverted-CDF quantile = sorted[ceil(0.4 * 10) - 1] = sorted[3].
    # 4 correct (p = 0.4 <= 1 - K): 6 zeros -> baseline 0 -> A = R (only successes pushed up)
    # 6 correct (p = 0.6 <= 0.6):   4 zeros -> sorted[3] = 0 -> A = R
    # 7 correct (p = 0.7 > 0.6):    3 zeros -> sorted[3] = 1 -> A = R - 1 (only failures pushed down)
    groups = [[1.0] * 4 + [0.0] * 6, [0.0] * 4 + [1.0] * 6, [1.0] * 7 + [0.0] * 3]
    rewards = torch.tensor(sum(groups, []))
    adv = qae(rewards, 10, QAEArgs(quantile=0.4)).view(3, 10)
    assert torch.equal(adv[0], torch.tensor(groups[0]))
    assert torch.equal(adv[1], torch.tensor(groups[1]))
    assert torch.equal(adv[2], torch.tensor(groups[2]) - 1.0)
    # K = 0.28, G = 25: 0.28 * 25 = 7.000000000000001 in floats; still the 7th order statistic (index 6)
    r = torch.arange(25.0)
    assert torch.equal(qae(r, 25, QAEArgs(quantile=0.28)), r - 6.0)


def test_qae_linear_matches_reference_torch_quantile_and_scaling() -> None:
    g = torch.Generator().manual_seed(5)
    rewards = torch.rand(24, generator=g, dtype=torch.float64)
    q = torch.quantile(rewards.view(3, 8), 0.4, dim=1, keepdim=True)
    torch.testing.assert_close(qae(rewards, 8, QAEArgs(interpolation="linear")).view(3, 8), rewards.view(3, 8) - q)
    scaled = qae(rewards, 8, QAEArgs(interpolation="linear", scale_by_std=True)).view(3, 8)
    std = rewards.view(3, 8).std(dim=1, keepdim=True)
    torch.testing.assert_close(scaled, (rewards.view(3, 8) - q) / (std + 1e-6))
    # linear differs from the inverted CDF when K (G - 1) is fractional: G = 8, 0.4 * 7 = 2.8
    binary = torch.tensor([0.0, 0, 0, 1, 1, 1, 1, 1])
    assert qae(binary, 8, QAEArgs(interpolation="linear"))[0].item() == pytest.approx(-0.8)  # baseline 0.2*0 + 0.8*1
    assert qae(binary, 8, QAEArgs())[0].item() == -1.0  # sorted[ceil(3.2) - 1] = sorted[3] = 1


def test_qae_degenerate() -> None:
    assert (qae(torch.ones(8), 4, QAEArgs()) == 0).all()
    nan_group = torch.tensor([float("nan")] * 4 + [1.0, float("nan"), 0.0, 0.0])
    adv = qae(nan_group, 4, QAEArgs())
    assert torch.isfinite(adv).all() and (adv[:4] == 0).all() and adv[5] == 0
    with pytest.raises(ValueError):
        QAEArgs(quantile=1.5)
