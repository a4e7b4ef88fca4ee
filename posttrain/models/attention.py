"""Grouped-query attention without copying the key/value heads, for decoding with a padding mask.

transformers' `sdpa` attention hands grouped-query heads to `scaled_dot_product_attention(enable_gqa=True)` only
without an attention mask (the CUDA kernels fall back to the math kernel with one); with a mask it first copies
every key and value head `num_key_value_groups` times (`repeat_kv`). Batched decoding of left-padded rows always
has a mask, so each decoding step copied the whole cache once per layer: with SmolLM2-135M (9 query heads, 3
key/value heads) at 16 rows and 400 cached tokens, a layer's attention took 1.45 ms with the copy and 0.35 ms
without, the same values to the bit (torch 2.13, 2 CPU cores).

`grouped_query_attention(model)` switches the model to `posttrain_sdpa` for a block and back: transformers' own
`sdpa` attention, except that on the CPU a masked grouped-query call goes to `enable_gqa=True`. It is registered
through transformers' AttentionInterface (with sdpa's mask function), so nothing of transformers is patched and
other models in the process keep their attention.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

NAME = "posttrain_sdpa"


def _sdpa_gqa_forward(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention; a masked grouped-query call on the CPU runs with enable_gqa=True instead of
    repeating the key/value heads (the CPU kernels take a mask together with grouped heads)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if (attention_mask is None or groups == 1 or query.device.type != "cpu" or kwargs.get("position_bias") is not None
            or kwargs.get("cache") is not None or kwargs.get("output_attentions", False)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    # with a mask, sdpa_attention_forward runs non-causal and lets the mask carry causality: the same here
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           dropout_p=dropout, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, _sdpa_gqa_forward)
        AttentionMaskInterface.register(NAME, sdpa_mask)


@contextmanager
def grouped_query_attention(model: Any) -> Iterator[None]:
    """Run the block with `posttrain_sdpa` attention where the model uses transformers' sdpa with grouped-query
    heads (no-op otherwise: eager, flash and flex attention, or as many key/value heads as query heads); the
    model's attention implementation is restored afterwards, also on an error."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa" or not heads or kv_heads >= heads:
        yield
        return
    _register()
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"
