"""Model loading: named models (tiny-qwen2, smollm2-135m-instruct), Hub ids, local dirs, GGUF files, LoRA."""

from posttrain.models.loading import load_model, load_peft_model, load_tokenizer, lora_config, resolve_dtype
from posttrain.models.registry import NAMED_MODELS, cache_dir, is_pulled, pull_model, resolve_model_path

__all__ = [
    "NAMED_MODELS", "cache_dir", "is_pulled", "load_model", "load_peft_model", "load_tokenizer", "lora_config",
    "pull_model", "resolve_dtype", "resolve_model_path",
]
