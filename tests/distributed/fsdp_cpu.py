"""Run a script, or `-m posttrain ...`, under accelerate's FSDP2 on CPU (gloo), for tests:

    torchrun --nproc_per_node 2 tests/distributed/fsdp_cpu.py SCRIPT ARGS...
    torchrun --nproc_per_node 2 tests/distributed/fsdp_cpu.py -m posttrain train RECIPE trainer.fsdp=... ...

torch's FSDP2 (`fully_shard`) runs on CPU over gloo, but accelerate turns its FSDP plugin on only from a GPU-type
distributed state: on CPU (MULTI_CPU) it ignores the plugin and trains plain DDP, and posttrain's recipe check
refuses a sharded recipe there for that reason. This launcher labels the gloo state MULTI_GPU before anything
builds an Accelerator, so accelerate prepares the model with its own FSDP2 path (`fsdp2_prepare_model`: DTensor
shards, all-gathers in every forward) while every tensor stays on the CPU, and lifts that recipe check. Under
launch/accelerate/fsdp2_offload.yaml the CPUOffloadPolicy accelerate builds does not pin memory (pinning needs an
accelerator; the shards are on the CPU already). Nothing else is changed: the trainers, TRL and accelerate run
their FSDP code as on GPUs.
"""

import dataclasses
import runpy
import sys

from accelerate.state import PartialState
from accelerate.utils import DistributedType
from torch.distributed import fsdp

_init = PartialState.__init__


def _init_as_gpu_type(self, *args, **kwargs) -> None:
    _init(self, *args, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.MULTI_GPU  # what AcceleratorState needs to turn on the FSDP plugin


PartialState.__init__ = _init_as_gpu_type


@dataclasses.dataclass
class _UnpinnedCPUOffloadPolicy(fsdp.CPUOffloadPolicy):
    pin_memory: bool = False  # pinned memory needs an accelerator; on CPU the shards stay where they are anyway


fsdp.CPUOffloadPolicy = _UnpinnedCPUOffloadPolicy  # what accelerate builds for fsdp_offload_params: true

import posttrain.recipe  # noqa: E402 - after the patch, as the run would import it

posttrain.recipe._has_accelerator = lambda: True  # the sharded launch is real here (see above)

if __name__ == "__main__":
    if sys.argv[1] == "-m":
        sys.argv = [sys.argv[2], *sys.argv[3:]]
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    else:
        sys.argv = sys.argv[1:]
        runpy.run_path(sys.argv[0], run_name="__main__")
