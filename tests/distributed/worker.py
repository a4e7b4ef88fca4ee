"""Scenarios of tests/distributed/test_distributed_multiproc.py, one per launch of two processes (gloo on CPU). Each
rank writes what it saw to OUT/rank<r>.json.

    torchrun --nproc_per_node 2 tests/distributed/worker.py SCENARIO OUT
    accelerate launch --config_file launch/accelerate/fsdp2.yaml ... tests/distributed/fsdp_cpu.py \
        tests/distributed/worker.py fsdp2_config_wraps_each_decoder_layer OUT FAMILY lora|full
"""

import json
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

SCENARIO, OUT = sys.argv[1], Path(sys.argv[2])
PG_TIMEOUT = timedelta(seconds=3)


def main_waits_past_the_timeout() -> dict:
    """Rank 0 works alone for twice the process group's timeout; the others then meet it in a collective."""
    from posttrain.distributed import main_process_only

    t0 = time.perf_counter()
    result = main_process_only(lambda: (time.sleep(2 * PG_TIMEOUT.total_seconds()), "done")[1], what="slow")
    waited = time.perf_counter() - t0
    x = torch.ones(1) * (dist.get_rank() + 1)
    dist.all_reduce(x)
    return {"result": result, "waited": waited, "sum": x.item()}


def main_fails() -> dict:
    from posttrain.distributed import main_process_only

    def boom() -> None:
        raise ValueError("evaluation exploded on row 7")

    try:
        main_process_only(boom, what="fails")
    except Exception as err:  # noqa: BLE001 - the scenario reports what each rank saw
        return {"error": f"{type(err).__name__}: {err}"}
    return {"error": None}


def fsdp2_full_state_dict() -> dict:
    """FSDP2 on CPU: the sharded parameters' full tensors equal the unsharded model's, on every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from posttrain.distributed import full_state_dict, needs_gather

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    fully_shard(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    local = {k: tuple(v.to_local().shape) for k, v in model.state_dict().items()}
    with full_state_dict(model) as state:
        equal = {k: bool(torch.equal(state[k].cpu(), reference[k])) for k in reference}
        shapes = {k: tuple(v.shape) for k, v in state.items()}
    return {"needs_gather": needs_gather(model), "equal": equal, "shapes": shapes, "local_shapes": local}


def fsdp2_config_wraps_each_decoder_layer() -> dict:
    """Run under `accelerate launch --config_file launch/accelerate/fsdp2.yaml` (through fsdp_cpu.py) with a model
    family and lora|full as extra arguments: accelerate's FSDP2 preparation makes every decoder layer its own FSDP
    unit (the layer class comes from the model's own `_no_split_modules`, not from a class named in the config)."""
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model
    from torch.distributed.fsdp import FSDPModule
    from transformers import AutoConfig, AutoModelForCausalLM

    family, lora = sys.argv[3], sys.argv[4] == "lora"
    config = AutoConfig.for_model(family, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2)
    accelerator = Accelerator(cpu=True)  # as the trainers build it on CPU (transformers' TrainingArguments)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model, _ = accelerator.prepare(model, torch.optim.AdamW(model.parameters()))  # FSDP2 prepares the two together
    layers = (model.get_base_model() if lora else model).model.layers
    return {"layer_class": type(layers[0]).__name__, "wrapped": [isinstance(layer, FSDPModule) for layer in layers]}


class _Response:
    status_code, text, headers = 200, "", {}

    def __init__(self, body: dict | None = None) -> None:
        self.body = body or {}

    def raise_for_status(self) -> None:
        pass

    def json(self) -> dict:
        return self.body


class _Session:
    """requests.Session without servers: serves model "base" and records every POST as (server, route)."""

    posts: list[tuple[str, str]] = []

    def get(self, url: str, timeout: float) -> _Response:
        return _Response({"data": [{"id": "base"}]})

    def post(self, url: str, json: dict, timeout: float) -> _Response:  # noqa: A002 - requests' signature
        server, _, route = url.removeprefix("http://").partition("/")
        _Session.posts.append((server, route.rsplit("/", 1)[-1]))
        return _Response()


def server_lora_sync() -> dict:
    """VLLMServerEngine.sync_weights under 2 ranks and 2 servers: each rank generates on its own server, rank 0 alone
    loads each adapter on both servers (one request per server and sync), both ranks then ask for the same name."""
    import tempfile

    import requests
    from peft import LoraConfig, get_peft_model

    from posttrain.rollout.vllm import VLLMServerEngine

    torch.manual_seed(0)
    model = get_peft_model(_Tiny(), LoraConfig(r=2, target_modules=["proj"]))
    requests.Session = _Session  # no servers: the HTTP sessions answer /v1/models and record the rest
    adapter_dir = tempfile.mkdtemp() if dist.get_rank() == 0 else None
    engine = VLLMServerEngine("http://s0:8000,http://s1:8000", tokenizer=[0] * 10, timeout=5.0,
                              adapter_dir=adapter_dir)
    names = []
    for _ in range(2):
        engine.sync_weights(model)
        names.append(engine._served)
    return {"names": names, "posts": _Session.posts, "share": engine.share}


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


if __name__ == "__main__":
    if not SCENARIO.startswith("fsdp2_config"):  # those run under accelerate launch: the Accelerator sets up the group
        dist.init_process_group("gloo", timeout=PG_TIMEOUT)
    out = globals()[SCENARIO]()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"rank{dist.get_rank()}.json").write_text(json.dumps(out))
    dist.destroy_process_group()
