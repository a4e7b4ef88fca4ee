"""One generation engine for training, best-of-n and evaluation. Backends: `hf` (transformers generate)."""

from posttrain.rollout.base import Completion, GenerationOutput, RolloutEngine, SamplingParams
from posttrain.rollout.hf import HFEngine

__all__ = ["Completion", "GenerationOutput", "HFEngine", "RolloutEngine", "SamplingParams"]
