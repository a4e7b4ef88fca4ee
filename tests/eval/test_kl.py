"""KL from the base model: exact full-vocabulary token KL, and an adapter compared with itself disabled."""

from __future__ import annotations

import pytest
import torch

from posttrain.eval.kl import BaseKL, token_kl
from posttrain.rollout import HFEngine, SamplingParams


def test_token_kl_matches_definition():
    torch.manual_seed(0)
    p, q = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    manual = (p.softmax(-1) * (p.log_softmax(-1) - q.log_softmax(-1))).sum(-1)
    assert torch.allclose(token_kl(p, q), manual, atol=1e-6)
    assert torch.allclose(token_kl(p, p), torch.zeros(2, 3), atol=1e-6)


@pytest.fixture(scope="module")
def tiny():
    from posttrain.models import load_model, load_tokenizer

    return load_model("tiny-qwen2"), load_tokenizer("tiny-qwen2")


def test_adapter_kl_is_zero_at_init_and_positive_after_a_change(tiny):
    from peft import get_peft_model

    from posttrain.models import lora_config

    model, tokenizer = tiny
    peft_model = get_peft_model(model, lora_config(r=4, alpha=8))
    engine = HFEngine(peft_model, tokenizer, progress=False)
    outputs = engine.generate(["What is 1 + 2?", "Hello there"], SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=0))
    kl = BaseKL(peft_model)
    zero = kl(outputs)
    assert [len(x) for x in zero] == [2, 2]
    assert all(n == len(c.token_ids) and abs(s) < 1e-6 for row, o in zip(zero, outputs)
               for (s, n), c in zip(row, o.completions))  # LoRA B starts at 0: the adapter changes nothing
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    moved = kl(outputs)
    assert all(s > 0 for row in moved for s, _ in row)
    # the same numbers with an explicit base model (the adapter disabled is the base)
    with peft_model.disable_adapter():
        import copy

        base = copy.deepcopy(peft_model.get_base_model())
    # deepcopy of the base still holds LoRA layers; disable them by scaling B to zero in the copy
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "lora_B" in name:
                p.zero_()
    explicit = BaseKL(peft_model, base_model=base)(outputs)
    for a, b in zip(moved, explicit):
        for (sa, na), (sb, nb) in zip(a, b):
            assert na == nb and sa == pytest.approx(sb, rel=1e-4, abs=1e-6)
    peft_model.unload()


def test_kl_needs_a_base():
    with pytest.raises(ValueError, match="needs base_model, or a PEFT model"):
        BaseKL(torch.nn.Linear(2, 2))


def test_chunked_kl_of_kept_positions_equals_the_full_right_padded_computation(tiny):
    """Left padding + logits_to_keep + chunked KL give what the full [B, L, V] computation gives."""
    from peft import get_peft_model

    from posttrain.eval.kl import token_kl_chunked
    from posttrain.models import load_model, lora_config

    model, tokenizer = load_model("tiny-qwen2"), tiny[1]
    peft_model = get_peft_model(model, lora_config(r=4, alpha=8))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    engine = HFEngine(peft_model, tokenizer, progress=False)
    outputs = engine.generate(["What is 1 + 2?", "Hello there, how many apples", "x"],
                              SamplingParams(n=2, temperature=1.0, max_new_tokens=7, seed=3))
    ours = BaseKL(peft_model, batch_size=4)(outputs)
    for o, row in zip(outputs, ours):
        for c, (s, n) in zip(o.completions, row):
            ids = torch.tensor([o.prompt_token_ids + c.token_ids])
            with torch.no_grad():
                z = peft_model(input_ids=ids).logits[0, len(o.prompt_token_ids) - 1 : -1]
                with peft_model.disable_adapter():
                    q = peft_model(input_ids=ids).logits[0, len(o.prompt_token_ids) - 1 : -1]
            assert n == len(c.token_ids)
            assert s == pytest.approx(token_kl(z, q).sum().item(), rel=1e-4, abs=1e-6)
    x, y = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    torch.testing.assert_close(token_kl_chunked(x, y, chunk=3), token_kl(x, y))
