"""Held-out preference pairs: the sequence log-probabilities of the chosen and rejected responses under a policy
(and its reference), and the pair metrics DPO-style training is judged by.

For pair i with chosen y_w and rejected y_l, log pi(y | x) is summed over the response tokens, tokenized as
TRL's DPOTrainer tokenizes them (the chat template of the prompt with its generation prompt, and of prompt +
response; the response is what follows their common prefix; plain-text pairs get an EOS). With a reference
pi_ref (the model before training, the adapter disabled, or a base model), d = log pi - log pi_ref and:

    logps/chosen, logps/rejected        mean log pi(y_w), log pi(y_l)
    logps/chosen_change, .._change      mean d_w, d_l: below 0 for the chosen is likelihood displacement
    chosen_up                           fraction of pairs with d_w > 0
    reward_accuracy                     fraction with d_w > d_l (DPO's implicit reward beta d ranks y_w first;
                                        as TRL's rewards/accuracies, independent of beta)
    margin                              mean d_w - d_l (TRL's rewards/margins / beta)

Standard errors are over pairs. The same code serves the training report (before / after) and `posttrain eval`
(a suite entry of `kind: pairs`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from posttrain.eval.metrics import mean_stderr

__all__ = ["PairLogps", "evaluate_pair_entry", "evaluate_pairs", "pair_logps", "pair_metrics", "tokenize_pair"]

PairLogps = tuple[list[float], list[float]]  # (chosen [N], rejected [N])


def tokenize_pair(tokenizer: Any, row: dict[str, Any]) -> dict[str, list[int]]:
    """`prompt_ids`, `chosen_ids`, `rejected_ids` of one explicit-prompt pair, as TRL 1.16's DPOTrainer makes them."""
    from trl.data_utils import _tokenize, common_prefix_length, is_conversational

    prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    kwargs: dict[str, Any] = {}
    if is_conversational(row):
        kwargs = {"add_generation_prompt": True}
    else:
        eos = tokenizer.eos_token or ""
        chosen, rejected = (c if c.endswith(eos) else c + eos for c in (chosen, rejected))
    prompt_ids = _tokenize(tokenizer, prompt, **kwargs)["input_ids"]
    chosen_all = _tokenize(tokenizer, prompt + chosen)["input_ids"]
    rejected_all = _tokenize(tokenizer, prompt + rejected)["input_ids"]
    n = min(common_prefix_length(prompt_ids, chosen_all), common_prefix_length(prompt_ids, rejected_all))
    return {"prompt_ids": list(prompt_ids[:n]), "chosen_ids": list(chosen_all[n:]),
            "rejected_ids": list(rejected_all[n:])}


@torch.no_grad()
def pair_logps(model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]], batch_size: int = 8,
               adapter_off: bool = False) -> PairLogps:
    """Sequence log-probabilities of every pair's chosen and rejected response under `model` (a PEFT model with
    `adapter_off`: its base). Teacher-forced, right-padded batches of `batch_size` pairs, eval mode."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = DataCollatorForPreference(pad_token_id=pad)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chosen: list[float] = []
    rejected: list[float] = []
    try:
        with model.disable_adapter() if adapter_off else contextlib.nullcontext():
            for start in range(0, len(rows), batch_size):
                batch = collate([tokenize_pair(tokenizer, r) for r in rows[start : start + batch_size]])
                ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
                logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
                targets = ids[:, 1:]
                token = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
                seq = (token * batch["completion_mask"][:, 1:].to(device)).sum(-1).cpu()
                c, r = seq.chunk(2)
                chosen += c.tolist()
                rejected += r.tolist()
    finally:
        model.train(was_training)
    return chosen, rejected


def pair_metrics(policy: PairLogps, reference: PairLogps | None = None) -> tuple[dict[str, Any], dict[str, float]]:
    """(metrics, stderr) of the pairs (see the module docstring); the change-based ones need `reference`."""
    chosen, rejected = policy
    metrics: dict[str, Any] = {"n_pairs": len(chosen)}
    stderr: dict[str, float] = {}

    def put(name: str, values: Sequence[float]) -> None:
        metrics[name], stderr[name] = mean_stderr(list(values))

    put("logps/chosen", chosen)
    put("logps/rejected", rejected)
    if reference is not None:
        d_w = [a - b for a, b in zip(chosen, reference[0], strict=True)]
        d_l = [a - b for a, b in zip(rejected, reference[1], strict=True)]
        put("logps/chosen_change", d_w)
        put("logps/rejected_change", d_l)
        put("chosen_up", [float(d > 0) for d in d_w])
        put("reward_accuracy", [float(w > lo) for w, lo in zip(d_w, d_l)])
        put("margin", [w - lo for w, lo in zip(d_w, d_l)])
    return metrics, stderr


def evaluate_pairs(model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]], samples_path: str | Path, *,
                   reference: PairLogps | None = None, reference_model: Any = None, batch_size: int = 8
                   ) -> dict[str, Any]:
    """Pair metrics of `model` on `rows`, with the reference log-probs given (`reference`), or computed with
    `reference_model`, or with `model`'s adapter disabled when it is a PEFT model, or none. Writes one record per
    pair to `samples_path` and returns {"kind": "pairs", "metrics", "stderr", "logps": {"policy", "reference"}}.
    """
    policy = pair_logps(model, tokenizer, rows, batch_size)
    if reference is None and reference_model is not None:
        reference = pair_logps(reference_model, tokenizer, rows, batch_size)
    elif reference is None and hasattr(model, "disable_adapter"):
        reference = pair_logps(model, tokenizer, rows, batch_size, adapter_off=True)
    metrics, stderr = pair_metrics(policy, reference)
    path = Path(samples_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            rec = {"index": i, "id": row.get("id", str(i)), "logp_chosen": policy[0][i], "logp_rejected": policy[1][i]}
            if reference is not None:
                rec.update(ref_logp_chosen=reference[0][i], ref_logp_rejected=reference[1][i])
            f.write(json.dumps(rec) + "\n")
    return {"kind": "pairs", "metrics": metrics, "stderr": stderr, "samples_file": path.name,
            "logps": {"policy": policy, "reference": reference}}


def evaluate_pair_entry(model: Any, tokenizer: Any, entry: Any, path: str | None, samples_path: str | Path, *,
                        reference_model: Any = None, batch_size: int = 8) -> dict[str, Any]:
    """A suite entry of `kind: pairs` (`posttrain eval`): the pairs at `path` (first `entry.limit`), checked row
    by row, through `evaluate_pairs`."""
    from posttrain.data.preferences import PreferenceSource, preference_rows

    if model is None:
        raise ValueError(f"task {entry.name!r} (kind pairs) needs the transformers model (hf_model)")
    if path is None:
        raise ValueError(f"task {entry.name!r} (kind pairs) has no pair file: set its path, or give "
                         f"--path {entry.name}=FILE")
    rows = preference_rows(PreferenceSource(path=path, limit=entry.limit))
    result = evaluate_pairs(model, tokenizer, rows, samples_path, reference_model=reference_model,
                            batch_size=batch_size)
    return {"backend": "posttrain", "data": path, **result}
