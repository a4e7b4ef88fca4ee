import json

import pytest
import torch

from posttrain.models import (
    NAMED_MODELS,
    cache_dir,
    is_pulled,
    load_model,
    load_tokenizer,
    pull_model,
    resolve_model_path,
)
from posttrain.models.loading import _split_gguf


@pytest.fixture()
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_tiny_qwen2_builds_once_and_loads(tmp_cache):
    assert not is_pulled("tiny-qwen2")
    path = pull_model("tiny-qwen2")
    assert path == cache_dir() / "tiny-qwen2" and is_pulled("tiny-qwen2")
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert pull_model("tiny-qwen2") == path  # cached: not rebuilt
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
    model = load_model("tiny-qwen2")
    tok = load_tokenizer("tiny-qwen2")
    cfg = model.config
    # vLLM on CPU needs head_dim in {32, 64, 80, ...}
    assert cfg.head_dim >= 32 and cfg.head_dim in (32, 64, 80, 96, 112, 128)
    assert cfg.vocab_size == len(tok)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    ids = tok(text, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 4 or out[0, -1].item() == tok.eos_token_id


def test_tiny_build_is_deterministic(tmp_path):
    from posttrain.models.tiny import build_tiny_qwen2

    a = load_model(str(build_tiny_qwen2(tmp_path / "a")))
    b = load_model(str(build_tiny_qwen2(tmp_path / "b")))
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)


def test_marker_version_mismatch_triggers_rebuild(tmp_cache):
    path = pull_model("tiny-qwen2")
    (path / ".posttrain-ready.json").write_text(json.dumps({"version": "old"}))
    assert not is_pulled("tiny-qwen2")
    pull_model("tiny-qwen2")
    assert is_pulled("tiny-qwen2")


def test_unknown_named_model_suggests():
    with pytest.raises(KeyError, match="Did you mean 'tiny-qwen2'"):
        pull_model("tiny-qwen")


def test_other_names_pass_through(tmp_path):
    assert resolve_model_path("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert set(NAMED_MODELS) >= {"tiny-qwen2", "smollm2-135m-instruct"}


def test_gguf_path_is_split(tmp_path):
    f = tmp_path / "m.Q4.gguf"
    f.write_bytes(b"GGUF")
    assert _split_gguf(str(f), None) == (str(tmp_path), "m.Q4.gguf")
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        _split_gguf(str(tmp_path / "missing.gguf"), None)


def test_local_directory_loads(tmp_path):
    from posttrain.models.tiny import build_tiny_qwen2

    path = build_tiny_qwen2(tmp_path / "m")
    assert load_model(str(path)).config.model_type == "qwen2"


@pytest.mark.slow
def test_smollm2_gguf_converts_and_matches_direct_gguf_load(tmp_cache):
    """The cached safetensors copy gives the same logits as loading the GGUF file directly."""
    from posttrain.models.registry import SMOLLM2_GGUF, _smollm2_gguf_path

    path = pull_model("smollm2-135m-instruct")
    converted = load_model(str(path))
    direct = load_model(str(_smollm2_gguf_path().parent / SMOLLM2_GGUF))
    tok = load_tokenizer("smollm2-135m-instruct")
    ids = tok("What is 12 + 35?", return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(converted(**ids).logits, direct(**ids).logits, atol=1e-5)
    assert tok.chat_template and "im_start" in tok.chat_template
