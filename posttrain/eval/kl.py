"""KL from the base model on retention prompts: how far training moved the policy where it should not.

For each generated completion o of prompt x, both the evaluated model pi and the base model pi_ref are run
teacher-forced on x + o and the exact per-token KL over the full vocabulary is summed along o:

    KL_t = sum_v pi(v | x, o_<t) (log pi(v | x, o_<t) - log pi_ref(v | x, o_<t)),

at temperature 1 (the models' own distributions, whatever temperature sampled o). This is exact at
every visited context (no sampled-token estimator such as k3 is needed, and it stays >= 0), and
averages, over contexts visited by pi, to the sequence KL(pi || pi_ref) per token when o is sampled
from pi at temperature 1; with greedy decoding it is the KL along the greedy path.

With a PEFT model and no separate base model, the base is the same model with its adapter disabled:
no second copy of the weights. Memory: the sequences are left-padded so every completion ends at the right
edge; only the last (longest completion) positions are projected to logits (`logits_to_keep`), and the KL is
taken in chunks of positions (`token_kl_chunked`), so nothing of size [batch, prompt + completion, vocab]
is ever held, and no second full log-softmax.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from typing import Any

import torch

from posttrain.rollout.base import GenerationOutput

__all__ = ["BaseKL", "token_kl", "token_kl_chunked"]

CHUNK_POSITIONS = 256  # positions per KL chunk: chunk x vocab float32 temporaries


def token_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Exact KL(softmax(logits) || softmax(ref_logits)) over the last (vocabulary) dim: [..., V] -> [...].

    KL = sum_v p_v (z_v - q_v) - logsumexp(z) + logsumexp(q): one softmax, no log-softmax of either side."""
    z, q = logits.float(), ref_logits.float()
    p = torch.softmax(z, dim=-1)
    return ((p * (z - q)).sum(-1) - torch.logsumexp(z, dim=-1) + torch.logsumexp(q, dim=-1)).clamp_min(0.0)


def token_kl_chunked(logits: torch.Tensor, ref_logits: torch.Tensor, chunk: int = CHUNK_POSITIONS) -> torch.Tensor:
    """`token_kl` over the positions of `[B, T, V]` logits, `chunk` positions at a time: `[B, T]`."""
    b, t, v = logits.shape
    flat, ref = logits.reshape(-1, v), ref_logits.reshape(-1, v)
    out = [token_kl(flat[i : i + chunk], ref[i : i + chunk]) for i in range(0, flat.shape[0], chunk)]
    return torch.cat(out).view(b, t) if out else logits.new_zeros(b, t)


class BaseKL:
    """Callable for `evaluate_suite(kl_scorer=...)`: per completion, (sum of KL_t over its tokens, #tokens)."""

    def __init__(self, model: Any, base_model: Any | None = None, batch_size: int = 4):
        if base_model is None and not hasattr(model, "disable_adapter"):
            raise ValueError("KL from the base model needs base_model, or a PEFT model whose adapter can be disabled")
        self.model, self.base_model, self.batch_size = model, base_model, batch_size

    def _logits(self, model: Any, ids: torch.Tensor, mask: torch.Tensor, keep: int, adapter_off: bool) -> torch.Tensor:
        """Logits of the last `keep` positions (left-padded batch: position ids from the mask)."""
        ctx = model.disable_adapter() if adapter_off else nullcontext()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        forward = model.get_base_model().forward if hasattr(model, "get_base_model") else model.forward
        if "logits_to_keep" in inspect.signature(forward).parameters:
            kwargs["logits_to_keep"] = keep
        with ctx:
            return model(**kwargs).logits[:, -keep:]

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
                keep = max(len(c) for _, c in batch) + 1  # position t predicts token t + 1
                ids = torch.zeros(len(batch), width, dtype=torch.long, device=device)
                mask = torch.zeros_like(ids)
                for b, (p, c) in enumerate(batch):  # left padding: every completion ends at the right edge
                    ids[b, width - len(p) - len(c) :] = torch.tensor(p + c, device=device)
                    mask[b, width - len(p) - len(c) :] = 1
                logits = self._logits(self.model, ids, mask, keep, adapter_off=False)
                if self.base_model is not None:
                    base_device = next(self.base_model.parameters()).device
                    ref = self._logits(self.base_model, ids.to(base_device), mask.to(base_device), keep,
                                       False).to(device)
                else:
                    ref = self._logits(self.model, ids, mask, keep, adapter_off=True)
                kl = token_kl_chunked(logits[:, :-1], ref[:, :-1])  # [B, keep - 1]: the last keep - 1 tokens
                for b, (_, c) in enumerate(batch):
                    if not c:
                        per_seq.append((0.0, 0))
                        continue
                    per_seq.append((float(kl[b, kl.shape[1] - len(c) :].sum()), len(c)))
        finally:
            self.model.train(was_training)
        out, i = [], 0
        for o in outputs:
            out.append(per_seq[i : i + len(o.completions)])
            i += len(o.completions)
        return out
