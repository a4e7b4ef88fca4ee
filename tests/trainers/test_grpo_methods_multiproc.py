"""GRPO and every entropy-control method, with LoRA and without, in two processes (torchrun, gloo on CPU) train
exactly like one process on the same global batch: BNPO's Beta fit, DCPO's fraction correct and entropy signal,
QAE's group quantile, EPO's entropy history and STEER's global max |Omega| are batch-wide, so two processes with 8
completions each match one process with 16. STEER's default max |Omega| and Clip-Cov's covariance are per
micro-batch (as in their reference code): two processes with 8 each match one process with micro-batches of 8 and
gradient accumulation 2.

The same two-process runs under accelerate's FSDP2 (launch/accelerate/fsdp2.yaml, parameters sharded over the two
ranks; tests/distributed/fsdp_cpu.py lets accelerate run it on CPU) and under DeepSpeed ZeRO-2 and ZeRO-3 (zero2.yaml,
zero3.yaml; DeepSpeed's CPU accelerator over gloo) match one process too; under FSDP2 and ZeRO-3 the trainers' own
generation (ranks whose completions end after different numbers of decoding steps) trains through; and four of the
cases match under launch/accelerate/fsdp2_offload.yaml."""

import json

import pytest
import torch

from tests.trainers.grpo_methods_worker import launch, rank_files, read

# every method's own logged statistics, compared besides the common ones and the trained weights
METHODS = {"grpo": [], "steer": ["steer/weight_mean", "steer/weight_min"], "steer_global": ["steer/weight_min"],
           "epo": ["epo/beta", "epo/corridor_fraction", "epo/entropy_traj", "epo/h_bar", "epo/smooth_penalty"],
           "dcpo": ["dcpo/p_hat", "dcpo/alpha", "dcpo/h_prev", "dcpo/temperature"],
           "bnpo": ["bnpo/alpha", "bnpo/beta"], "qae": [], "clip_cov": ["clip_cov/weight_mean", "clip_cov/weight_min"]}
COMMON = ["loss", "grad_norm", "reward", "reward_std", "entropy", "entropy/mean", "num_tokens",
          "completions/mean_length", "groups/frac_mixed"]
# one process reproduces two processes' micro-batches of 8 with gradient accumulation 2 and one generation per
# micro-batch (prompt 1's group, then prompt 2's: what rank 0 and rank 1 get). Its logged reward_std is then a mean
# of per-micro-batch standard deviations, not the gathered batch's, so it is not compared there.
PER_MICRO_BATCH = {"steer", "clip_cov"}  # with loss_type grpo (see the worker)
# also trained under launch/accelerate/fsdp2_offload.yaml (parameter shards, gradients and optimizer state on the
# CPU, the optimizer stepping there); on CPU the offload moves nothing, but FSDP2's offload path runs
OFFLOADED = ["grpo_full", "grpo_lora", "epo_full", "steer_lora"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One launch of one process, one of two (DDP) and one of two under each of FSDP2, ZeRO-2 and ZeRO-3, each
    training all 16 (method, LoRA) cases in turn; the FSDP2 and ZeRO-3 launches also train GRPO on its own
    generations; a launch under FSDP2 with CPU offload trains the OFFLOADED cases."""
    root = tmp_path_factory.mktemp("grpo_methods")
    one, two = [], []
    for method in METHODS:
        for lora in (0, 1):
            name = f"{method}_{'lora' if lora else 'full'}"
            one.append(f"{name}:{method}:{lora}:" + ("8:2" if method in PER_MICRO_BATCH else "16:1"))
            two.append(f"{name}:{method}:{lora}:8:1")
    launch(root / "one", 1, one, 29531)
    launch(root / "two", 2, two, 29532)
    launch(root / "fsdp2", 2, [*two, "generated:grpo:0:8:1:generate"], 29533, config="fsdp2")
    launch(root / "fsdp2_offload", 2, [s for s in two if s.split(":")[0] in OFFLOADED], 29534, config="fsdp2_offload")
    launch(root / "zero2", 2, two, 29545, config="zero2")
    launch(root / "zero3", 2, [*two, "generated:grpo:0:8:1:generate"], 29546, config="zero3")
    return root


CASES = [(m, lora, launched) for launched in ("two", "fsdp2", "zero2", "zero3") for lora in (False, True)
         for m in METHODS] + [(name.rsplit("_", 1)[0], name.endswith("lora"), "fsdp2_offload") for name in OFFLOADED]
SHARDED = {"fsdp2": "DistributedType.FSDP", "fsdp2_offload": "DistributedType.FSDP",
           "zero3": "DistributedType.DEEPSPEED"}  # the launches that shard the parameters over the ranks


@pytest.mark.multiproc
@pytest.mark.parametrize(("method", "lora", "launched"), CASES,
                         ids=[f"{m}-{'lora' if lora else 'full'}-{launched}" for m, lora, launched in CASES])
def test_two_processes_equal_one(runs, method, lora, launched):
    name = f"{method}_{'lora' if lora else 'full'}"
    (one, w_one), (two, w_two) = read(runs / "one" / name), read(runs / launched / name)
    ranks = rank_files(runs / launched / name)
    if launched in SHARDED:  # each rank held half the (padded) parameters: DTensor shards, ZeRO-3 partitions
        whole = json.loads((runs / "one" / name / "dist_rank0.json").read_text())["parameters"]
        assert all(r["distributed_type"] == SHARDED[launched] and r["sharded"] for r in ranks), ranks
        assert all(r["parameters"] < 0.6 * whole for r in ranks), (whole, ranks)
        assert all(r["cpu_offload"] == ([launched == "fsdp2_offload"] if launched != "zero3" else [])
                   for r in ranks), ranks
    elif launched == "zero2":  # optimizer state and gradients partitioned; the weights whole on every rank
        assert all(r["distributed_type"] == "DistributedType.DEEPSPEED" and not r["sharded"] for r in ranks), ranks
    else:
        assert not any(r["sharded"] for r in ranks), ranks
    assert len(one) == len(two) == 2
    keys = COMMON + METHODS[method]
    for step, (a, b) in enumerate(zip(one, two)):
        for k in keys:
            if k == "reward_std" and method in PER_MICRO_BATCH:
                continue  # a mean of the two micro-batches' standard deviations there
            if k == "epo/h_bar" and step == 0:
                continue  # the previous step's entropy: none at the first
            assert k in a and k in b, (k, sorted(a))
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (step, k)
    for k in METHODS[method]:
        if k not in ("steer/weight_min", "epo/h_bar", "epo/smooth_penalty", "epo/corridor_fraction",
                     "clip_cov/weight_min"):  # may be 0 or 1 by construction
            assert len({h[k] for h in one} - {0.0, 1.0}) > 0, k  # a real (not a trivial) statistic was compared
    if lora:
        assert w_one.keys() and all("lora_" in n for n in w_one)
    assert w_one.keys() == w_two.keys()
    for n in w_one:
        assert torch.allclose(w_one[n], w_two[n], atol=1e-6), (n, (w_one[n] - w_two[n]).abs().max().item())
    if lora:  # it trained: lora_B is zero at initialisation
        assert max(w_one[n].abs().max().item() for n in w_one if "lora_B" in n) > 0


@pytest.mark.multiproc
@pytest.mark.parametrize("launched", ["fsdp2", "zero3"])
def test_sharded_training_trains_on_its_own_generations(runs, launched):
    """Under FSDP2 every decoding step all-gathers the parameter shards: the two ranks' completions end after
    different numbers of steps here, and training goes through (TRL's generate keeps the ranks in step; the
    continuous-batching decoder, which would not, is not used then). Under ZeRO-3 TRL gathers the whole weights
    for generation (ds3_gather_for_generation), and the continuous-batching decoder runs on them."""
    folder = runs / launched / "generated"
    history, weights = read(folder)
    assert len(history) == 2 and all(r["sharded"] for r in rank_files(folder))
    calls = [json.loads((folder / f"lengths_rank{r}.json").read_text()) for r in range(2)]
    assert len(calls[0]) == len(calls[1]) == 2
    assert any(max(a) != max(b) for a, b in zip(*calls)), calls  # the ranks decoded different numbers of steps
    assert all(h["num_tokens"] > 0 for h in history)
    assert any(h["grad_norm"] > 0 for h in history)  # a step whose groups all scored alike has none
    assert weights and all(torch.isfinite(w).all() for w in weights.values())
