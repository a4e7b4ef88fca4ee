"""Registry API, and every registered function of every kind on ordinary and degenerate inputs."""

from __future__ import annotations

import pytest
import torch

from posttrain.algos import ADVANTAGES, ENTROPY_TERMS, TOKEN_WEIGHTS, Registry
from posttrain.algos.context import EntropyContext, TokenContext


def _default_args(registry: Registry, name: str) -> object:
    cls = registry.args_class(name)
    return None if cls is None else cls()


# ------------------------------------------------------------------------------------------------ API
def test_registry_api() -> None:
    reg: Registry = Registry("demo")

    @reg.register("alpha_method", args=dict)
    def f(x: int) -> int:
        return x + 1

    assert reg.get("alpha_method") is f and reg.get("alpha_method")(1) == 2
    assert reg.names() == ["alpha_method"] and "alpha_method" in reg and len(reg) == 1
    assert reg.args_class("alpha_method") is dict
    with pytest.raises(KeyError, match="did you mean 'alpha_method'"):
        reg.get("alpha_methd")
    with pytest.raises(KeyError, match="unknown demo 'zzz'"):
        reg.get("zzz")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("alpha_method")(lambda x: x)
    with pytest.raises(ValueError):
        reg.register(" padded ")


def test_expected_names_are_registered() -> None:
    assert {"grpo", "bnpo", "qae"} <= set(ADVANTAGES.names())
    assert {"none", "steer", "dcpo", "clip_cov"} <= set(TOKEN_WEIGHTS.names())
    assert {"none", "epo"} <= set(ENTROPY_TERMS.names())
    # TRL's loss_type="bnpo" is a normaliser; ours is the advantage. One name per method everywhere.
    assert ADVANTAGES.get("bnpo").__module__ == "posttrain.algos.advantages"


# ---------------------------------------------------------------------------------------- advantages
ADV_CASES = {
    # 3 prompts x 4 completions, mixed
    "mixed": torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5]),
    "all_equal": torch.full((8,), 0.7),
    "all_zero": torch.zeros(8),
    "one_prompt": torch.tensor([1.0, 0.0, 1.0, 1.0]),
    "nan_rows": torch.tensor([1.0, float("nan"), 0.0, 1.0, float("nan")] + [float("nan")] * 3),
}


@pytest.mark.parametrize("case", list(ADV_CASES))
@pytest.mark.parametrize("name", ADVANTAGES.names())
def test_every_advantage(name: str, case: str) -> None:
    rewards = ADV_CASES[case]
    fn = ADVANTAGES.get(name)
    out = fn(rewards, 4, _default_args(ADVANTAGES, name))
    assert out.shape == rewards.shape and out.dtype == rewards.dtype
    assert torch.isfinite(out).all()
    assert (out[torch.isnan(rewards)] == 0).all()  # unscorable completions carry no signal
    if case in ("all_equal", "all_zero"):
        assert (out == 0).all()
    with pytest.raises(ValueError):
        fn(rewards[:-1], 4, _default_args(ADVANTAGES, name))  # B not a multiple of G


# ------------------------------------------------------------------------------------- token weights
def _token_ctx(b: int, t: int, degenerate: bool, empty: bool) -> tuple[torch.Tensor, TokenContext]:
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(b, t)
    mask[0, t - 2 :] = 0
    mask[1, t - 1 :] = 0
    if empty:
        mask.zero_()
    logp = -torch.rand(b, t, generator=g) * 3
    old_logp = logp + 0.1 * torch.randn(b, t, generator=g)
    adv = torch.zeros(b) if degenerate else torch.randn(b, generator=g)
    rewards = torch.zeros(b) if degenerate else (torch.rand(b, generator=g) > 0.5).float()
    ctx = TokenContext(
        mask=mask,
        logp=logp.requires_grad_(),
        ratio=(logp - old_logp).exp(),
        entropy=torch.rand(b, t, generator=g) * 2,
        entropy_old=torch.rand(b, t, generator=g) * 2,
        tempered_old_logps={1.0: old_logp, 1.2: old_logp * 0.9, 0.8: old_logp * 1.1},
        rewards=rewards,
        correct=rewards > 0.5,
        p_hat=None,
        h_prev=0.0,
        reduce_max=lambda x: x,
    )
    return adv, ctx


@pytest.mark.parametrize("case", ["ordinary", "degenerate", "empty_mask"])
@pytest.mark.parametrize("name", TOKEN_WEIGHTS.names())
def test_every_token_weight(name: str, case: str) -> None:
    torch.manual_seed(0)
    adv, ctx = _token_ctx(4, 6, degenerate=case == "degenerate", empty=case == "empty_mask")
    out = TOKEN_WEIGHTS.get(name)(adv, ctx, _default_args(TOKEN_WEIGHTS, name))
    assert out.shape == (4, 6)
    assert torch.isfinite(out).all()
    assert (out[ctx.mask == 0] == 0).all()  # padding gets nothing
    assert not out.requires_grad  # weights/advantages are detached
    if case == "degenerate":
        assert (out == 0).all()  # A = 0 and no correct sample (DCPO's y = 0): nothing to learn
    # per-token advantages [B, T] in are accepted as well as [B]
    out2 = TOKEN_WEIGHTS.get(name)(adv.unsqueeze(-1).expand(4, 6), ctx, _default_args(TOKEN_WEIGHTS, name))
    assert out2.shape == (4, 6) and torch.isfinite(out2).all()


@pytest.mark.parametrize("name", [n for n in TOKEN_WEIGHTS.names() if n != "none"])
def test_token_weight_reports_missing_inputs(name: str) -> None:
    ctx = TokenContext(mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="needs TokenContext fields"):
        TOKEN_WEIGHTS.get(name)(torch.ones(2), ctx, _default_args(TOKEN_WEIGHTS, name))


# ------------------------------------------------------------------------------------- entropy terms
@pytest.mark.parametrize("case", ["ordinary", "turns", "empty_mask", "first_step"])
@pytest.mark.parametrize("name", ENTROPY_TERMS.names())
def test_every_entropy_term(name: str, case: str) -> None:
    g = torch.Generator().manual_seed(1)
    entropy = (torch.rand(3, 5, generator=g) * 2).requires_grad_()
    mask = torch.ones(3, 5)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    if case == "empty_mask":
        mask.zero_()
    turns = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 2, 2], [0, 0, 0, 0, 0]]) if case == "turns" else None
    ctx = EntropyContext(
        mask=mask, turn_ids=turns, h_bar=None if case == "first_step" else 0.3, step=3, total_steps=10
    )
    term, diagnostics = ENTROPY_TERMS.get(name)(entropy, ctx, _default_args(ENTROPY_TERMS, name))
    assert term.dim() == 0 and torch.isfinite(term)
    assert all(torch.isfinite(v).all() and not v.requires_grad for v in diagnostics.values())
    term.backward()
    assert entropy.grad is not None and torch.isfinite(entropy.grad).all()
    assert (entropy.grad[mask == 0] == 0).all()  # padding never gets a gradient


@pytest.mark.parametrize("registry", [ADVANTAGES, TOKEN_WEIGHTS, ENTROPY_TERMS], ids=lambda r: r.kind)
def test_every_entry_builds_its_args_from_the_trainer_config(registry: Registry) -> None:
    """What the entropy-control trainer does for any component: args from EntropyControlConfig's defaults, through
    the entry's declared mapping, equal the argument dataclass's own defaults (one set of defaults)."""
    import dataclasses

    from posttrain.trainers.grpo import EntropyControlConfig

    config = EntropyControlConfig(output_dir="/tmp/unused", use_cpu=True, bf16=False, report_to=[])
    for name in registry.names():
        entry = registry.entry(name)
        args = entry.build_args(config)
        assert (args is None) == (entry.args is None), name
        if args is None:
            continue
        assert set(entry.config) <= {f.name for f in dataclasses.fields(entry.args)}, name
        if name != "clip_cov":  # Clip-Cov reads the trainer's clip range, not defaults of its own
            assert args == entry.args(), name


def test_declared_needs_are_context_fields() -> None:
    import dataclasses

    fields = {f.name for f in dataclasses.fields(TokenContext)}
    for name in TOKEN_WEIGHTS.names():
        assert TOKEN_WEIGHTS.entry(name).needs <= fields, name
    assert TOKEN_WEIGHTS.entry("none").noop and ENTROPY_TERMS.entry("none").noop
    assert not TOKEN_WEIGHTS.entry("steer").noop and TOKEN_WEIGHTS.entry("steer").needs == {"entropy_old"}


def test_registered_diagnostics_bnpo_fit_and_none_elsewhere():
    """Trainers log a component's quantities through its registered diagnostics (no branching on names)."""
    import torch

    from posttrain.algos import ADVANTAGES
    from posttrain.algos.advantages import BNPOArgs, bnpo_beta_fit

    rewards = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0])  # group means 1/4, 1/2, 3/4
    diag = ADVANTAGES.diagnostics("bnpo")(rewards, 4, BNPOArgs())
    fit = bnpo_beta_fit(torch.tensor([0.25, 0.5, 0.75]))
    assert diag == {"alpha": pytest.approx(fit.alpha), "beta": pytest.approx(fit.beta)}
    assert ADVANTAGES.diagnostics("bnpo")(rewards, 4, BNPOArgs(fixed_alpha=1.5, fixed_beta=2.0)) == {"alpha": 1.5, "beta": 2.0}
    assert ADVANTAGES.diagnostics("grpo") is None and ADVANTAGES.diagnostics("qae") is None
    with pytest.raises(KeyError, match="bnpo"):
        ADVANTAGES.diagnostics("bnp")
