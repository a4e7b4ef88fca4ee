"""KL from the base model on retention prompts: how far training moved the policy where it should not.

For each generated completion o of prompt x, both the evaluated model pi and the base model pi_ref are run
teacher-forced on x + o and the exact per-token KL over the full vocabulary is summed along o:

    KL_t = sum_v pi(v | x, o_<t) (log pi(v | x, o_<t) - log pi_ref(v | x, o_<t)),

at temperature 1 (the models' own distributions, whatever temperature sampled o). This is exact at
every visited context (no sampled-token estimator such as k3 is needed, and it stays >= 0), and
averages, over contexts visited by pi, to the sequence KL(pi || pi_ref) per token when o is sampled
from pi at temperature 1; with greedy decoding it is the KL along the greedy path.

With a PEFT model and no separate base model, the base is the same model with its adapter disabled:
no second copy of the weights.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from posttrain.rollout.base import GenerationOutput

__all__ = ["BaseKL", "token_kl"]


def token_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Exact KL(softmax(logits) || softmax(ref_logits)) over the last (vocabulary) dim: [B, T, V] -> [B, T]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    logq = torch.log_softmax(ref_logits.float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1).clamp_min(0.0)


class BaseKL:
    """Callable for `evaluate_suite(kl_scorer=...)`: per completion, (sum of KL_t over its tokens, #tokens)."""

    def __init__(self, model: Any, base_model: Any | None = None, batch_size: int = 4):
        if base_model is None and not hasattr(model, "disable_adapter"):
            raise ValueError("KL from the base model needs base_model, or a PEFT model whose adapter can be disabled")
        self.model, self.base_model, self.batch_size = model, base_model, batch_size

    def _logits(self, model: Any, ids: torch.Tensor, mask: torch.Tensor, adapter_off: bool) -> torch.Tensor:
        ctx = model.disable_adapter() if adapter_off else nullcontext()
        with ctx:
            return model(input_ids=ids, attention_mask=mask).logits

    @torch.no_grad()
    def __call__(self, outputs: list[GenerationOutput]) -> list[list[tuple[float, int]]]:
        seqs = [(o.prompt_token_ids, c.token_ids) for o in outputs for c in o.completions]
        per_seq: list[tuple[float, int]] = []
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(seqs), self.batch_size):
                batch = seqs[start : start + self.batch_size]
                width = max(len(p) + len(c) for p, c in batch)
                ids = torch.zeros(len(batch), width, dtype=torch.long, device=device)
                mask = torch.zeros_like(ids)
                for b, (p, c) in enumerate(batch):  # right padding: positions need no shifting
                    ids[b, : len(p) + len(c)] = torch.tensor(p + c, device=device)
                    mask[b, : len(p) + len(c)] = 1
                logits = self._logits(self.model, ids, mask, adapter_off=False)
                if self.base_model is not None:
                    ref = self._logits(self.base_model, ids.to(next(self.base_model.parameters()).device),
                                       mask.to(next(self.base_model.parameters()).device), False).to(device)
                else:
                    ref = self._logits(self.model, ids, mask, adapter_off=True)
                kl = token_kl(logits[:, :-1], ref[:, :-1])  # position t predicts token t + 1
                for b, (p, c) in enumerate(batch):
                    if not c:
                        per_seq.append((0.0, 0))
                        continue
                    span = kl[b, len(p) - 1 : len(p) - 1 + len(c)]
                    per_seq.append((float(span.sum()), len(c)))
        finally:
            self.model.train(was_training)
        out, i = [], 0
        for o in outputs:
            out.append(per_seq[i : i + len(o.completions)])
            i += len(o.completions)
        return out
