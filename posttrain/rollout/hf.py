"""The transformers-generate backend: the CPU default for small models, exact per-token entropies."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from tqdm.auto import tqdm

from posttrain.algos.entropy import token_entropy
from posttrain.rollout.base import Completion, GenerationOutput, SamplingParams, check_prompt_ids, eos_token_ids


@contextmanager
def seeded_rng(seed: int | None) -> Iterator[None]:
    """Seed torch for a block and restore every generator afterwards (no-op for seed None). manual_seed seeds all
    devices, so the accelerator's RNG is forked too: otherwise a seeded evaluation during training would reset
    the trainer's CUDA generator (dropout, sampling) to the same state at every evaluation."""
    if seed is None:
        yield
        return
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class HFEngine:
    """Batched `model.generate` over left-padded prompts.

    The model is used as it is (a PEFT model generates with its adapter, unmerged). Prompts longer than
    `max_context` tokens (default: the model's max_position_embeddings minus max_new_tokens) are rejected
    with the prompt's index rather than silently truncated.
    """

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 32, max_context: int | None = None,
                 progress: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_context = max_context
        self.progress = progress

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context_length(self) -> int | None:
        """The model's context in tokens (prompt + completion): `max_context`, else max_position_embeddings."""
        return self.max_context or getattr(self.model.config, "max_position_embeddings", None)

    def _generate_kwargs(self, sampling: SamplingParams) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": sampling.max_new_tokens,
            "num_return_sequences": sampling.n,
            "return_dict_in_generate": True,
            "output_logits": sampling.logprobs or sampling.entropies,
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": eos_token_ids(self.tokenizer, self.model),
            "repetition_penalty": sampling.repetition_penalty,
        }
        if sampling.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                          top_k=sampling.top_k or 0, min_p=sampling.min_p)
        return kwargs

    def generate(self, prompts: list[str], sampling: SamplingParams | None = None) -> list[GenerationOutput]:
        """`sampling.n` completions per (already chat-formatted) prompt, in prompt order."""
        if not prompts:
            return []
        encoded = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        return self.generate_ids(encoded, sampling, prompts=prompts)

    @torch.no_grad()
    def generate_ids(self, prompt_ids: list[list[int]], sampling: SamplingParams | None = None, *,
                     prompts: list[str] | None = None) -> list[GenerationOutput]:
        """Like `generate` from token ids (multi-turn rollouts extend token contexts, which a decode and
        re-encode would not always reproduce)."""
        sampling = sampling or SamplingParams()
        if not prompt_ids:
            return []
        encoded = [list(map(int, ids)) for ids in prompt_ids]
        if prompts is None:
            prompts = [self.tokenizer.decode(ids) for ids in encoded]
        check_prompt_ids(encoded, sampling, self.context_length, "model's context")
        was_training = self.model.training
        self.model.eval()
        outputs: list[GenerationOutput] = []
        try:
            with seeded_rng(sampling.seed):
                starts = range(0, len(prompts), self.batch_size)
                for start in tqdm(starts, desc="generate", disable=not self.progress or len(starts) < 2):
                    chunk = encoded[start : start + self.batch_size]
                    outputs += self._generate_chunk(prompts[start : start + self.batch_size], chunk, sampling)
        finally:
            self.model.train(was_training)
        return outputs

    def _generate_chunk(self, prompts: list[str], encoded: list[list[int]], sampling: SamplingParams):
        width = max(len(ids) for ids in encoded)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], device=self.device)
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=self.device)
        out = self.model.generate(input_ids=input_ids, attention_mask=attention, **self._generate_kwargs(sampling))
        new_tokens = out.sequences[:, width:]
        logprobs = entropies = None
        if out.logits is not None:
            logits = torch.stack(out.logits, dim=1)  # [B*n, T, V], raw (before temperature and filtering)
            temperature = 1.0 if sampling.greedy else sampling.temperature
            if sampling.logprobs:
                logp = torch.log_softmax(logits.float() / temperature, dim=-1)
                logprobs = logp.gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
            if sampling.entropies:
                entropies = token_entropy(logits, temperature)
        eos_ids = set(eos_token_ids(self.tokenizer, self.model))
        results = []
        for i, prompt in enumerate(prompts):
            result = GenerationOutput(prompt=prompt, prompt_token_ids=encoded[i])
            for j in range(sampling.n):
                row = i * sampling.n + j
                ids = new_tokens[row].tolist()
                stop = next((k for k, t in enumerate(ids) if t in eos_ids), None)
                length = len(ids) if stop is None else stop + 1
                ids = ids[:length]
                result.completions.append(Completion(
                    token_ids=ids,
                    text=self.tokenizer.decode(ids, skip_special_tokens=True),
                    finish_reason="length" if stop is None else "stop",
                    logprobs=None if logprobs is None else logprobs[row, :length].tolist(),
                    entropies=None if entropies is None else entropies[row, :length].tolist(),
                ))
            results.append(result)
        return results
