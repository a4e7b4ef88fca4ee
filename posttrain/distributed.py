"""What the library's own code needs to be correct under several processes: which rank this is, whether training
shards its parameters, full weights out of FSDP2 / ZeRO-3 shards, and main-process-only work the other ranks wait
for without hitting the process group's timeout.

The distributed engines themselves are torch.distributed, accelerate (DDP, FSDP2, DeepSpeed) and vLLM; nothing here
launches, shards or communicates on its own beyond torch.distributed's store and barrier.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

__all__ = ["ShardedTrainingError", "colocated_vllm_setup", "describe_launch", "end_distributed", "full_shape",
           "full_state_dict", "full_tensors", "launch_summary", "main_process_only", "needs_gather", "rank_info",
           "sharded_training", "sharding_from_recipe", "wait_for_main", "zero_stage"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

# main-process work (evaluation before / during training) can run for hours; the others wait this long for it
MAIN_PROCESS_WAIT = timedelta(hours=float(os.environ.get("POSTTRAIN_MAIN_PROCESS_WAIT_HOURS", "24")))
SEED_STRIDE = 1_000_003  # rank r's engine seed is seed + r * SEED_STRIDE: no two ranks share a prompt seed


class ShardedTrainingError(ValueError):
    """A configuration that cannot be correct under sharded (FSDP / ZeRO-3) training."""


def rank_info() -> tuple[int, int, int]:
    """(rank, local rank, world size): from torch.distributed when it is initialised, else the launcher's env
    (torchrun and accelerate set RANK, LOCAL_RANK, WORLD_SIZE before the script starts)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        return rank, int(os.environ.get("LOCAL_RANK", rank)), world
    rank = int(os.environ.get("RANK", "0"))
    return rank, int(os.environ.get("LOCAL_RANK", rank)), int(os.environ.get("WORLD_SIZE", "1"))


# --- sharding ---------------------------------------------------------------------------------------------------

def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def sharding_from_recipe(trainer: Mapping[str, Any]) -> str | None:
    """"fsdp" or "zero3" when a recipe's trainer section (or the accelerate launch environment) shards the
    parameters over ranks, else None. ZeRO-1/2 shard optimizer state and gradients only: the weights stay whole."""
    if trainer.get("fsdp") or _env_true("ACCELERATE_USE_FSDP"):
        return "fsdp"
    ds = trainer.get("deepspeed")
    stage = None
    if isinstance(ds, Mapping):
        stage = (ds.get("zero_optimization") or {}).get("stage")
    elif isinstance(ds, str) and os.path.isfile(ds):
        import json

        try:
            stage = (json.loads(open(ds).read()).get("zero_optimization") or {}).get("stage")
        except (OSError, ValueError):
            stage = None
    if stage is None and _env_true("ACCELERATE_USE_DEEPSPEED"):
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    return "zero3" if str(stage) == "3" else None


def uses_deepspeed(trainer: Mapping[str, Any]) -> bool:
    """Whether a recipe's trainer section (trainer.deepspeed) or the accelerate launch environment (a DeepSpeed
    config) trains under DeepSpeed, at any ZeRO stage."""
    return bool(trainer.get("deepspeed")) or _env_true("ACCELERATE_USE_DEEPSPEED")


def sharded_training(accelerator: Any) -> str | None:
    """"fsdp" / "zero3" when this accelerator shards the model's parameters over ranks, else None."""
    if accelerator is None:
        return None
    if getattr(accelerator, "is_fsdp2", False) or getattr(accelerator.state, "fsdp_plugin", None) is not None:
        return "fsdp"
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and getattr(plugin, "zero_stage", None) == 3:
        return "zero3"
    return None


def offloaded(accelerator: Any) -> list[str]:
    """What the launch keeps in CPU (or NVMe) memory rather than on the device: everything under FSDP's parameter
    offload (fsdp2_offload.yaml), DeepSpeed's offload_param / offload_optimizer as configured."""
    from torch.distributed.fsdp import CPUOffloadPolicy

    fsdp = getattr(accelerator.state, "fsdp_plugin", None)
    if fsdp is not None:
        policy = getattr(fsdp, "cpu_offload", None)  # FSDP2: a CPUOffloadPolicy; FSDP1: CPUOffload(offload_params)
        on = isinstance(policy, CPUOffloadPolicy) or getattr(policy, "offload_params", False) is True
        return ["parameters", "gradients", "optimizer state"] if on else []
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return []
    zero = (getattr(plugin, "deepspeed_config", None) or {}).get("zero_optimization") or {}
    out = []
    for key, what in (("offload_param", "parameters"), ("offload_optimizer", "optimizer state")):
        device = (zero.get(key) or {}).get("device") or getattr(plugin, f"{key}_device", None)
        if device not in (None, "none", "auto"):
            out.append(what)
    return out


def zero_stage(accelerator: Any) -> int | None:
    """The DeepSpeed ZeRO stage (0-3) this accelerator trains under, None when it does not use DeepSpeed."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    stage = getattr(plugin, "zero_stage", None)
    return None if plugin is None or stage is None else int(stage)


def launch_summary(accelerator: Any) -> dict[str, Any]:
    """How a run was launched, for its summary and report: the number of processes, accelerate's distributed type,
    the DeepSpeed ZeRO stage (None without DeepSpeed), the parameters' sharding ("fsdp" / "zero3" / None), what is
    offloaded to CPU memory and the device type."""
    kind = accelerator.distributed_type
    return {"processes": int(accelerator.num_processes), "distributed_type": getattr(kind, "value", str(kind)),
            "zero_stage": zero_stage(accelerator), "sharding": sharded_training(accelerator),
            "offload": offloaded(accelerator), "device": accelerator.device.type}


def describe_launch(launch: Mapping[str, Any]) -> str:
    """One line for a run report: 'Launch: 2 processes (FSDP, parameters sharded) on cuda; the memory figures are
    the main process's.' A DeepSpeed launch names its ZeRO stage: 'DEEPSPEED ZeRO-2'."""
    n = launch["processes"]
    how = [launch["distributed_type"]] if n > 1 or launch["distributed_type"] != "NO" else []
    if how and launch.get("zero_stage") is not None:
        how[0] += f" ZeRO-{launch['zero_stage']}"
    if launch.get("sharding"):
        how.append("parameters sharded")
    if launch.get("offload"):
        *first, last = launch["offload"]
        how.append(f"{', '.join(first)} and {last}" if first else last)
        how[-1] += " offloaded to CPU memory"
    line = f"Launch: {n} process{'es' if n > 1 else ''}" + (f" ({', '.join(how)})" if how else "")
    line += f" on {launch['device']}"
    return line + ("; the memory figures are the main process's." if n > 1 else ".")


@contextmanager
def loading_whole() -> Iterator[None]:
    """Models loaded inside the block load whole, on this process alone, under a ZeRO-3 launch too. Once a ZeRO-3
    config is live, transformers partitions every from_pretrained over the ranks (deepspeed.zero.Init, whose
    broadcasts need every rank): a load on the main process alone, after training (the reward ensemble's
    calibration), would fail or hang. The model to train still loads partitioned (outside this block)."""
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:  # transformers without its DeepSpeed integration: nothing partitions
        yield
        return
    live = hf_deepspeed._hf_deepspeed_config_weak_ref
    config = live() if live is not None else None
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if config is not None:
            hf_deepspeed.set_hf_deepspeed_config(config)


def _is_zero3_param(p: Any) -> bool:
    return hasattr(p, "ds_id") and hasattr(p, "ds_status")


def needs_gather(model: Any) -> bool:
    """Whether the model's parameters are sharded over ranks (FSDP2 DTensors or ZeRO-3 partitions)."""
    return any(_is_zero3_param(p) or callable(getattr(p, "full_tensor", None)) for p in model.parameters())


@contextmanager
def _zero3_gathered(params: Sequence[Any], modifier_rank: int | None) -> Iterator[None]:
    """The ZeRO-3 parameters among `params` whole inside the block (a collective: every rank enters it); with a
    modifier rank, partitioned again after it with the values that rank wrote. Other parameters as they are."""
    zero3 = [p for p in params if _is_zero3_param(p)]
    if not zero3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(zero3, modifier_rank=modifier_rank):
        yield


def _gathered(model: Any, names: Callable[[str], bool] | None = None) -> Any:
    """ZeRO-3: the parameters (those whose name `names` accepts) gathered read-only inside the block."""
    return _zero3_gathered([p for n, p in model.named_parameters() if names is None or names(n)], None)


def gathered_for_update(params: Sequence[Any]) -> Any:
    """The ZeRO-3 parameters among `params` whole inside the block, and partitioned again after it with the values
    the main process wrote into them; a collective, so every rank enters it. Other parameters as they are."""
    return _zero3_gathered(params, 0)


def _full(t: Any) -> Any:
    """An FSDP2 DTensor's full tensor (an all-gather: every rank calls it in the same order); a tensor as it is."""
    full_tensor = getattr(t, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else t


def full_tensors(model: Any, entries: Callable[[Any], Iterable[tuple[str, Any]]] | None = None
                 ) -> Iterator[tuple[str, Any]]:
    """(name, whole tensor) for each entry of the model's state dict (tied weights under each of their names), or of
    `entries(model)`, gathered one at a time: a ZeRO-3 partition inside GatheredParameters for that one tensor, an
    FSDP2 DTensor all-gathered by full_tensor(). The memory beyond the shards is one whole tensor, where
    full_state_dict holds the whole model; a tensor stays whole only until the next one is asked for, so use it (send
    it, copy it) at once. Collective under sharding: every rank iterates to the end, in the same order."""
    items = entries(model) if entries is not None else model.state_dict(keep_vars=True).items()
    for name, t in items:
        if _is_zero3_param(t):
            with _zero3_gathered([t], None):
                yield name, t.data
        else:
            yield name, _full(t.detach())


def full_shape(t: Any) -> list[int]:
    """The whole shape of a tensor that may be a ZeRO-3 partition (ds_shape) or an FSDP2 DTensor (its global shape),
    without gathering it."""
    return list(getattr(t, "ds_shape", None) or t.shape)


@contextmanager
def full_state_dict(model: Any, select: Callable[[Any], Mapping[str, Any]] | None = None,
                    names: Callable[[str], bool] | None = None) -> Iterator[dict[str, Any]]:
    """The model's full (unsharded) state dict inside the block, on every rank: FSDP2 DTensors all-gathered, ZeRO-3
    parameters gathered; under DDP or one process the state dict as it is. select(model) picks the entries (e.g.
    PEFT's adapter state dict; default model.state_dict()), names(parameter name) the ZeRO-3 parameters to gather
    (default all). Collective under sharding: every rank must enter, in the same order."""
    with _gathered(model, names):
        state = select(model) if select is not None else model.state_dict()
        yield {k: _full(v) for k, v in state.items()}


# --- colocated vLLM, one engine per rank ---------------------------------------------------------------------------

def colocated_vllm_setup(seed: int, llm_kwargs: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """Prepare an in-process vLLM engine for this rank the way TRL's colocate mode does (trl/generation/
    vllm_generation.py): under N > 1 processes, RANK / LOCAL_RANK / WORLD_SIZE and the rendezvous address in the
    environment, vLLM's external-launcher executor (each rank's engine is its own, on its own GPU), the rank's GPU
    made current, and a per-rank seed. Returns (seed, llm_kwargs) to build the engine with.

    Tensor parallelism inside a colocated engine under several training ranks is refused: the prompts of the
    ranks of one tensor-parallel group would have to be gathered and split again (TRL does that; this engine
    generates each rank's own prompts). Use a vLLM server for tensor parallelism."""
    rank, local_rank, world = rank_info()
    if world <= 1:
        return seed, llm_kwargs
    if int(llm_kwargs.get("tensor_parallel_size", 1)) > 1:
        raise ValueError(f"rollout.vllm.tensor_parallel_size={llm_kwargs['tensor_parallel_size']} with {world} "
                         "training processes: a colocated engine runs one per rank on the rank's own GPU; for "
                         "tensor-parallel generation start a vLLM server (launch/vllm_server.sh) and set "
                         "rollout.vllm.mode: server")
    os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"] = str(rank), str(local_rank), str(world)
    from trl.trainer.utils import ensure_master_addr_port

    ensure_master_addr_port()
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)  # vLLM's worker takes the current device; without this every rank's is 0
    kwargs = {"distributed_executor_backend": "external_launcher", **llm_kwargs}
    return seed + rank * SEED_STRIDE, kwargs


# --- main-process-only work --------------------------------------------------------------------------------------

def end_distributed() -> None:
    """Destroy the default process group on every rank at the end of a command, as accelerate's `end_training` does,
    so that its communication threads stop in order rather than at interpreter exit. (A rank that aborted at exit,
    SIGABRT with "terminate called without an active exception", once failed a whole two-process ZeRO-3 run in the
    tests after the training had succeeded.) Call it once every rank is done; a no-op in one process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main_process_only(fn: Callable[[], T], *, what: str, timeout: timedelta | None = None) -> T | None:
    """Run fn on the main process while the other ranks wait for it, then go on together; returns fn's result on
    the main process, None on the others. One process: just fn().

    The others wait on torch.distributed's key-value store (not in a collective), for `timeout` (default
    POSTTRAIN_MAIN_PROCESS_WAIT_HOURS, 24 h) instead of the process group's timeout (30 min by default), which a
    long evaluation on the main process would otherwise exceed: the waiting ranks would fail in their next
    collective. An exception on the main process is re-raised there and reported to the others, which stop too.
    fn must not itself run collectives (the other ranks are not in them)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fn()
    timeout = timeout or MAIN_PROCESS_WAIT
    store = dist.distributed_c10d._get_default_store()
    counter = _COUNTERS.setdefault(what, 0)
    _COUNTERS[what] += 1
    key = f"posttrain/main_only/{what}/{counter}"
    if dist.get_rank() == 0:
        try:
            result = fn()
        except BaseException as err:
            store.set(key, f"error: {type(err).__name__}: {err}"[:2000])
            raise
        store.set(key, "ok")
        return result
    t0 = time.perf_counter()
    previous = store.timeout
    store.set_timeout(timeout)
    try:
        store.wait([key])
    finally:
        store.set_timeout(previous)
    status = store.get(key).decode()
    if status != "ok":
        raise RuntimeError(f"the main process failed during {what}: {status.removeprefix('error: ')}")
    logger.debug("rank %d waited %.1f s for the main process (%s)", dist.get_rank(), time.perf_counter() - t0, what)
    return None


def wait_for_main(what: str, timeout: timedelta | None = None) -> None:
    """A barrier for work the main process has just done alone (an evaluation): the other ranks wait for it to
    arrive here, on the store and with `timeout` (see main_process_only), not in a collective."""
    main_process_only(lambda: None, what=what, timeout=timeout)


_COUNTERS: dict[str, int] = {}
