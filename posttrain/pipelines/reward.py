"""The `reward` kind: reward models trained on preference pairs (`method: reward`) and ensembles of them
(`method: reward_ensemble`, Coste et al. 2024).

Reads `data` (train and eval pairs, label noise), `eval` (held-out pairwise accuracy) and `trainer` (fields of
RewardConfig / RewardEnsembleConfig: TRL's RewardConfig plus `form`, `num_members`, `member_seeds`). Flow:
1. before any model loads: the pairs (built on first use when `build:` is given, then cached), their row checks,
   the label noise (the same flipped pairs for every member);
2. the base loads once as a sequence-classification model;
3. the members train one after another, each with its own seed (head initialisation and data order) and folder:
   `full` reloads the pretrained weights for each member, `lora` adds and then unloads one adapter per member on
   the shared base, `heads` re-initialises the head on the frozen base;
4. `ensemble.json` (form, members, seeds, base), then the pairwise accuracy of every member and every aggregate on
   `data.eval`, scored by the saved ensemble (`posttrain.rewards.ensemble.RewardEnsemble`) as any user loads it.
`method: reward` is the one-member case: the model (or adapter, or head) is saved in output_dir itself.
"""

from __future__ import annotations

import json
import random
import resource
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from posttrain.data.preferences import PreferenceSource
from posttrain.distributed import needs_gather, sharding_from_recipe
from posttrain.pipelines.base import (
    COMMON_OWNED_KEYS,
    Pipeline,
    RunContext,
    RunOutcome,
    base_trainer_kwargs,
    on_gpu,
    train_and_save,
    write_report,
)
from posttrain.recipe import Recipe

__all__ = ["RewardDataSpec", "RewardEvalSpec", "RewardPipeline", "evaluate_pairs", "with_label_noise"]

MEMBER_FILE = "member.json"  # written when a member has finished: a resumed run skips it
CALIBRATION_PAIRS = 256  # training pairs scored for the calibration when there is no held-out data


@dataclass
class RewardDataSpec:
    """`data:` of reward recipes: preference pairs (a JSONL file, a Hub dataset, or built from a task on first use)."""

    train: PreferenceSource | None = None
    eval: PreferenceSource | None = None
    label_noise: float = field(default=0.0, metadata={"ge": 0, "le": 0.5})  # share of training pairs flipped


@dataclass
class RewardEvalSpec:
    """`eval:` of reward recipes: pairwise accuracy on `data.eval` after training (every member and aggregate)."""

    after: bool = True
    limit: int | None = field(default=None, metadata={"ge": 1})
    batch_size: int = field(default=16, metadata={"ge": 1})
    uwo_lambda: float = field(default=0.5, metadata={"ge": 0})  # of the uwo aggregate's accuracy


@dataclass
class Member:
    index: int
    seed: int
    folder: Path


@dataclass
class RewardPrepared:
    config: Any  # the trainer config as the recipe gives it; each member's copies it with its seed and folder
    config_kwargs: dict[str, Any]
    members: list[Member]
    train_ds: Any
    eval_ds: Any
    data_summary: dict[str, Any]


def with_label_noise(dataset: Any, rate: float, seed: int) -> tuple[Any, int]:
    """The pairs with each one's chosen and rejected swapped with probability `rate` (Bernoulli, seeded), a
    `label_flipped` column marking them, and the number flipped."""
    rng = random.Random(f"label-noise-{seed}")
    flips = [rng.random() < rate for _ in range(len(dataset))]

    def flip(row: dict[str, Any], i: int) -> dict[str, Any]:
        if flips[i]:
            row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
        row["label_flipped"] = flips[i]
        return row

    return dataset.map(flip, with_indices=True), sum(flips)


def _pairs(source: PreferenceSource, recipe: Recipe, limit: int | None = None) -> tuple[Any, str]:
    from accelerate import PartialState

    from posttrain.data.preferences import load_preferences, resolve_preferences

    with PartialState().main_process_first():  # one process builds a missing pair file, the others then read it
        path = resolve_preferences(source, recipe.model.name_or_path)
    if limit is not None:
        source = replace(source, limit=min(limit, source.limit or limit))
    return load_preferences(source, path), str(path or source.hub_id)


class RewardPipeline(Pipeline):
    kind: ClassVar[str] = "reward"
    data_spec: ClassVar[type] = RewardDataSpec
    eval_spec: ClassVar[type] = RewardEvalSpec
    sections: ClassVar[frozenset[str]] = frozenset()
    owned_trainer_keys: ClassVar[dict[str, str]] = COMMON_OWNED_KEYS

    def resume_point(self, recipe: Recipe, resume: str | bool | None, force: bool = False) -> str | bool | None:
        """An ensemble resumes member by member (finished members are skipped, the unfinished one continues from
        its own last checkpoint): `--resume` is passed through as it is; one reward model resumes as any trainer."""
        if recipe.method == "reward_ensemble":
            return resume
        return super().resume_point(recipe, resume, force)

    def check(self, recipe: Recipe) -> list[str]:
        problems: list[str] = []
        data = recipe.data
        if data.train is None:
            problems.append("data.train: required: the preference pairs to train on (path, hub_id or build)")
        else:
            problems += data.train.problems("data.train")
        if data.eval is not None:
            problems += data.eval.problems("data.eval")
        form = recipe.trainer.get("form", "full")
        if form == "lora" and recipe.model.peft is None:
            problems.append("trainer.form: 'lora' needs model.peft (the members' LoRA settings: r, alpha, "
                            "target_modules)")
        if form != "lora" and recipe.model.peft is not None:
            problems.append(f"model.peft: set, but trainer.form is {form!r}; set trainer.form: lora or "
                            "model.peft: null")
        if form == "heads" and (sharding := sharding_from_recipe(recipe.trainer)):
            problems.append(f"trainer.form: 'heads' trains small scoring heads on features of the frozen base, "
                            f"computed once outside the trainer: there is nothing for {sharding} to shard (a head "
                            "has no transformer layers to wrap). Launch with launch/accelerate/multi_gpu.yaml (DDP), "
                            "or use form 'lora' or 'full' under sharding")
        seeds, k = recipe.trainer.get("member_seeds"), recipe.trainer.get("num_members", 5)
        if seeds is not None and (len(seeds) != k or len(set(seeds)) != len(seeds)):
            problems.append(f"trainer.member_seeds: needs {k} distinct seeds (trainer.num_members), got {seeds}")
        return problems

    def prepare(self, ctx: RunContext) -> RewardPrepared:
        from posttrain.trainers.reward import RewardEnsembleConfig

        recipe = ctx.recipe
        config_class = ctx.method.config_class()
        kwargs = base_trainer_kwargs(recipe)
        config = config_class(**kwargs)  # validates every trainer field before the model loads
        if isinstance(config, RewardEnsembleConfig):
            if isinstance(ctx.resume, str):
                raise ValueError("an ensemble resumes member by member: use --resume without a checkpoint path")
            members = [Member(k, s, ctx.output_dir / f"member_{k}") for k, s in enumerate(config.seeds())]
        else:
            members = [Member(0, recipe.seed, ctx.output_dir)]
        train_ds, train_from = _pairs(recipe.data.train, recipe)
        train_ds, flipped = with_label_noise(train_ds, recipe.data.label_noise, recipe.seed)
        summary: dict[str, Any] = {"train_pairs": len(train_ds), "train_from": train_from,
                                   "label_noise": recipe.data.label_noise, "labels_flipped": flipped}
        eval_ds = None
        if recipe.data.eval is not None:
            eval_ds, summary["eval_from"] = _pairs(recipe.data.eval, recipe, recipe.eval.limit)
            summary["eval_pairs"] = len(eval_ds)
        return RewardPrepared(config, kwargs, members, train_ds, eval_ds, summary)

    def load(self, ctx: RunContext) -> tuple[Any, Any]:
        """The base as a sequence-classification model with a one-output head, and its tokenizer."""
        from posttrain.models import load_tokenizer
        from posttrain.rewards.ensemble import load_reward_model

        m = ctx.recipe.model
        tokenizer = load_tokenizer(m.name_or_path, m.gguf_file, m.revision, m.trust_remote_code)
        model = load_reward_model(m.name_or_path, dtype=m.dtype, revision=m.revision, gguf_file=m.gguf_file,
                                  trust_remote_code=m.trust_remote_code, attn_implementation=m.attn_implementation)
        model.config.pad_token_id = tokenizer.pad_token_id
        return model, tokenizer

    def run(self, ctx: RunContext, p: RewardPrepared) -> RunOutcome:
        from posttrain.rewards.ensemble import EnsembleManifest
        from posttrain.trainers.reward import FeatureHeadModel

        recipe = ctx.recipe
        form = p.config.form
        summary: dict[str, Any] = {"method": recipe.method, "model": recipe.model.name_or_path, "form": form,
                                   "k": len(p.members), "seeds": [m.seed for m in p.members], **p.data_summary}
        history: list[dict[str, Any]] = []
        base, pristine = ctx.model, True
        cache = self._feature_cache(ctx, p, summary) if p.config.uses_feature_cache else None
        for member in p.members:
            done = member.folder / MEMBER_FILE
            if ctx.resume and done.is_file() and len(p.members) > 1:
                summary.setdefault("members", []).append(json.loads(done.read_text()))
                if ctx.is_main:
                    print(f"[posttrain] member {member.index} already trained ({done}), skipped", flush=True)
                continue
            if not pristine:
                base = self.load(ctx)[0]  # every member starts from the pretrained weights
            if cache is not None:  # heads on the frozen base's features, computed once for every member
                model, data = FeatureHeadModel.on(cache[0], base.config), cache[1:]
            else:
                model, data = base, (p.train_ds, p.eval_ds)
            record, log, trained = self._train_member(ctx, p, member, model, data)
            summary.setdefault("members", []).append(record)
            history += [{**h, "member": member.index} for h in log]
            if form == "full" or needs_gather(trained):
                pristine = False  # the base's weights changed (full), or FSDP / ZeRO-3 sharded them in place
            elif form == "lora":
                base = trained.unload()  # the shared base again, this member's adapter removed
        summary["steps"] = summary["members"][-1]["steps"]
        summary["launch"] = summary["members"][-1].get("launch")  # a member trained before this run may have none
        summary["train_minutes"] = sum(m["train_minutes"] for m in summary["members"]) + summary.get(
            "feature_minutes", 0.0)
        summary["peak_rss_gb"] = _peak_rss_gb()
        if ctx.is_main:
            folder = ctx.output_dir
            names = [str(m.folder.relative_to(folder)) if m.folder != folder else "." for m in p.members]
            m = recipe.model
            options = {k: v for k, v in {"dtype": m.dtype, "revision": m.revision, "gguf_file": m.gguf_file,
                                          "trust_remote_code": m.trust_remote_code}.items() if v not in (None, False)}
            EnsembleManifest(form, names, [x.seed for x in p.members], None if form == "full" else m.name_or_path,
                             options, recipe.method).write(folder)
            ctx.tokenizer.save_pretrained(folder)
            ensemble = self._calibrate(ctx, p, summary)
            if recipe.eval.after and p.eval_ds is not None:
                summary["eval_after"] = self._evaluate(ctx, p, ensemble)
        return RunOutcome(summary=summary, log_history=history)

    def _calibrate(self, ctx: RunContext, p: RewardPrepared, summary: dict[str, Any]) -> Any:
        """Each member's score mean and deviation on reference responses into ensemble.json: the chosen and
        rejected responses of the held-out pairs, else of up to CALIBRATION_PAIRS training pairs. The aggregates
        standardise with it (`calibration_stats` says why)."""
        from posttrain.distributed import loading_whole
        from posttrain.rewards.ensemble import RewardEnsemble, calibration_stats

        with loading_whole():  # on the main process alone, after a ZeRO-3 launch too
            ensemble = RewardEnsemble.from_pretrained(ctx.output_dir, batch_size=ctx.recipe.eval.batch_size,
                                                      normalize=False)
        if on_gpu():
            ensemble.to("cuda")
        if p.eval_ds is not None:
            pairs, source = p.eval_ds, "held-out pairs"
        else:
            pairs, source = p.train_ds.select(range(min(len(p.train_ds), CALIBRATION_PAIRS))), "training pairs"
        prompts = list(pairs["prompt"])
        scores = ensemble.scores(prompts * 2, list(pairs["chosen"]) + list(pairs["rejected"]))
        ensemble.manifest.calibration = calibration_stats(scores, f"{source} (chosen and rejected)")
        ensemble.save_calibration()
        ensemble.normalize = True
        summary["calibration"] = ensemble.manifest.calibration
        return ensemble

    def _train_member(self, ctx: RunContext, p: RewardPrepared, member: Member, model: Any,
                      data: tuple[Any, Any]) -> tuple[dict[str, Any], list[dict[str, Any]], Any]:
        """Train one member on `model` with `data` (train, eval pairs); (its record, its log history, the trained
        model: a PeftModel for lora)."""
        from transformers.trainer_utils import get_last_checkpoint

        from posttrain.trainers.reward import init_reward_head

        recipe, form = ctx.recipe, p.config.form
        init_reward_head(model, member.seed)  # TRL's RewardTrainer seeds the rest (LoRA init) with config.seed
        config = type(p.config)(**{**p.config_kwargs, "seed": member.seed, "output_dir": str(member.folder)})
        trainer = ctx.method.trainer_class()(
            model=model, args=config, train_dataset=data[0], processing_class=ctx.tokenizer,
            eval_dataset=data[1] if config.eval_strategy != "no" else None,
            peft_config=_lora_config(recipe) if form == "lora" else None)
        resume = ctx.resume
        if len(p.members) > 1:  # per member: its last checkpoint, if it has one
            resume = True if ctx.resume and member.folder.is_dir() and get_last_checkpoint(str(member.folder)) \
                else None
        if ctx.is_main:
            print(f"[posttrain] training reward member {member.index} (seed {member.seed}, form {form}) on "
                  f"{len(trainer.train_dataset)} pairs -> {member.folder}", flush=True)
        record: dict[str, Any] = {"index": member.index, "seed": member.seed, "folder": str(member.folder),
                                  "pairs_used": len(trainer.train_dataset)}  # after TRL's max_length filter
        train_and_save(trainer, replace(ctx, resume=resume), record, member.folder)
        last = [h for h in trainer.state.log_history if "accuracy" in h and "loss" in h]
        if last:
            record["final_train"] = {k: last[-1][k] for k in ("loss", "accuracy", "margin") if k in last[-1]}
        if ctx.is_main:
            (member.folder / MEMBER_FILE).write_text(json.dumps(record, indent=2))
        return record, list(trainer.state.log_history), trainer.accelerator.unwrap_model(trainer.model)

    def _feature_cache(self, ctx: RunContext, p: RewardPrepared, summary: dict[str, Any]) -> tuple[Any, Any, Any]:
        """(feature table [N, H], train pairs, eval pairs) for heads members: every response of the (train, eval)
        pairs that TRL's max_length filter keeps, through the frozen base once; the pairs as row indices."""
        import time

        from datasets import Dataset

        from posttrain.rewards.ensemble import reward_input_ids
        from posttrain.trainers.reward import head_features

        tokenizer, max_length = ctx.tokenizer, p.config.max_length
        seqs: list[list[int]] = []
        indexed: list[Any] = []
        for ds in (p.train_ds, p.eval_ds):
            if ds is None:
                indexed.append(None)
                continue
            chosen = reward_input_ids(tokenizer, ds["prompt"], ds["chosen"])
            rejected = reward_input_ids(tokenizer, ds["prompt"], ds["rejected"])
            keep = [i for i in range(len(ds))
                    if max_length is None or max(len(chosen[i]), len(rejected[i])) <= max_length]
            start, n = len(seqs), len(keep)
            seqs += [chosen[i] for i in keep] + [rejected[i] for i in keep]
            columns: dict[str, list[Any]] = {"chosen_ids": [[start + j] for j in range(n)],
                                             "rejected_ids": [[start + n + j] for j in range(n)]}
            if "margin" in ds.column_names:
                columns["margin"] = [ds[i]["margin"] for i in keep]
            indexed.append(Dataset.from_dict(columns))
        t0 = time.perf_counter()
        base = ctx.model.to("cuda") if on_gpu() else ctx.model
        if ctx.is_main:
            print(f"[posttrain] heads form: features of {len(seqs)} responses through the frozen base, once",
                  flush=True)
        table = head_features(base, seqs, tokenizer.pad_token_id, batch_size=p.config.per_device_eval_batch_size)
        summary["feature_minutes"] = (time.perf_counter() - t0) / 60
        return table, indexed[0], indexed[1]

    def _evaluate(self, ctx: RunContext, p: RewardPrepared, ensemble: Any) -> dict[str, Any]:
        metrics, records = evaluate_pairs(ensemble, p.eval_ds, ctx.recipe.eval.uwo_lambda)
        ctx.report_dir.mkdir(parents=True, exist_ok=True)
        with open(ctx.report_dir / "eval_pairs.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        print("[posttrain] held-out pairwise accuracy: " + ", ".join(
            f"{k} {v:.3f}" for k, v in metrics["accuracy"].items()), flush=True)
        return metrics

    def write_report(self, ctx: RunContext, outcome: RunOutcome) -> None:
        s = outcome.summary
        lines = ["", f"Form `{s['form']}`, {s['k']} member(s), seeds {s['seeds']}; {s['train_pairs']} training pairs "
                     f"({s['labels_flipped']} labels flipped, noise {s['label_noise']}); "
                     f"peak RSS {s['peak_rss_gb']:.2f} GB.", "",
                 "| member | seed | steps | train min | train accuracy |", "|---:|---:|---:|---:|---:|"]
        for m in s.get("members", []):
            acc = m.get("final_train", {}).get("accuracy")
            lines.append(f"| {m['index']} | {m['seed']} | {m['steps']} | {m['train_minutes']:.2f} | "
                         f"{'-' if acc is None else f'{acc:.3f}'} |")
        ev = s.get("eval_after")
        if ev:
            lines += ["", f"Held-out pairwise accuracy ({ev['n_pairs']} pairs):", "",
                      "| scorer | accuracy |", "|---|---:|"]
            lines += [f"| {k} | {v:.3f} |" for k, v in ev["accuracy"].items()]
            lines += ["", f"Mean member std on held-out responses: {ev['member_std']:.4f}."]
        elif ctx.recipe.data.eval is None:
            lines += ["", "No data.eval: no held-out accuracy."]
        write_report(ctx.report_dir, outcome.log_history, s, lines)


def evaluate_pairs(ensemble: Any, pairs: Any, uwo_lambda: float = 0.5) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Pairwise accuracy (score(chosen) > score(rejected)) of each member and of each registered aggregate (of the
    standardised scores, as the ensemble aggregates) on `pairs` (prompt, chosen, rejected), and one record per pair
    with every member's two raw scores."""
    import torch

    from posttrain.algos import AGGREGATES
    from posttrain.algos.ensembles import aggregate

    prompts = list(pairs["prompt"])
    both = ensemble.scores(prompts * 2, list(pairs["chosen"]) + list(pairs["rejected"]))
    chosen, rejected = both[:, : len(prompts)], both[:, len(prompts):]
    accuracy = {f"member_{k}": (chosen[k] > rejected[k]).float().mean().item() for k in range(ensemble.k)}
    for how in AGGREGATES.names():
        wins = (aggregate(ensemble.standardize(chosen), how, uwo_lambda)
                > aggregate(ensemble.standardize(rejected), how, uwo_lambda))
        accuracy[how] = wins.float().mean().item()
    ids = pairs["id"] if "id" in pairs.column_names else list(range(len(prompts)))
    records = [{"id": i, "chosen": c, "rejected": r} for i, c, r in zip(ids, chosen.T.tolist(), rejected.T.tolist())]
    return {"n_pairs": len(prompts), "accuracy": accuracy,
            "member_std": torch.cat([chosen, rejected], 1).std(0, correction=0).mean().item()}, records


def _lora_config(recipe: Recipe) -> Any:
    """The recipe's LoRA settings for a sequence-classification model: PEFT then keeps a trainable copy of the
    reward head in every adapter (modules_to_save), so each member has its own head."""
    from peft import LoraConfig

    p = recipe.model.peft
    return LoraConfig(r=p.r, lora_alpha=p.alpha, lora_dropout=p.dropout, target_modules=p.target_modules,
                      modules_to_save=p.modules_to_save, task_type="SEQ_CLS")


def _peak_rss_gb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)
