"""One generation engine for training, best-of-n and evaluation. Backends: `hf` (transformers generate),
`vllm` (an in-process vLLM engine, or a client of a running `vllm serve`). vLLM is imported only when a
vLLM engine is built."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from posttrain.rollout.base import Completion, GenerationOutput, RolloutEngine, SamplingParams
from posttrain.rollout.hf import HFEngine

if TYPE_CHECKING:
    from posttrain.rollout.vllm import VLLMEngine, VLLMServerEngine

__all__ = ["Completion", "GenerationOutput", "HFEngine", "RolloutEngine", "SamplingParams", "VLLMEngine",
           "VLLMServerEngine", "make_engine"]

# TRL's vllm_* option names (recipe `rollout.vllm:` keys) -> the engine's
_ALIASES = {"max_model_length": "max_model_len", "server_base_url": "base_url"}


def make_engine(kind: str, model: Any, tokenizer: Any = None, **options: Any) -> RolloutEngine:
    """A rollout engine of backend `kind`.

    hf: `model` is a loaded model (or a name/path, loaded here); options go to HFEngine (batch_size, ...).
    vllm: `model` is a model directory or name, or a loaded model (its weights are pushed once); options go
    to VLLMEngine (dtype, max_model_len, enable_lora, max_lora_rank, gpu_memory_utilization, ...). With
    `mode="server"` it is a VLLMServerEngine for `base_url` (or `server_host`/`server_port`) instead
    (`full_weight_sync=True` when it will take full weights: its server is checked when the engine starts).
    """
    options = {_ALIASES.get(k, k): v for k, v in options.items()}
    if kind == "hf":
        if isinstance(model, str):
            from posttrain.models import load_model, load_tokenizer

            tokenizer = tokenizer or load_tokenizer(model)
            model = load_model(model, options.pop("dtype", "auto"))
        return HFEngine(model, tokenizer, **options)
    if kind == "vllm":
        from posttrain.rollout.vllm import VLLMEngine, VLLMServerEngine

        mode = options.pop("mode", "colocate")
        if mode == "server":
            host, port = options.pop("server_host", "127.0.0.1"), options.pop("server_port", 8000)
            base_url = options.pop("base_url", None) or f"http://{host}:{port}"
            for ignored in ("dtype", "seed", "enable_lora", "max_lora_rank", "max_model_len"):
                options.pop(ignored, None)  # the server was started with its own
            if isinstance(model, str):
                options.setdefault("expected_model", model)  # the servers must serve it (or model_name says which)
            return VLLMServerEngine(base_url, tokenizer, **options)
        if mode != "colocate":
            raise ValueError(f"vllm mode must be 'colocate' or 'server', got {mode!r}")
        return VLLMEngine(model, tokenizer, **options)
    raise ValueError(f"unknown rollout engine {kind!r}; expected 'hf' or 'vllm'")


def __getattr__(name: str) -> Any:
    if name in ("VLLMEngine", "VLLMServerEngine", "TRLGeneration"):
        from posttrain.rollout import vllm

        return getattr(vllm, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
