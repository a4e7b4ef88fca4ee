"""Memory of one full-weight sync under DeepSpeed ZeRO-3: the whole tensors streamed one at a time
(`posttrain.distributed.full_tensors`, what the vLLM engines' syncs do now) against the whole model gathered at once
(`full_state_dict`, what they did before). A Llama of about 74M parameters (fp32, untied head) is partitioned over
two processes by accelerate (launch/accelerate/zero3.yaml); the sync's consumer copies each tensor into a whole
fp32 copy of the model allocated beforehand, as a vLLM engine's load_weights does. Each variant runs in its own
launch, and the first sync is measured (so no allocator cache hides a peak); a thread samples each rank's resident
memory every 5 ms during the sync, and the figure is that peak minus the memory before it. Prints one JSON object.

    python bench/sync_memory.py                      # about a minute on 2 CPU cores
    python bench/sync_memory.py --layers 2 --vocab 4096   # smoke test

CPU only: on GPUs the figure to read would be torch.cuda.max_memory_allocated, which this script does not measure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from hf_engine_memory import PeakRSS  # bench/ is sys.path[0] when this file runs as a script

REPO = Path(__file__).resolve().parents[1]


def child(variant: str, layers: int, hidden: int, vocab: int, out: str) -> None:
    import torch
    from accelerate import Accelerator
    from transformers import LlamaConfig, LlamaForCausalLM

    from posttrain.distributed import full_state_dict, full_tensors, loading_whole

    torch.manual_seed(0)
    # zero3.yaml leaves these to the HF Trainer ("auto"); a bare Accelerator needs them set
    os.environ["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] = "1"
    os.environ["ACCELERATE_GRADIENT_CLIPPING"] = "1.0"
    accelerator = Accelerator()
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = 1
    ds.pop("train_batch_size", None)  # DeepSpeed derives it
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=8, vocab_size=vocab, tie_word_embeddings=False)
    with loading_whole():  # built whole on each rank, partitioned by prepare() below
        model = LlamaForCausalLM(config)
    shapes = {name: p.shape for name, p in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model, optimizer = accelerator.prepare(model, optimizer)  # partitioned over the ranks
    inner = accelerator.unwrap_model(model)
    device = accelerator.device
    # the engine's own weights, resident before the sync
    sink = {name: torch.zeros(shape, device=device) for name, shape in shapes.items()}

    def sync() -> None:
        if variant == "streamed":
            for name, tensor in full_tensors(inner):
                sink[name].copy_(tensor)
        else:
            with full_state_dict(inner) as state:
                for name, tensor in state.items():
                    sink[name].copy_(tensor)

    # the first sync is the one measured: after it the allocator would serve a second from the memory it freed
    with PeakRSS() as peak:
        sync()
    extra_mb = peak.peak - peak.start
    params = sum(s.numel() for s in shapes.values())
    largest = max(s.numel() for s in shapes.values())
    record = {"rank": accelerator.process_index, "variant": variant, "extra_mb": round(extra_mb, 1),
              "model_mb": round(params * 4 / 2**20, 1), "largest_tensor_mb": round(largest * 4 / 2**20, 1),
              "parameters": params}
    Path(out, f"{variant}_rank{accelerator.process_index}.json").write_text(json.dumps(record))
    accelerator.wait_for_everyone()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--child", choices=["streamed", "whole"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.layers, args.hidden, args.vocab, args.out)
        return
    accelerate = Path(sys.executable).with_name("accelerate")
    with tempfile.TemporaryDirectory() as out:
        for variant in ("whole", "streamed"):
            cmd = [str(accelerate), "launch", "--config_file", str(REPO / "launch/accelerate/zero3.yaml"),
                   "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "29591", __file__,
                   "--child", variant, "--out", out, "--layers", str(args.layers), "--hidden", str(args.hidden),
                   "--vocab", str(args.vocab)]
            # a fixed mmap threshold: glibc otherwise raises it after the first large free and serves later tensors
            # from a heap it does not give back, so the resident peak would count freed tensors too
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "1048576"})
            if proc.returncode != 0:
                sys.exit(f"{variant} failed:\n{proc.stderr[-3000:]}")
        runs = [json.loads(p.read_text()) for p in sorted(Path(out).glob("*.json"))]
    by = {v: max(r["extra_mb"] for r in runs if r["variant"] == v) for v in ("whole", "streamed")}
    first = runs[0]
    print(json.dumps({"parameters": first["parameters"], "model_mb": first["model_mb"],
                      "largest_tensor_mb": first["largest_tensor_mb"], "processes": 2, "launch": "zero3.yaml",
                      "extra_mb_whole": by["whole"], "extra_mb_streamed": by["streamed"],
                      "ratio_streamed_to_whole": round(by["streamed"] / by["whole"], 3) if by["whole"] > 0 else None,
                      "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
