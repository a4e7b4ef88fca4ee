"""Clip-Cov / KL-Cov covariance token selection (reference: PRIME-RL/Entropy-Mechanism-of-RL)."""

from __future__ import annotations

import torch

from posttrain.algos.context import TokenContext
from posttrain.algos.token_weights import (
    ClipCovArgs,
    clip_cov,
    clip_cov_mask,
    covariance_scores,
    kl_cov_mask,
    kl_cov_penalty,
    ppo_clipped,
)

# A = [1, -1] per sequence, log p = [[-1, -2], [-3, -4]], all valid:
# mean A = 0, mean log p = -2.5 -> cov = [[1 * 1.5, 1 * 0.5], [-1 * -0.5, -1 * -1.5]] = [[1.5, 0.5], [0.5, 1.5]]
ADV = torch.tensor([1.0, -1.0])
LOGP = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]])
FULL = torch.ones(2, 2)


def test_covariance_scores_hand_computed() -> None:
    assert covariance_scores(ADV, LOGP, FULL).tolist() == [[1.5, 0.5], [0.5, 1.5]]
    # padding: means over valid tokens only (mean A = 1/3, mean log p = -2), padding -> 0
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    cov = covariance_scores(ADV, LOGP, mask)
    torch.testing.assert_close(cov, torch.tensor([[(2 / 3) * 1.0, 0.0], [(-4 / 3) * -1.0, 0.0]]))


def test_clip_cov_drops_band_tokens() -> None:
    # band (1, 5): eligible = the two 1.5 tokens. n_valid = 4:
    # clip_ratio 0.0002 -> max(int(0.0008), 1) = 1 token dropped; 0.5 -> 2 dropped
    seeded = torch.Generator().manual_seed(0)
    one = clip_cov_mask(ADV, LOGP, FULL, clip_ratio=2e-4, cov_lb=1.0, cov_ub=5.0, generator=seeded)
    assert one.sum() == 3 and one[0, 1] == 1 and one[1, 0] == 1
    two = clip_cov_mask(ADV, LOGP, FULL, clip_ratio=0.5)
    assert two.tolist() == [[0.0, 1.0], [1.0, 0.0]]
    # band excludes its edges and everything outside: (1.5, 5) -> nothing eligible
    assert torch.equal(clip_cov_mask(ADV, LOGP, FULL, clip_ratio=0.5, cov_lb=1.5), FULL)
    # tokens PPO already clips are never chosen
    exclude = torch.tensor([[True, False], [False, False]])
    assert clip_cov_mask(ADV, LOGP, FULL, clip_ratio=0.5, exclude=exclude).tolist() == [[1.0, 1.0], [1.0, 0.0]]


def test_clip_cov_random_choice_is_seedable_and_padding_safe() -> None:
    g = torch.Generator().manual_seed(0)
    adv = torch.randn(8, generator=g) * 3
    logp = -torch.rand(8, 32, generator=g) * 6
    mask = (torch.rand(8, 32, generator=g) > 0.3).float()
    a = clip_cov_mask(adv, logp, mask, clip_ratio=0.05, cov_lb=0.5, generator=torch.Generator().manual_seed(7))
    b = clip_cov_mask(adv, logp, mask, clip_ratio=0.05, cov_lb=0.5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert (a[mask == 0] == 0).all()  # padding never kept nor chosen
    dropped = (mask == 1) & (a == 0)
    assert dropped.sum() == max(int(0.05 * mask.sum().item()), 1)
    cov = covariance_scores(adv, logp, mask)
    assert ((cov[dropped] > 0.5) & (cov[dropped] < 5.0)).all()
    empty = clip_cov_mask(adv, logp, torch.zeros(8, 32))
    assert torch.equal(empty, torch.zeros(8, 32))


def test_ppo_clipped() -> None:
    # A > 0, r = 1.5 > 1.2: the clipped branch is the min -> clipped; A > 0, r = 0.5: unclipped branch is the min
    # A < 0, r = 0.5 < 0.8: clipped branch active; A < 0, r = 1.5: not
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    ratio = torch.tensor([[1.5, 0.5, 0.5, 1.5]]).T
    assert ppo_clipped(adv, ratio, 0.2, 0.2).squeeze(1).tolist() == [True, False, True, False]


def test_clip_cov_registry_entry() -> None:
    ctx = TokenContext(mask=FULL, logp=LOGP, ratio=torch.ones(2, 2))
    torch.manual_seed(0)
    out = clip_cov(ADV, ctx, ClipCovArgs(clip_ratio=0.5))
    assert out.tolist() == [[0.0, 1.0], [-1.0, -0.0]]  # A * keep: the two 1.5-covariance tokens dropped


def test_kl_cov_top_k_and_penalty() -> None:
    # cov = [[1.5, 0.5], [0.5, 1.5]] plus a third, larger one: A = [2, -1]
    # mean A = 0.5, mean log p = -2.5: cov = [[1.5 * 1.5, 1.5 * 0.5], [-1.5 * -0.5, -1.5 * -1.5]]
    #        = [[2.25, 0.75], [0.75, 2.25]]; ratio 0.25 -> k = 1: one of the 2.25 ones (ties: topk picks one)
    sel = kl_cov_mask(torch.tensor([2.0, -1.0]), LOGP, FULL, kl_cov_ratio=0.25)
    assert sel.sum() == 1 and (sel[0, 0] or sel[1, 1])
    sel2 = kl_cov_mask(torch.tensor([2.0, -1.0]), LOGP, FULL, kl_cov_ratio=0.5)
    assert sel2.tolist() == [[True, False], [False, True]]
    assert not kl_cov_mask(ADV, LOGP, torch.zeros(2, 2)).any()
    # penalty = coef |log p - log p_old| on selected tokens: 2 * |-1 - -1.5| = 1.0
    pen = kl_cov_penalty(LOGP, LOGP - 0.5, sel2, coef=2.0)
    assert pen.tolist() == [[1.0, 0.0], [0.0, 1.0]]
