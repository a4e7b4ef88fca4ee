"""The command prefixes the multi-process tests launch with: torchrun (DDP over gloo), and accelerate launch with the
shipped FSDP2 configs through fsdp_cpu.py (parameters sharded over the ranks on CPU). Append the script, or
`-m posttrain ...`, and its arguments."""

import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FSDP2_CONFIG = REPO / "launch" / "accelerate" / "fsdp2.yaml"
FSDP2_OFFLOAD_CONFIG = REPO / "launch" / "accelerate" / "fsdp2_offload.yaml"
FSDP_CPU = Path(__file__).with_name("fsdp_cpu.py")


def _exe(name: str) -> str:
    """The venv's console script (next to this Python), else the one on PATH."""
    exe = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    assert exe, f"{name} not found"
    return exe


def torchrun(nproc: int, port: int) -> list[str]:
    return [_exe("torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(port)]


def fsdp2(nproc: int, port: int, offload: bool = False) -> list[str]:
    """launch/accelerate/fsdp2.yaml (fsdp2_offload.yaml with `offload`) at `nproc` processes and fp32 (bf16
    autocast is a GPU setting)."""
    config = FSDP2_OFFLOAD_CONFIG if offload else FSDP2_CONFIG
    return [_exe("accelerate"), "launch", "--config_file", str(config), "--num_processes", str(nproc),
            "--mixed_precision", "no", "--main_process_port", str(port), str(FSDP_CPU)]
