"""posttrain.distributed under two real processes (torchrun, gloo on CPU): main-process-only work that outlasts the
process group's timeout, its failure reaching every rank, FSDP2's full tensors for weight sync, the vLLM server
client's weight sync from the main process only, to every server; a recipe trained under the FSDP2 CPU-offload
config; and the shipped FSDP2 configs wrapping the decoder layers of more than one model family."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.distributed.launchers import free_port, torchrun

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("worker.py")


def _run(scenario: str, out: Path, port: int) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [*torchrun(2, port), str(WORKER), scenario, str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.multiproc
def test_other_ranks_wait_for_the_main_process_past_the_process_group_timeout(tmp_path):
    main, other = _run("main_waits_past_the_timeout", tmp_path, 29561)
    assert main["result"] == "done" and other["result"] is None
    assert other["waited"] >= 5.0  # twice the 3 s timeout, less start-up skew
    assert main["sum"] == other["sum"] == 3.0  # the collective after it succeeded on both


@pytest.mark.multiproc
def test_a_failure_on_the_main_process_stops_the_others_with_its_message(tmp_path):
    main, other = _run("main_fails", tmp_path, 29562)
    assert main["error"] == "ValueError: evaluation exploded on row 7"
    assert other["error"].startswith("RuntimeError: the main process failed during fails")
    assert "evaluation exploded on row 7" in other["error"]


@pytest.mark.multiproc
def test_fsdp2_full_state_dict_is_the_unsharded_model_on_every_rank(tmp_path):
    for rank in _run("fsdp2_full_state_dict", tmp_path, 29563):
        assert rank["needs_gather"]
        assert all(rank["equal"].values()), rank["equal"]
        assert rank["shapes"]["0.weight"] == [8, 6] and rank["local_shapes"]["0.weight"] == [4, 6]


@pytest.mark.multiproc
@pytest.mark.parametrize(("config", "family", "adapter"), [("fsdp2", "llama", "full"), ("fsdp2_offload", "qwen2", "lora")])
def test_the_fsdp2_configs_shard_every_decoder_layer_of_any_model_family(tmp_path, config, family, adapter):
    """The shipped FSDP2 configs name no layer class: accelerate wraps the model's own `_no_split_modules`, so a Llama
    (SmolLM2, Llama-3) gets one FSDP unit a decoder layer as a Qwen2 does. With the class named in the config
    (Qwen2DecoderLayer, as shipped before) preparing a Llama failed."""
    from tests.distributed import launchers

    cmd = [*launchers.accelerate(config, 2, launchers.free_port()), str(WORKER), "fsdp2_config_wraps_each_decoder_layer", str(tmp_path),
           family, adapter]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in range(2):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen == {"layer_class": f"FSDP{'Llama' if family == 'llama' else 'Qwen2'}DecoderLayer",
                        "wrapped": [True, True]}


_SLOW_REPORT = """
import atexit, os, runpy, sys, time
import posttrain.pipelines.grpo as grpo
out, rank = sys.argv.pop(1), int(os.environ["RANK"])
write_report = grpo.GRPOPipeline.write_report
def slow_report(self, ctx, outcome):  # the main process's work after training, made long
    time.sleep(8)
    write_report(self, ctx, outcome)
    open(f"{out}/report_written", "w").write(repr(time.time()))
grpo.GRPOPipeline.write_report = slow_report
atexit.register(lambda: open(f"{out}/exit{rank}", "w").write(repr(time.time())))
sys.argv = ["posttrain", *sys.argv[1:]]
runpy.run_module("posttrain", run_name="__main__", alter_sys=True)
"""


@pytest.mark.multiproc
def test_every_rank_leaves_posttrain_train_after_the_main_process_has_written_the_report(tmp_path):
    """`posttrain train` under two processes: the other rank waits for the main process's work after training (here
    a report that takes 8 s) and exits with it, not before; a rank that left early once aborted at exit (SIGABRT)
    and took the launch down after the training had succeeded."""
    script = tmp_path / "slow_report.py"
    script.write_text(_SLOW_REPORT)
    cmd = [*torchrun(2, free_port()), str(script), str(tmp_path), "train", str(REPO / "recipes/grpo/grpo.yaml"),
           "model.name_or_path=tiny-qwen2", "rollout.max_new_tokens=8", "trainer.per_device_train_batch_size=8",
           "trainer.max_steps=1", "eval.before=false", "eval.after=false", f"output_dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = float((tmp_path / "report_written").read_text())
    assert float((tmp_path / "exit1").read_text()) >= written
    assert (tmp_path / "run" / "report" / "summary.json").is_file()


@pytest.mark.multiproc
def test_server_weight_sync_runs_once_from_the_main_process(tmp_path):
    main, other = _run("server_lora_sync", tmp_path, 29564)
    assert main["names"] == other["names"]  # every rank asks the servers for the adapter rank 0 loaded
    assert main["names"][0] != main["names"][1]
    assert main["share"] == ["http://s0:8000"] and other["share"] == ["http://s1:8000"]  # a server per rank
    for server in ("s0:8000", "s1:8000"):  # each sync loads the adapter on both servers, then drops the old one
        assert [route for host, route in main["posts"] if host == server] == [
            "load_lora_adapter", "load_lora_adapter", "unload_lora_adapter"]
    assert len(main["posts"]) == 6 and other["posts"] == []


@pytest.mark.multiproc
def test_the_fsdp2_offload_config_trains_a_recipe_and_its_report_says_so(tmp_path):
    """launch/accelerate/fsdp2_offload.yaml as shipped (through tests/distributed/fsdp_cpu.py, 2 processes, fp32):
    `posttrain train` runs a GRPO recipe with the parameter shards offloaded, and the run's summary and report name
    the launch."""
    from tests.distributed import launchers

    out = tmp_path / "run"
    cmd = [*launchers.fsdp2(2, 29565, offload=True), "-m", "posttrain", "train", str(REPO / "recipes/grpo/epo.yaml"),
           "model.name_or_path=tiny-qwen2", "rollout.max_new_tokens=8", "trainer.per_device_train_batch_size=8",
           "trainer.max_steps=2", "eval.before=false", "eval.after=false", f"output_dir={out}"]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["launch"] == {"processes": 2, "distributed_type": "FSDP", "zero_stage": None, "sharding": "fsdp",
                                 "offload": ["parameters", "gradients", "optimizer state"], "device": "cpu"}
    assert ("Launch: 2 processes (FSDP, parameters sharded, parameters, gradients and optimizer state offloaded to "
            "CPU memory) on cpu") in (out / "report" / "README.md").read_text()
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history if "loss" in h] == [1, 2]
