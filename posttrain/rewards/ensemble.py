"""The reward-model ensemble: loading the K members that `method: reward_ensemble` trained, scoring batches of
(prompt, completion) with all of them, and the GRPO reward function `rm_ensemble`.

A trained ensemble is a folder with `ensemble.json` (form, members, seeds, base model) and one folder per member:
- `full`: each member is a complete sequence-classification model (K models in memory, K forward passes);
- `lora`: one frozen base and K LoRA adapters, each with its own copy of the reward head (one base in memory;
  K plain forward passes, each with one member's adapter merged into the weights for the call only);
- `heads`: one frozen base and K linear heads on its last hidden state; the K heads are stacked into one
  [K, H] head, so one forward pass of the base scores all K members.
The token ids a member scores are built exactly as TRL's RewardTrainer builds its training inputs (the chat
template over prompt + completion for conversational data; prompt + completion + EOS for plain text).

    from posttrain.rewards.ensemble import RewardEnsemble
    ens = RewardEnsemble.from_pretrained("outputs/rm_ensemble")
    agg, scores = ens(prompts, completions, how="wco")     # [N], [K, N]

torch, transformers and peft are imported when an ensemble is loaded, not with this module.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posttrain.models.prefix import common_prefix_length, repeat_cache
from posttrain.rewards import RewardFunc, register_reward

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    import torch

__all__ = ["ENSEMBLE_FILE", "FORMS", "HEAD_FILE", "EnsembleManifest", "RewardEnsemble", "load_reward_model",
           "load_head", "pooled_outputs", "reward_head", "reward_input_ids", "save_head", "sequence_scores",
           "calibration_stats", "rm_ensemble"]

ENSEMBLE_FILE = "ensemble.json"
HEAD_FILE = "head.safetensors"
FORMS = ("full", "lora", "heads")
HEAD_NAMES = ("score", "classifier")  # the reward head of transformers' sequence-classification models


@dataclass
class EnsembleManifest:
    """`ensemble.json`: what `RewardEnsemble.from_pretrained` needs to rebuild the members.

    `members` are folders relative to the ensemble folder; `base` is the model the `lora` and `heads` members
    sit on (as the recipe named it: a named model, a Hub id or a path), with its loading options."""

    form: str
    members: list[str]
    seeds: list[int]
    base: str | None = None
    base_options: dict[str, Any] = field(default_factory=dict)  # dtype, revision, gguf_file, trust_remote_code
    method: str = "reward_ensemble"
    # each member's score mean and standard deviation on reference responses (`calibration_stats`), written after
    # training; the aggregates standardise with it (RewardEnsemble.standardize)
    calibration: dict[str, Any] | None = None

    @property
    def k(self) -> int:
        return len(self.members)

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / ENSEMBLE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**asdict(self), "k": self.k}, indent=2))
        return path

    @classmethod
    def read(cls, folder: str | Path) -> EnsembleManifest:
        path = Path(folder) / ENSEMBLE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {folder} is not a reward-model folder (train one with "
                                    "`method: reward` or `method: reward_ensemble`)")
        data = json.loads(path.read_text())
        data.pop("k", None)
        try:
            manifest = cls(**data)
        except TypeError as err:
            raise ValueError(f"{path}: {err}") from None
        if manifest.form not in FORMS:
            raise ValueError(f"{path}: form must be one of {', '.join(FORMS)}, got {manifest.form!r}")
        if not manifest.members or len(manifest.seeds) != len(manifest.members):
            raise ValueError(f"{path}: needs one seed per member, got {len(manifest.members)} members and "
                             f"{len(manifest.seeds)} seeds")
        if manifest.form != "full" and not manifest.base:
            raise ValueError(f"{path}: form {manifest.form!r} needs the base model (key 'base')")
        cal = manifest.calibration
        if cal is not None and not (isinstance(cal, dict) and all(
                isinstance(cal.get(key), list) and len(cal[key]) == manifest.k for key in ("mean", "std"))):
            raise ValueError(f"{path}: 'calibration' needs lists 'mean' and 'std' with one value per member "
                             f"({manifest.k})")
        return manifest


def calibration_stats(scores: torch.Tensor, source: str) -> dict[str, Any]:
    """Per-member mean and population standard deviation of `scores [K, M]` (M reference responses).

    A Bradley-Terry reward model is defined only up to an additive constant: its loss sees score differences
    within a pair, so two members trained with different seeds can be offset by any amount. Across members, only
    standardised scores are comparable; on raw ones WCO's minimum follows whichever member has the lowest offset
    and UWO's variance measures the offsets. A zero deviation (a constant member) is stored as 1."""
    import torch

    mean = scores.double().mean(dim=1)
    std = scores.double().std(dim=1, correction=0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return {"mean": mean.tolist(), "std": std.tolist(), "source": source, "n": int(scores.shape[1])}


# --- models and heads -----------------------------------------------------------------------------------


def load_reward_model(name_or_path: str, num_labels: int = 1, dtype: str = "auto", revision: str | None = None,
                      gguf_file: str | None = None, trust_remote_code: bool = False,
                      attn_implementation: str | None = None) -> Any:
    """A sequence-classification model (reward head with `num_labels` outputs) from a named model, Hub id, local
    folder or GGUF file; a head missing from the checkpoint (a causal LM) is freshly initialised."""
    from transformers import AutoModelForSequenceClassification
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    from posttrain.models.loading import load_auto_model

    with suppress_seqcls_warning():  # "score.weight newly initialised" is expected when the base is a causal LM
        return load_auto_model(AutoModelForSequenceClassification, name_or_path, dtype, gguf_file, revision,
                               trust_remote_code, attn_implementation, num_labels=num_labels)


def reward_head(model: Any) -> tuple[str, Any]:
    """(attribute name, module) of a sequence-classification model's reward head (`score` or `classifier`)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name in HEAD_NAMES:
        head = getattr(inner, name, None)
        if head is not None:
            return name, head
    raise ValueError(f"{type(inner).__name__} has no reward head (expected an attribute {' or '.join(HEAD_NAMES)})")


def save_head(model: Any, folder: str | Path, seed: int) -> Path:
    """Write the reward head of `model` to `folder/head.safetensors` (what a `heads` member is)."""
    from safetensors.torch import save_file

    name, head = reward_head(model)
    tensors = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    path = Path(folder) / HEAD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"head": name, "seed": str(seed)})
    return path


def load_head(path: Path, hidden_size: int) -> dict[str, Any]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"reward head not found: {path} (a `heads` member folder holds {HEAD_FILE})")
    tensors = load_file(str(path))
    weight = tensors.get("weight")
    if weight is None or weight.dim() != 2 or weight.shape != (1, hidden_size):
        shape = None if weight is None else tuple(weight.shape)
        raise ValueError(f"{path}: expected a head weight of shape (1, {hidden_size}) for the base model, got {shape}")
    return tensors


def reward_input_ids(tokenizer: Any, prompts: Sequence[Any], completions: Sequence[Any]) -> list[list[int]]:
    """Token ids of each (prompt, completion) as TRL's RewardTrainer tokenizes a chosen/rejected response:
    conversational (message lists): the chat template over prompt + completion; plain text: prompt + completion,
    EOS appended when missing, tokenized with the tokenizer's special tokens."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if not prompts:
        return []
    conversational = [isinstance(p, list) for p in prompts]
    if all(conversational):
        if not all(isinstance(c, list) for c in completions):
            raise TypeError("conversational prompts need conversational completions (lists of messages)")
        messages = [list(p) + list(c) for p, c in zip(prompts, completions)]
        return [list(ids) for ids in tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)[
            "input_ids"]]
    if any(conversational) or not all(isinstance(c, str) for c in completions):
        raise TypeError("prompts and completions must all be strings or all be lists of chat messages")
    eos = tokenizer.eos_token
    texts = [p + c + ("" if c.endswith(eos) else eos) for p, c in zip(prompts, completions)]
    return [list(ids) for ids in tokenizer(texts)["input_ids"]]


MIN_SHARED_PREFIX = 8  # tokens a batch must share before its prefix gets a forward of its own


def pooled_outputs(fn: Any, ids: Sequence[Sequence[int]], pad_token_id: int, device: Any,
                   batch_size: int, share_prefix: bool = True) -> torch.Tensor:
    """[N, D] float32: `fn(input_ids, attention_mask, past_key_values) -> [B, D]` over N token sequences,
    `batch_size` at a time, padded on the right; rows in input order. No gradient.

    Sequences are batched in token order, so those that share a prompt (the n completions of one prompt in GRPO
    or best-of-n) and those that share a chat template's opening sit together. With `share_prefix`, a batch's
    common prefix (at least MIN_SHARED_PREFIX tokens, and at least one token of every sequence after it that is
    not padding, so the head still pools at the same token) runs once, and the batch continues from a copy of its
    key/value cache: a prompt's forward is not repeated for each of its completions. Without it (or when `fn` is
    given no cache, past_key_values None), each sequence runs whole."""
    import torch
    from torch.nn.utils.rnn import pad_sequence

    n = len(ids)
    order = sorted(range(n), key=lambda i: list(ids[i]))
    parts: list[torch.Tensor] = []
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            batch = [list(ids[i]) for i in order[start : start + batch_size]]
            p = common_prefix_length(batch) if share_prefix and len(batch) > 1 else 0
            p = min(p, min(len(s) for s in batch) - 1)
            if p >= MIN_SHARED_PREFIX and all(any(t != pad_token_id for t in s[p:]) for s in batch):
                parts.append(_with_prefix(fn, batch, p, pad_token_id, device).float().cpu())
                continue
            seqs = [torch.as_tensor(s, dtype=torch.long) for s in batch]
            input_ids = pad_sequence(seqs, batch_first=True, padding_value=pad_token_id)
            attention = pad_sequence([torch.ones_like(x) for x in seqs], batch_first=True)
            parts.append(fn(input_ids.to(device), attention.to(device), None).float().cpu())
    if not parts:
        return torch.empty(0, 0)
    out = torch.empty(n, parts[0].shape[1])
    out[torch.as_tensor(order)] = torch.cat(parts)
    return out


def _with_prefix(fn: Any, batch: list[list[int]], p: int, pad_token_id: int, device: Any) -> torch.Tensor:
    """`fn` over `batch`, whose first `p` tokens are the same in every sequence: the prefix once, then the rest."""
    import torch
    from torch.nn.utils.rnn import pad_sequence
    from transformers import DynamicCache

    prefix = torch.tensor([batch[0][:p]], device=device)
    cache = DynamicCache()
    fn(prefix, torch.ones_like(prefix), cache)
    b = len(batch)
    cache = repeat_cache(cache, b)
    rest = [torch.as_tensor(s[p:], dtype=torch.long) for s in batch]
    input_ids = pad_sequence(rest, batch_first=True, padding_value=pad_token_id).to(device)
    attention = pad_sequence([torch.ones_like(x) for x in rest], batch_first=True).to(device)
    attention = torch.cat([attention.new_ones(b, p), attention], dim=1)
    return fn(input_ids, attention, cache)


# --- the ensemble -----------------------------------------------------------------------------------------


class RewardEnsemble:
    """K reward models behind one call: `scores(prompts, completions) -> [K, N]`, and `__call__` adds the aggregate.

    Build it with `from_pretrained(folder)`; `members=[0]` keeps a subset (one member: a single reward model).
    Batches are formed in token order and padded on the right, `batch_size` sequences at a time; a batch's shared
    prefix (the prompt of several completions, a chat template's opening) runs once (`pooled_outputs`)."""

    def __init__(self, manifest: EnsembleManifest, tokenizer: Any, models: list[Any], adapters: list[str] | None,
                 path: Path, batch_size: int = 16, normalize: bool = True):
        self.manifest = manifest
        self.tokenizer = tokenizer
        self.models = models  # full: K models; lora: [PeftModel with K adapters]; heads: [model with a K-wide head]
        self.adapters = adapters
        self.path = path
        self.batch_size = batch_size
        self.normalize = normalize
        if normalize and manifest.calibration is None:
            logger.warning("%s: ensemble.json has no calibration (trained before posttrain wrote one), so the "
                           "aggregates use raw member scores, whose offsets are arbitrary; RewardEnsemble.calibrate"
                           "(prompts, completions) and save_calibration() add one", path)

    @property
    def form(self) -> str:
        return self.manifest.form

    @property
    def k(self) -> int:
        return self.manifest.k

    @property
    def seeds(self) -> list[int]:
        return list(self.manifest.seeds)

    @property
    def device(self) -> torch.device:
        return next(self.models[0].parameters()).device

    def to(self, device: Any) -> RewardEnsemble:
        for m in self.models:
            m.to(device)
        return self

    def num_parameters(self) -> int:
        """Parameters held in memory (the base counted once in the `lora` and `heads` forms)."""
        return sum(p.numel() for m in self.models for p in m.parameters())

    @classmethod
    def from_pretrained(cls, path: str | Path, members: Sequence[int] | None = None, device: Any = None,
                        dtype: str | None = None, batch_size: int = 16, normalize: bool = True) -> RewardEnsemble:
        """Load the ensemble (or single reward model) trained into `path`. `dtype` defaults to the training dtype.
        `normalize` (default) aggregates standardised member scores (`standardize`); False aggregates raw ones.
        Raises naming the path when a member folder, its weights or its reward head is missing or malformed."""
        from posttrain.models import load_tokenizer

        folder = Path(path)
        manifest = EnsembleManifest.read(folder)
        if members is not None:
            bad = [i for i in members if not 0 <= i < manifest.k]
            if bad or not members:
                raise ValueError(f"{folder / ENSEMBLE_FILE}: members {list(members)} not in 0..{manifest.k - 1}")
            cal = manifest.calibration
            if cal is not None:
                cal = {**cal, "mean": [cal["mean"][i] for i in members], "std": [cal["std"][i] for i in members]}
            manifest = EnsembleManifest(manifest.form, [manifest.members[i] for i in members],
                                        [manifest.seeds[i] for i in members], manifest.base, manifest.base_options,
                                        manifest.method, cal)
        dirs = [folder / m for m in manifest.members]
        for d in dirs:
            if not d.is_dir():
                raise FileNotFoundError(f"reward ensemble member folder not found: {d} (listed in "
                                        f"{folder / ENSEMBLE_FILE})")
        options = dict(manifest.base_options)
        if dtype is not None:
            options["dtype"] = dtype
        tokenizer = load_tokenizer(str(folder) if (folder / "tokenizer_config.json").is_file() else str(dirs[0]))
        loader = {"full": _load_full, "lora": _load_lora, "heads": _load_heads}[manifest.form]
        models, adapters = loader(manifest, dirs, options)
        for m in models:
            m.config.pad_token_id = tokenizer.pad_token_id  # the head pools at the last non-pad token
            m.eval()
        ensemble = cls(manifest, tokenizer, models, adapters, folder, batch_size, normalize)
        return ensemble.to(device) if device is not None else ensemble

    def _scorers(self) -> Iterator[Any]:
        """One function per pass over the data, `(input_ids, attention_mask) -> [B, d]` scores of d members."""
        if self.form == "heads":  # one pass: the stacked [K, H] head gives all K scores
            yield partial(sequence_scores, self.models[0])
        elif self.form == "full":
            for model in self.models:
                yield partial(sequence_scores, model)
        else:
            for name in self.adapters or []:
                yield _merged_lora_scorer(self.models[0], name)

    def score_ids(self, ids: Sequence[Sequence[int]], batch_size: int | None = None) -> torch.Tensor:
        """[K, N] float32 scores of N token sequences (any order; results in input order)."""
        import torch

        if not ids:
            return torch.empty(self.k, 0)
        size, pad = batch_size or self.batch_size, self.tokenizer.pad_token_id
        return torch.cat([pooled_outputs(fn, ids, pad, self.device, size) for fn in self._scorers()], dim=1).T

    def scores(self, prompts: Sequence[Any], completions: Sequence[Any], batch_size: int | None = None) -> torch.Tensor:
        """[K, N]: every member's raw score of each (prompt, completion); strings or chat messages, as in training."""
        return self.score_ids(reward_input_ids(self.tokenizer, prompts, completions), batch_size)

    def standardize(self, scores: torch.Tensor) -> torch.Tensor:
        """`scores [K, ...]` in each member's standard units, (s - mean_k) / std_k with the calibration of
        ensemble.json, when `normalize` is on and a calibration exists (`calibration_stats` says why); otherwise
        the scores unchanged. A member's own ranking of responses is the same either way."""
        import torch

        cal = self.manifest.calibration
        if not self.normalize or cal is None:
            return scores
        shape = (-1,) + (1,) * (scores.dim() - 1)  # members first: [K, N], or [K, prompts, samples]
        mean = torch.tensor(cal["mean"], dtype=scores.dtype, device=scores.device).view(shape)
        std = torch.tensor(cal["std"], dtype=scores.dtype, device=scores.device).view(shape)
        return (scores - mean) / std

    def calibrate(self, prompts: Sequence[Any], completions: Sequence[Any], source: str = "given responses") -> dict:
        """Set the calibration from the members' raw scores of these reference responses (`save_calibration`
        writes it to ensemble.json)."""
        self.manifest.calibration = calibration_stats(self.scores(prompts, completions), source)
        return self.manifest.calibration

    def save_calibration(self) -> Path:
        return self.manifest.write(self.path)

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], how: str = "mean",
                 uwo_lambda: float = 0.5, batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(aggregate [N], member scores [K, N]); `how` is a registered aggregate (mean, wco, uwo). The aggregate
        is of the standardised scores (`standardize`), the member scores returned are raw."""
        from posttrain.algos.ensembles import aggregate

        scores = self.scores(prompts, completions, batch_size)
        return aggregate(self.standardize(scores), how, uwo_lambda), scores


def _model_kwargs(input_ids: Any, attention_mask: Any, past_key_values: Any) -> dict[str, Any]:
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if past_key_values is not None:  # continue from a shared prefix's cache (pooled_outputs)
        kwargs.update(past_key_values=past_key_values, use_cache=True)
    return kwargs


def sequence_scores(model: Any, input_ids: Any, attention_mask: Any, past_key_values: Any = None) -> Any:
    """A sequence-classification model's scores `[B, num_labels]`, at the last non-pad token of each row."""
    return model(**_model_kwargs(input_ids, attention_mask, past_key_values)).logits


def _load_full(manifest: EnsembleManifest, dirs: list[Path], options: dict[str, Any]) -> tuple[list[Any], None]:
    models = []
    for d in dirs:
        if not (d / "config.json").is_file():
            raise FileNotFoundError(f"{d}: no config.json, not a saved reward model (form 'full')")
        try:
            models.append(load_reward_model(str(d), dtype=options.get("dtype", "auto"),
                                            trust_remote_code=options.get("trust_remote_code", False)))
        except OSError as err:
            raise OSError(f"{d}: cannot load the reward model: {err}") from err
        reward_head(models[-1])
    return models, None


def _base(manifest: EnsembleManifest, options: dict[str, Any], num_labels: int = 1) -> Any:
    return load_reward_model(manifest.base, num_labels=num_labels, **options)


def _load_lora(manifest: EnsembleManifest, dirs: list[Path], options: dict[str, Any]) -> tuple[list[Any], list[str]]:
    from peft import PeftModel
    from safetensors import safe_open

    base = _base(manifest, options)
    head_name, _ = reward_head(base)
    names = [f"member_{i}" for i in range(len(dirs))]
    for d in dirs:
        weights = d / "adapter_model.safetensors"
        if not (d / "adapter_config.json").is_file() or not weights.is_file():
            raise FileNotFoundError(f"{d}: no LoRA adapter (adapter_config.json and adapter_model.safetensors)")
        with safe_open(str(weights), framework="pt") as f:
            if not any(f".{head_name}." in f".{key}" for key in f.keys()):
                raise ValueError(f"{weights}: the adapter has no reward head ('{head_name}' weights); train the "
                                 f"members with the head in modules_to_save")
    model = PeftModel.from_pretrained(base, str(dirs[0]), adapter_name=names[0])
    for name, d in zip(names[1:], dirs[1:]):
        model.load_adapter(str(d), adapter_name=name)
    for name, d in zip(names, dirs):
        if getattr(model.peft_config[name], "use_dora", False):
            raise NotImplementedError(f"{d}: DoRA adapters are not supported as ensemble members")
    return [model], names


def _merged_lora_scorer(model: Any, adapter: str) -> Any:
    """Member `adapter` of a multi-adapter PeftModel as a plain forward: every LoRA layer's weight W + s B A and the
    member's own head, substituted for the call (torch.func.functional_call), so the model is never modified.

    Merging costs one B A product per layer for the whole pass over the data, while PEFT's unmerged forward runs
    two extra matmuls per layer and token (about 2.7x the plain forward time of SmolLM2 on CPU in bfloat16)."""
    import torch
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    params: dict[str, Any] = {}
    with torch.no_grad():
        for path, module in model.named_modules():
            if isinstance(module, LoraLayer) and adapter in module.lora_A:
                weight = module.get_base_layer().weight
                params[f"{path}.base_layer.weight"] = weight + module.get_delta_weight(adapter).to(weight.dtype)
            elif isinstance(module, ModulesToSaveWrapper) and adapter in module.modules_to_save:
                for name, p in module.modules_to_save[adapter].named_parameters():
                    params[f"{path}.original_module.{name}"] = p

    def scorer(input_ids: Any, attention_mask: Any, past_key_values: Any = None) -> Any:
        with model.disable_adapter():  # LoRA layers run only their (substituted) base layer, heads the original
            return torch.func.functional_call(model, params, (), _model_kwargs(input_ids, attention_mask,
                                                                                past_key_values)).logits

    return scorer


def _load_heads(manifest: EnsembleManifest, dirs: list[Path], options: dict[str, Any]) -> tuple[list[Any], None]:
    import torch

    model = _base(manifest, options)
    name, head = reward_head(model)
    parts = [load_head(d / HEAD_FILE, head.in_features) for d in dirs]
    has_bias = all("bias" in p for p in parts)
    stacked = torch.nn.Linear(head.in_features, len(parts), bias=has_bias, dtype=head.weight.dtype,
                              device=head.weight.device)
    with torch.no_grad():
        stacked.weight.copy_(torch.cat([p["weight"] for p in parts]))
        if has_bias:
            stacked.bias.copy_(torch.cat([p["bias"] for p in parts]))
    setattr(model, name, stacked)
    model.config.num_labels = len(parts)
    return [model], None


# --- the GRPO reward --------------------------------------------------------------------------------------


@register_reward("rm_ensemble")
def rm_ensemble(task: Any, path: str, aggregate: str = "mean", uwo_lambda: float = 0.1,
                members: list[int] | None = None, batch_size: int = 16, normalize: bool = True) -> RewardFunc:
    """The ensemble at `path` as a TRL reward: the `aggregate` (mean, wco, uwo with `uwo_lambda`; Coste et al.'s
    lambda for RL is 0.1) of the members' standardised scores of each completion (`normalize: false`: raw
    scores). `members` keeps a subset ([0]: one proxy). The logged statistics are of the scores aggregated.
    Logs `rm_ensemble/mean`, `/min`, `/max`, `/std` per step through TRL's `log_metric` (averaged over processes):
    a rising std is the overoptimisation alarm. The ensemble sits on this process's accelerator (or the CPU)."""
    import torch

    from posttrain.algos import AGGREGATES
    from posttrain.algos.ensembles import member_statistics

    AGGREGATES.get(aggregate)  # an unknown name fails here, before any model loads
    ensemble = RewardEnsemble.from_pretrained(path, members=members, batch_size=batch_size, normalize=normalize)
    if torch.cuda.is_available():
        ensemble.to(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")

    def rm_ensemble(prompts: list[Any], completions: list[Any], completion_ids: list[list[int]] | None = None,
                    log_metric: Any = None, **kwargs: Any) -> list[float | None]:
        agg, scores = ensemble(prompts, completions, how=aggregate, uwo_lambda=uwo_lambda)
        if log_metric is not None:
            for key, value in member_statistics(ensemble.standardize(scores)).items():
                log_metric(f"rm_ensemble/{key}", value)
        return agg.tolist()

    rm_ensemble.ensemble = ensemble  # type: ignore[attr-defined]
    return rm_ensemble
