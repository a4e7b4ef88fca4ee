"""Tiny random models built offline, so every recipe runs on CPU in seconds without any download.

`tiny-qwen2` is a 2-layer Qwen2 (hidden 128, 4 heads of head_dim 32, so vLLM can load it too) with a
byte-level BPE tokenizer trained on the spot and a ChatML chat template. The weights are random: the
model is for exercising code paths, not for measuring learning.
"""

from __future__ import annotations

import json
from pathlib import Path

TINY_VERSION = "1"  # bump when the builder changes, so cached copies are rebuilt

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _corpus() -> list[str]:
    """A small, fixed training corpus: arithmetic prompts, answers, and common words of math problems."""
    words = (
        "What is the final answer Put in boxed Let us compute step sum total how many each more less "
        "than of a an and or if then so therefore we have are is was were has had will would can could "
        "number numbers apples dollars cost price per day days week hours minutes times half twice "
        "system user assistant You are helpful Solve following problem Answer question"
    ).split()
    lines = [f"What is {a} + {b}? Put the final answer in \\boxed{{{a + b}}}."
             for a in range(0, 40) for b in range(0, 40, 3)]
    lines += [" ".join(words[i : i + 7]) for i in range(0, len(words), 3)]
    lines += ["\\frac{1}{2} \\sqrt{2} x^2 + y = 3.5, -7 * 8 / 4 = (1, 2] #### 42"]
    return lines


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=640,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_qwen2(path: str | Path, seed: int = 0) -> Path:
    """Build and save the tiny Qwen2 model and tokenizer to `path`; returns the path."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    tokenizer = build_tiny_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        dtype="float32",
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "posttrain_model.json").write_text(json.dumps({"builder": "tiny-qwen2", "version": TINY_VERSION}))
    return path
