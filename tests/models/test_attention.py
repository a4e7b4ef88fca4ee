"""posttrain_sdpa (grouped-query attention without copying the key/value heads) and the HF engine's slack cache."""

import pytest
import torch
from transformers import DynamicCache, DynamicLayer, Qwen2Config, Qwen2ForCausalLM

from posttrain.models.attention import NAME, grouped_query_attention
from posttrain.rollout.hf import _slack_cache, _SlackLayer


def _model(kv_heads: int = 2, attn: str = "sdpa") -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128)
    config._attn_implementation = attn
    return Qwen2ForCausalLM(config).eval()


def _decode(model: Qwen2ForCausalLM, steps: int = 5) -> torch.Tensor:
    """Greedy-decode a left-padded batch with a cache; the logits of the prefill and every step, stacked."""
    ids = torch.tensor([[0, 0, 0, 5, 6, 7], [0, 11, 12, 13, 14, 15], [21, 22, 23, 24, 25, 26]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1], [1] * 6])
    cache, out = DynamicCache(), []
    with torch.no_grad():
        for _ in range(steps):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                           use_cache=True).logits[:, -1]
            out.append(logits)
            ids = logits.argmax(-1, keepdim=True)
            mask = torch.cat([mask, mask.new_ones(3, 1)], dim=1)
    return torch.stack(out)


def test_masked_grouped_query_decoding_equals_transformers_sdpa():
    model = _model()
    reference = _decode(model)
    with grouped_query_attention(model):
        assert model.config._attn_implementation == NAME
        ours = _decode(model)
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    # and both equal eager attention, which repeats the heads and applies the mask by hand
    eager = _model(attn="eager")
    torch.testing.assert_close(_decode(eager), reference, atol=1e-5, rtol=1e-5)


def test_the_grouped_path_does_not_repeat_the_key_value_heads(monkeypatch):
    import transformers.integrations.sdpa_attention as sdpa

    calls = []
    real = sdpa.repeat_kv
    monkeypatch.setattr(sdpa, "repeat_kv", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = _model()
    _decode(model, steps=2)
    assert calls, "transformers' sdpa was expected to repeat the heads under a padding mask"
    calls.clear()
    with grouped_query_attention(model):
        _decode(model, steps=2)
    assert not calls


def test_attention_is_restored_after_an_error():
    model = _model()
    with pytest.raises(RuntimeError, match="boom"), grouped_query_attention(model):
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("kv_heads, attn", [(4, "sdpa"), (2, "eager")])
def test_no_op_without_grouped_heads_or_sdpa(kv_heads, attn):
    model = _model(kv_heads, attn)
    with grouped_query_attention(model):
        assert model.config._attn_implementation == attn


def _kv(rows: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 2, length, 8, generator=g), torch.randn(rows, 2, length, 8, generator=g)


def test_slack_layer_equals_dynamic_layer_through_growth_and_reassignment():
    ours, ref = _SlackLayer(), DynamicLayer()
    returned = []

    def update(rows: int, length: int, seed: int) -> None:
        k, v = _kv(rows, length, seed)
        a, b = ours.update(k, v), ref.update(k, v)
        returned.append((a[0].clone(), a[0]))
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
        assert ours.get_seq_length() == ref.get_seq_length()

    update(3, 5, 0)  # prefill
    for step in range(_SlackLayer.SLACK + 3):  # past the first buffer's capacity
        update(3, 1, 1 + step)
    # the continuous decoder drops finished rows and leading padding by reassigning keys/values
    for layer in (ours, ref):
        layer.keys, layer.values = layer.keys[[0, 2], :, 2:], layer.values[[0, 2], :, 2:]
    update(2, 1, 100)
    # ... and appends new rows, left-padded
    for layer in (ours, ref):
        layer.keys = torch.cat([layer.keys, torch.zeros_like(layer.keys[:1])])
        layer.values = torch.cat([layer.values, torch.zeros_like(layer.values[:1])])
    for step in range(3):
        update(3, 1, 200 + step)
    # tensors handed out earlier were not overwritten by later steps
    for snapshot, handed_out in returned:
        assert torch.equal(snapshot, handed_out)


def test_slack_cache_decodes_like_a_dynamic_cache():
    model = _model()
    ids = torch.tensor([[0, 0, 5, 6, 7], [9, 10, 11, 12, 13]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1] * 5])
    logits = {}
    for name, cache in (("dynamic", DynamicCache()), ("slack", _slack_cache())):
        x, m, out = ids, mask, []
        with torch.no_grad():
            for _ in range(_SlackLayer.SLACK + 4):
                positions = (m.cumsum(-1) - 1)[:, -x.shape[1]:]
                step = model(input_ids=x, attention_mask=m, position_ids=positions, past_key_values=cache).logits[:, -1]
                out.append(step)
                x, m = step.argmax(-1, keepdim=True), torch.cat([m, m.new_ones(2, 1)], dim=1)
        logits[name] = torch.stack(out)
        if name == "slack":
            assert all(isinstance(layer, _SlackLayer) for layer in cache.layers)
    assert torch.equal(logits["slack"], logits["dynamic"])
