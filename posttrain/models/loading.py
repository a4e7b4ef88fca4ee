"""Model and tokenizer loading: a named model, a Hub id, a local directory, or a GGUF file."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from posttrain.models.registry import resolve_model_path

if TYPE_CHECKING:
    from peft import LoraConfig
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def _split_gguf(name_or_path: str, gguf_file: str | None) -> tuple[str, str | None]:
    """A path to a .gguf file is loaded as (its folder, gguf_file=its name)."""
    if gguf_file is None and name_or_path.endswith(".gguf"):
        path = Path(name_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {name_or_path}")
        return str(path.parent), path.name
    return name_or_path, gguf_file


def resolve_dtype(dtype: str) -> Any:
    """`auto` is float32 on CPU and bfloat16 on a GPU that supports it (else float16)."""
    import torch

    if dtype == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_tokenizer(name_or_path: str, gguf_file: str | None = None, revision: str | None = None,
                   trust_remote_code: bool = False) -> "PreTrainedTokenizerBase":
    from transformers import AutoTokenizer

    path, gguf_file = _split_gguf(resolve_model_path(name_or_path), gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(
        path, gguf_file=gguf_file, revision=revision, trust_remote_code=trust_remote_code
    )
    if tokenizer.pad_token is None:
        # Decoder-only models often ship without a pad token; generation and batching need one.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str, dtype: str = "auto", gguf_file: str | None = None, revision: str | None = None,
               trust_remote_code: bool = False, attn_implementation: str | None = None) -> "PreTrainedModel":
    from transformers import AutoModelForCausalLM

    return load_auto_model(AutoModelForCausalLM, name_or_path, dtype, gguf_file, revision, trust_remote_code,
                           attn_implementation)


def load_auto_model(auto_class: Any, name_or_path: str, dtype: str = "auto", gguf_file: str | None = None,
                    revision: str | None = None, trust_remote_code: bool = False,
                    attn_implementation: str | None = None, **extra: Any) -> "PreTrainedModel":
    """`auto_class.from_pretrained` (AutoModelForCausalLM, AutoModelForSequenceClassification, ...) on a named
    model, Hub id, local directory or GGUF file; `extra` goes to from_pretrained (e.g. num_labels)."""
    path, gguf_file = _split_gguf(resolve_model_path(name_or_path), gguf_file)
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype), "revision": revision,
                              "trust_remote_code": trust_remote_code}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = auto_class.from_pretrained(path, **kwargs, **extra)
    if gguf_file is not None:
        # Weights are dequantised in memory; drop the quantizer so the model trains and saves like any other.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


def lora_config(r: int = 16, alpha: int = 32, dropout: float = 0.0, target_modules: str | list[str] = "all-linear",
                modules_to_save: list[str] | None = None) -> "LoraConfig":
    from peft import LoraConfig

    return LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
        modules_to_save=modules_to_save, task_type="CAUSAL_LM",
    )


def load_peft_model(base: "PreTrainedModel", adapter_dir: str, is_trainable: bool = False):
    """Attach a saved LoRA adapter without merging it (evaluation of an adapter checkpoint)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, adapter_dir, is_trainable=is_trainable)
