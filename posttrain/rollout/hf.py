"""The transformers-generate backend: the CPU default for small models, exact per-token entropies.

Per-token log-probabilities and entropies are computed at every decoding step from that step's logits and only
`[rows, T]` is kept (`_StepStats`): a generate call's peak memory does not grow with the vocabulary beyond one
step's logits, where `output_logits=True` would keep `[rows, T, V]` float32 logits (5 GB for 16 rows x 256 tokens
of a 49k vocabulary) plus their copies.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

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


class _StepStats(LogitsProcessor):
    """Sampled-token log-probs and full-vocabulary entropies at temperature T, one decoding step at a time.

    A forward hook on the model keeps the step's logits (the model's own output, before any processor: no
    temperature, top-k/top-p or repetition penalty, as `output_logits` would give them); the processor, called
    once per step, turns them into the step's entropy and log-softmax. The log-prob of the token sampled at step
    t is read at step t + 1 (the last one at `finish`), so at most two `[rows, V]` tensors are alive at a time.
    """

    def __init__(self, temperature: float, logprobs: bool, entropies: bool):
        self.temperature, self.want_logprobs, self.want_entropies = temperature, logprobs, entropies
        self._logits: torch.Tensor | None = None
        self._pending: torch.Tensor | None = None
        self.logprobs: list[torch.Tensor] = []
        self.entropies: list[torch.Tensor] = []

    def keep(self, module: Any, args: Any, output: Any) -> None:
        logits = output.logits if hasattr(output, "logits") else output[0]
        self._logits = logits[:, -1, :]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = self._logits.float()
        if self.want_logprobs:
            if self._pending is not None:
                self.logprobs.append(self._pending.gather(1, input_ids[:, -1:]).squeeze(1))
            self._pending = torch.log_softmax(logits / self.temperature, dim=-1)
        if self.want_entropies:
            self.entropies.append(token_entropy(logits, self.temperature))
        self._logits = None
        return scores

    def finish(self, last_tokens: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """([rows, T] log-probs, [rows, T] entropies), each None when not asked for."""
        if self.want_logprobs and self._pending is not None:
            self.logprobs.append(self._pending.gather(1, last_tokens.unsqueeze(1)).squeeze(1))
            self._pending = None
        logprobs = torch.stack(self.logprobs, dim=1) if self.want_logprobs and self.logprobs else None
        entropies = torch.stack(self.entropies, dim=1) if self.want_entropies and self.entropies else None
        return logprobs, entropies


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
    def preferred_chunk_size(self) -> int:
        """Prompts per call that let length-sorted batching pack similar prompts (the harness reads this)."""
        return 4 * self.batch_size

    @property
    def context_length(self) -> int | None:
        """The model's context in tokens (prompt + completion): `max_context`, else max_position_embeddings."""
        return self.max_context or getattr(self.model.config, "max_position_embeddings", None)

    def _generate_kwargs(self, sampling: SamplingParams) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": sampling.max_new_tokens,
            "num_return_sequences": sampling.n,
            "return_dict_in_generate": True,
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
        results: list[GenerationOutput | None] = [None] * len(encoded)
        # longest prompts first, in batches of similar length: less padding, and an out-of-memory shows at once
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        try:
            with seeded_rng(sampling.seed):
                starts = range(0, len(order), self.batch_size)
                for start in tqdm(starts, desc="generate", disable=not self.progress or len(starts) < 2):
                    idx = order[start : start + self.batch_size]
                    outs = self._generate_chunk([prompts[i] for i in idx], [encoded[i] for i in idx], sampling)
                    for i, out in zip(idx, outs):
                        results[i] = out
        finally:
            self.model.train(was_training)
        return results  # type: ignore[return-value]

    def _hooked_model(self) -> Any:
        """The module whose forward returns the logits during generate (a PEFT model's base model)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def _generate_chunk(self, prompts: list[str], encoded: list[list[int]], sampling: SamplingParams):
        width = max(len(ids) for ids in encoded)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], device=self.device)
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=self.device)
        kwargs = self._generate_kwargs(sampling)
        stats = None
        if sampling.logprobs or sampling.entropies:
            stats = _StepStats(1.0 if sampling.greedy else sampling.temperature, sampling.logprobs, sampling.entropies)
            kwargs["logits_processor"] = LogitsProcessorList([stats])
            handle = self._hooked_model().register_forward_hook(stats.keep)
        try:
            out = self.model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
        finally:
            if stats is not None:
                handle.remove()
        new_tokens = out.sequences[:, width:]
        logprobs, entropies = stats.finish(new_tokens[:, -1]) if stats is not None else (None, None)
        # one transfer per tensor, then plain lists (no per-row device syncs)
        token_rows = new_tokens.cpu().tolist()
        logprob_rows = None if logprobs is None else logprobs.cpu().tolist()
        entropy_rows = None if entropies is None else entropies.cpu().tolist()
        eos_ids = set(eos_token_ids(self.tokenizer, self.model))
        results = []
        for i, prompt in enumerate(prompts):
            result = GenerationOutput(prompt=prompt, prompt_token_ids=encoded[i])
            for j in range(sampling.n):
                row = i * sampling.n + j
                ids = token_rows[row]
                stop = next((k for k, t in enumerate(ids) if t in eos_ids), None)
                length = len(ids) if stop is None else stop + 1
                ids = ids[:length]
                result.completions.append(Completion(
                    token_ids=ids,
                    text=self.tokenizer.decode(ids, skip_special_tokens=True),
                    finish_reason="length" if stop is None else "stop",
                    logprobs=None if logprob_rows is None else logprob_rows[row][:length],
                    entropies=None if entropy_rows is None else entropy_rows[row][:length],
                ))
            results.append(result)
        return results
