"""The command prefixes the multi-process tests launch with: torchrun (DDP over gloo), and accelerate launch with a
shipped config from launch/accelerate/ (FSDP2's through fsdp_cpu.py, so that the parameters are sharded over the
ranks on CPU; DeepSpeed's as they are: DeepSpeed runs on its CPU accelerator over gloo). Append the script, or
`-m posttrain ...`, and its arguments."""

import shutil
import socket
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "launch" / "accelerate"
FSDP_CPU = Path(__file__).with_name("fsdp_cpu.py")


def _exe(name: str) -> str:
    """The venv's console script (next to this Python), else the one on PATH."""
    exe = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    assert exe, f"{name} not found"
    return exe


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a server or a rendezvous the test starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(nproc: int, port: int) -> list[str]:
    return [_exe("torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(port)]


def accelerate(config: str, nproc: int, port: int) -> list[str]:
    """launch/accelerate/<config>.yaml at `nproc` processes and fp32 (bf16 autocast is a GPU setting)."""
    cmd = [_exe("accelerate"), "launch", "--config_file", str(CONFIGS / f"{config}.yaml"), "--num_processes",
           str(nproc), "--mixed_precision", "no", "--main_process_port", str(port)]
    return [*cmd, str(FSDP_CPU)] if config.startswith("fsdp") else cmd


def fsdp2(nproc: int, port: int, offload: bool = False) -> list[str]:
    """launch/accelerate/fsdp2.yaml (fsdp2_offload.yaml with `offload`)."""
    return accelerate("fsdp2_offload" if offload else "fsdp2", nproc, port)
