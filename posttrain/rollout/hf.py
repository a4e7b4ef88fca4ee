"""The transformers backend: the CPU default for small models, exact per-token entropies.

Two schedulers over the same model forward:
- continuous batching (the default where the model allows it, `_ContinuousDecoder`): `batch_size` rows decode
  together, and a row that finishes leaves the batch and a waiting prompt takes its place, so no step is spent
  on finished rows. With static batches every batch runs as long as its longest completion: on the 200 addition
  problems (mean 24 of at most 64 new tokens) most decoding steps were spent on rows that had already finished.
- static batches through `model.generate` (`continuous=False`, and for what the decoder does not cover:
  repetition penalty, caches that are not plain full-attention key/value caches).

Either way per-token log-probabilities and entropies are computed at every decoding step from that step's logits
and only `[rows, T]` is kept: a call's peak memory does not grow with the vocabulary beyond one step's logits,
where `output_logits=True` would keep `[rows, T, V]` float32 logits (5 GB for 16 rows x 256 tokens of a 49k
vocabulary) plus their copies.
"""

from __future__ import annotations

import inspect
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import (
    DynamicLayer,
    LogitsProcessor,
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from posttrain.algos.entropy import token_entropy
from posttrain.models.attention import grouped_query_attention
from posttrain.models.prefix import common_prefix_length, repeat_cache
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


class _SlackLayer(DynamicLayer):
    """A key/value cache layer with room to grow: a decoding step writes its position into spare capacity, where
    DynamicLayer concatenates, copying the whole layer at every step. `keys`/`values` stay plain tensors (views of
    the first `length` positions of the buffers), so code that reads, slices or reassigns them works as on a
    DynamicLayer; a reassigned layer is copied into a new buffer at its next update."""

    SLACK = 64  # positions allocated beyond the current length: one full copy per 64 decoding steps

    def __init__(self) -> None:
        super().__init__()
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def reset(self) -> None:
        self._buffers = None
        super().reset()

    def _in_buffer(self) -> bool:
        if self._buffers is None:
            return False
        buf = self._buffers[0]
        return (self.keys.data_ptr() == buf.data_ptr() and self.keys.shape[:2] == buf.shape[:2]
                and self.keys.stride() == buf.stride())

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.keys.shape[-2] if self.keys.numel() else 0
        end = length + key_states.shape[-2]
        if not self._in_buffer() or end > self._buffers[0].shape[-2]:
            buffers = []
            for old, new in ((self.keys, key_states), (self.values, value_states)):
                buf = new.new_empty(new.shape[0], new.shape[1], end + self.SLACK, new.shape[-1])
                if length:
                    buf[:, :, :length] = old
                buffers.append(buf)
            self._buffers = (buffers[0], buffers[1])
        keys, values = self._buffers
        keys[:, :, length:end] = key_states
        values[:, :, length:end] = value_states
        self.keys, self.values = keys[:, :, :end], values[:, :, :end]
        return self.keys, self.values


def _slack_cache() -> Any:
    """An empty layered cache of _SlackLayer layers (a DynamicCache, for the model code that checks for one)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.layer_class_to_replicate = _SlackLayer
    return cache


@dataclass
class _Row:
    """One completion being decoded: which prompt and sample it is, and what it has produced so far."""

    prompt: int
    sample: int
    seen: int  # real (non-padding) tokens in the cache: the position of the next token fed
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    finish: str | None = None


class _ContinuousDecoder:
    """Continuous batching over a plain key/value cache: at most `slots` rows decode together; finished rows leave
    and waiting ones are prefilled and joined to the batch, left-padded to the cache's length (their padding is
    masked out, positions count real tokens only, as in `generate` on left-padded prompts). The n samples of a
    prompt share one prefill, and the prompts' common prefix (a chat template's system prompt) is prefilled once
    per call. Rows wait longest prompt first; new rows join once a quarter of the slots is free
    (or the batch is empty), so a prefill is not paid for every single finished row.

    Sampling applies temperature, top-k, top-p and min-p in `generate`'s order; log-probs and entropies are those
    of the model's logits at the sampling temperature (1 when greedy), before top-k/top-p, as in `_StepStats`.
    """

    MIN_PREFIX = 8  # shared prompt tokens worth a separate prefill
    REFILL_DIVISOR = 4  # waiting prompts join once slots / REFILL_DIVISOR rows are free

    def __init__(self, model: Any, pad_token_id: int, eos_ids: list[int], slots: int):
        self.model, self.pad, self.eos, self.slots = model, pad_token_id, set(eos_ids), slots
        self.prefix: list[int] = []
        self.prefix_cache: Any = None

    @staticmethod
    def supports(model: Any, sampling: SamplingParams) -> bool:
        """True where the decoder computes what `generate` would: a model whose forward takes position ids, a cache
        and logits_to_keep, whose layers all use full attention (sliding-window and hybrid caches have their own
        layout), without a repetition penalty (it reads each row's whole history)."""
        if sampling.repetition_penalty != 1.0:
            return False
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = getattr(base, "config", None)
        if config is None or getattr(config, "is_encoder_decoder", False):
            return False
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:
            if any(t != "full_attention" for t in layer_types):
                return False
        elif getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
            return False
        params = inspect.signature(base.forward).parameters
        return all(name in params for name in ("position_ids", "past_key_values", "logits_to_keep"))

    def _warpers(self, sampling: SamplingParams) -> LogitsProcessorList:
        warpers = LogitsProcessorList()
        if sampling.greedy:
            return warpers
        if sampling.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_k:
            warpers.append(TopKLogitsWarper(top_k=sampling.top_k))
        if sampling.top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p=sampling.top_p))
        if sampling.min_p is not None:
            warpers.append(MinPLogitsWarper(min_p=sampling.min_p))
        return warpers

    def _forward(self, input_ids: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor,
                 cache: Any) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions, past_key_values=cache,
                         use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]

    def _prefix(self, encoded: list[list[int]], device: torch.device) -> None:
        """Prefill the prompts' common prefix once (a chat template's system prompt is most of a short prompt):
        every later prefill starts from a copy of its cache. Needs at least MIN_PREFIX tokens in common and one
        token of each prompt after it (the last position's logits come from the prompt's own prefill)."""
        self.prefix, self.prefix_cache = [], None
        if len(encoded) < 2:
            return
        common = encoded[0][: min(common_prefix_length(encoded), min(len(ids) for ids in encoded) - 1)]
        if len(common) < self.MIN_PREFIX:
            return
        self.prefix, self.prefix_cache = list(common), _slack_cache()
        ids = torch.tensor([common], device=device)
        self._forward(ids, torch.ones_like(ids), torch.arange(len(common), device=device)[None], self.prefix_cache)

    def _prefill(self, prompts: list[list[int]], copies: list[int], device: torch.device) -> tuple[Any, ...]:
        """Cache, mask and last-position logits of `prompts` (left-padded after the shared prefix, if any), each
        row repeated `copies[i]` times."""
        p = len(self.prefix)
        suffixes = [ids[p:] for ids in prompts]
        width = max(len(ids) for ids in suffixes)
        input_ids = torch.tensor([[self.pad] * (width - len(ids)) + ids for ids in suffixes], device=device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in suffixes], device=device)
        positions = p + (mask.cumsum(-1) - 1).clamp(min=0)
        if p:
            b = len(prompts)
            cache = repeat_cache(self.prefix_cache, b, into=_slack_cache())
            mask = torch.cat([mask.new_ones(b, p), mask], dim=1)
        else:
            cache = _slack_cache()
        logits = self._forward(input_ids, mask, positions, cache)
        if any(c != 1 for c in copies):
            index = torch.repeat_interleave(torch.arange(len(prompts), device=device),
                                            torch.tensor(copies, device=device))
            cache.batch_select_indices(index)
            mask, logits = mask[index], logits[index]
        return cache, mask, logits

    @staticmethod
    def _layers(cache: Any) -> list[Any]:
        layers = getattr(cache, "layers", None)
        if layers is None:
            raise TypeError(f"continuous batching needs a layered DynamicCache, got {type(cache).__name__}")
        return layers

    def _join(self, cache: Any, mask: torch.Tensor, new_cache: Any, new_mask: torch.Tensor) -> torch.Tensor:
        """Append the new rows to the batch, left-padding whichever side is shorter; returns the joined mask."""
        import torch.nn.functional as F

        length, new_length = mask.shape[1], new_mask.shape[1]
        width = max(length, new_length)
        for old, new in zip(self._layers(cache), self._layers(new_cache), strict=True):
            old.keys = torch.cat([F.pad(old.keys, (0, 0, width - length, 0)),
                                  F.pad(new.keys, (0, 0, width - new_length, 0))])
            old.values = torch.cat([F.pad(old.values, (0, 0, width - length, 0)),
                                    F.pad(new.values, (0, 0, width - new_length, 0))])
        return torch.cat([F.pad(mask, (width - length, 0)), F.pad(new_mask, (width - new_length, 0))])

    def _keep(self, cache: Any, mask: torch.Tensor, keep: list[int]) -> torch.Tensor:
        """Only the rows `keep`, and no leading column that is padding in every kept row."""
        index = torch.tensor(keep, device=mask.device)
        mask = mask[index]
        lead = int((mask.sum(0) == 0).long().cumprod(0).sum().item())
        for layer in self._layers(cache):
            layer.keys = layer.keys[index, :, lead:]
            layer.values = layer.values[index, :, lead:]
        return mask[:, lead:]

    @torch.no_grad()
    def run(self, encoded: list[list[int]], sampling: SamplingParams, progress: Any = None) -> list[list[_Row]]:
        """`sampling.n` rows per prompt, each prompt's rows in sample order."""
        device = next(self.model.parameters()).device
        warpers = self._warpers(sampling)
        temperature = 1.0 if sampling.greedy else sampling.temperature
        want_lp, want_ent = sampling.logprobs, sampling.entropies
        n = sampling.n
        self._prefix(encoded, device)
        waiting = deque(sorted(range(len(encoded)), key=lambda i: -len(encoded[i])))  # prompts, longest first
        done: list[list[_Row]] = [[] for _ in encoded]
        active: list[_Row] = []
        cache, mask, logits = None, None, None
        refill = max(n, self.slots // self.REFILL_DIVISOR)
        while waiting or active:
            free = self.slots - len(active)
            if waiting and free >= n and (not active or free >= refill):
                take: list[int] = []
                while waiting and (len(take) + 1) * n <= free:
                    take.append(waiting.popleft())
                new_cache, new_mask, new_logits = self._prefill([encoded[i] for i in take], [n] * len(take), device)
                if cache is None:
                    cache, mask, logits = new_cache, new_mask, new_logits
                else:
                    mask = self._join(cache, mask, new_cache, new_mask)
                    logits = torch.cat([logits, new_logits])
                active += [_Row(i, j, len(encoded[i])) for i in take for j in range(n)]
            # choose every active row's next token from its logits
            raw = logits.float()
            if sampling.greedy:
                tokens = raw.argmax(-1)
            else:
                scores = warpers(None, raw.clone()) if warpers else raw / temperature
                probs = torch.softmax(scores, dim=-1)
                tokens = torch.multinomial(probs, num_samples=1).squeeze(1)
            stats = [tokens.to(raw.dtype)]
            if want_lp:
                stats.append(torch.log_softmax(raw / temperature, -1).gather(1, tokens[:, None]).squeeze(1))
            if want_ent:
                stats.append(token_entropy(raw, temperature))
            host = torch.stack(stats).cpu().tolist()  # one transfer per step
            keep: list[int] = []
            for k, row in enumerate(active):
                token = int(host[0][k])
                row.tokens.append(token)
                if want_lp:
                    row.logprobs.append(host[1][k])
                if want_ent:
                    row.entropies.append(host[-1][k])
                if token in self.eos:
                    row.finish = "stop"
                elif len(row.tokens) >= sampling.max_new_tokens:
                    row.finish = "length"
                if row.finish is None:
                    keep.append(k)
                else:
                    done[row.prompt].append(row)
                    if progress is not None and len(done[row.prompt]) == n:
                        progress.update(1)
            if len(keep) < len(active):
                if not keep:
                    cache, mask, logits, active = None, None, None, []
                    continue
                mask = self._keep(cache, mask, keep)
                tokens = tokens[torch.tensor(keep, device=tokens.device)]
                active = [active[k] for k in keep]
            # one decoding step for every row still running
            positions = torch.tensor([[row.seen] for row in active], device=device)
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
            logits = self._forward(tokens[:, None], mask, positions, cache)
            for row in active:
                row.seen += 1
        for rows in done:
            rows.sort(key=lambda r: r.sample)
        return done


class HFEngine:
    """Batched generation with the loaded model: continuous batching (the default) or static left-padded batches
    through `model.generate`.

    The model is used as it is (a PEFT model generates with its adapter, unmerged). Prompts longer than
    `max_context` tokens (default: the model's max_position_embeddings minus max_new_tokens) are rejected
    with the prompt's index rather than silently truncated.

    `batch_size` prompts (`batch_size * n` rows) decode at a time. `continuous=True` (the default) refills the
    batch as rows finish (module docstring); `False`, or a configuration the continuous decoder does not cover,
    runs static batches through `model.generate`. Greedy outputs are the same either way up to float rounding
    in a batch of another composition; sampled ones are drawn in another order, so a seed gives other (equally
    distributed) samples under each scheduler. `eos_token_ids` overrides the end tokens (default: the
    tokenizer's and the model's generation config's), as the GRPO trainers pass TRL's.
    """

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 32, max_context: int | None = None,
                 progress: bool = True, continuous: bool = True, eos_token_ids: list[int] | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_context = max_context
        self.progress = progress
        self.continuous = continuous
        self._eos_ids = eos_token_ids  # None: the tokenizer's and the model's generation config's

    @property
    def eos_ids(self) -> list[int]:
        return self._eos_ids if self._eos_ids is not None else eos_token_ids(self.tokenizer, self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def preferred_chunk_size(self) -> int:
        """Prompts per call (the harness reads this): enough that length-sorted static batches pack similar
        prompts, and that a continuous batch stays full (it drains, rows finishing with none to replace them,
        only at the end of a call)."""
        return (16 if self.continuous else 4) * self.batch_size

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
            "eos_token_id": self.eos_ids,
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
        if self.continuous and _ContinuousDecoder.supports(self.model, sampling):
            try:
                with grouped_query_attention(self.model):
                    return self._generate_continuous(prompts, encoded, sampling)
            finally:
                self.model.train(was_training)
        results: list[GenerationOutput | None] = [None] * len(encoded)
        # longest prompts first, in batches of similar length: less padding, and an out-of-memory shows at once
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        try:
            with seeded_rng(sampling.seed), grouped_query_attention(self.model):
                starts = range(0, len(order), self.batch_size)
                for start in tqdm(starts, desc="generate", disable=not self.progress or len(starts) < 2):
                    idx = order[start : start + self.batch_size]
                    outs = self._generate_chunk([prompts[i] for i in idx], [encoded[i] for i in idx], sampling)
                    for i, out in zip(idx, outs):
                        results[i] = out
        finally:
            self.model.train(was_training)
        return results  # type: ignore[return-value]

    def _generate_continuous(self, prompts: list[str], encoded: list[list[int]],
                             sampling: SamplingParams) -> list[GenerationOutput]:
        decoder = _ContinuousDecoder(self.model, self.tokenizer.pad_token_id, self.eos_ids,
                                     slots=self.batch_size * sampling.n)
        bar = tqdm(total=len(encoded), desc="generate", unit="prompt",
                   disable=not self.progress or len(encoded) <= self.batch_size)
        try:
            with seeded_rng(sampling.seed):
                rows = decoder.run(encoded, sampling, progress=bar)
        finally:
            bar.close()
        results = []
        for prompt, ids, samples in zip(prompts, encoded, rows, strict=True):
            result = GenerationOutput(prompt=prompt, prompt_token_ids=ids)
            for row in samples:
                result.completions.append(Completion(
                    token_ids=row.tokens, text=self.tokenizer.decode(row.tokens, skip_special_tokens=True),
                    finish_reason=row.finish, logprobs=row.logprobs if sampling.logprobs else None,
                    entropies=row.entropies if sampling.entropies else None))
            results.append(result)
        return results

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
        eos_ids = set(self.eos_ids)
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
