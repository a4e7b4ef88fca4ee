"""Peak memory of one HF-engine generate call with per-token entropies and log-probs, against the way the engine
computed them before (transformers' `output_logits=True`: every step's [rows, vocab] float logits kept, stacked,
log-softmaxed). Same model, prompts and sampling; EOS is disabled so every row generates exactly
--max-new-tokens tokens. Each variant runs in its own fresh process (so one's allocator cache does not hide the
other's peak); a thread samples the process's resident memory every 5 ms during the call, and the figure
reported is that peak minus the memory before the call (the loaded model). Prints one JSON object.

    python bench/hf_engine_memory.py                                  # SmolLM2-135M-Instruct, 16 rows x 256 tokens
    python bench/hf_engine_memory.py --model tiny-qwen2 --rows 4 --max-new-tokens 16   # smoke test
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class PeakRSS:
    def __init__(self) -> None:
        self.peak, self._stop = _rss_mb(), threading.Event()

    def __enter__(self) -> PeakRSS:
        self.start = _rss_mb()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mb())
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.thread.join()
        self.peak = max(self.peak, _rss_mb())


def child(variant: str, model_name: str, rows: int, max_new_tokens: int) -> dict:
    import torch

    import posttrain.rollout.hf as hf
    from posttrain.algos.entropy import token_entropy
    from posttrain.models import load_model, load_tokenizer
    from posttrain.rollout import HFEngine, SamplingParams

    torch.manual_seed(0)
    tok, model = load_tokenizer(model_name), load_model(model_name, "float32").eval()
    hf.eos_token_ids = lambda tokenizer, model=None: [-1]  # never stop early: exactly max_new_tokens per row
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"Tell me a long story about the number {i}."}],
                                       tokenize=False, add_generation_prompt=True) for i in range(rows)]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, seed=0, logprobs=True, entropies=True)
    engine = HFEngine(model, tok, batch_size=rows, progress=False)
    t0 = time.perf_counter()
    if variant == "engine":
        with PeakRSS() as rss:
            out = engine.generate(prompts, sampling)
        tokens = sum(len(c.token_ids) for o in out for c in o.completions)
    else:  # the engine's computation before: output_logits, stacked [rows, T, V], log-softmax of all of it
        encoded = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        width = max(map(len, encoded))
        ids = torch.tensor([[tok.pad_token_id] * (width - len(e)) + e for e in encoded])
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
        kwargs = engine._generate_kwargs(sampling)
        kwargs["eos_token_id"] = None
        with PeakRSS() as rss, torch.no_grad():
            res = model.generate(input_ids=ids, attention_mask=mask, output_logits=True, **kwargs)
            logits = torch.stack(res.logits, dim=1)
            new = res.sequences[:, width:]
            logp = torch.log_softmax(logits.float(), -1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
            ent = token_entropy(logits, 1.0)
            _ = (logp.tolist(), ent.tolist())
        tokens = int(new.numel())
    return {"variant": variant, "tokens": tokens, "seconds": round(time.perf_counter() - t0, 2),
            "rss_before_mb": round(rss.start, 1), "peak_above_model_mb": round(rss.peak - rss.start, 1),
            "vocab": int(model.config.vocab_size)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--child", choices=["engine", "output_logits"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, args.rows, args.max_new_tokens)))
        return
    results = {}
    for variant in ("output_logits", "engine"):
        cmd = [sys.executable, __file__, "--child", variant, "--model", args.model, "--rows", str(args.rows),
               "--max-new-tokens", str(args.max_new_tokens)]
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results[variant] = json.loads(line)
    before, after = results["output_logits"], results["engine"]
    report = {"model": args.model, "rows": args.rows, "max_new_tokens": args.max_new_tokens, **results,
              "peak_ratio_engine_over_output_logits": round(after["peak_above_model_mb"]
                                                            / max(before["peak_above_model_mb"], 1e-9), 3),
              "time_ratio_engine_over_output_logits": round(after["seconds"] / before["seconds"], 3)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
