"""DPOShiftTrainer on the tiny model: f = 1 is TRL's DPO bit for bit (LoRA, full, precomputed reference), the
schedule over optimizer steps, unshifted logged rewards, resume, evaluation, and the checks against TRL."""

from __future__ import annotations

import contextlib
import inspect

import pytest
import torch
import trl
from datasets import Dataset

import posttrain.trainers.dpo as dpo_module
from posttrain.models import load_model, load_tokenizer
from posttrain.models.loading import lora_config
from posttrain.trainers.dpo import DPOConfig, DPOShiftConfig, DPOShiftTrainer, DPOTrainer
from posttrain.trainers.fused_head import compact_lm_head_on_cpu

TRL_ONLY = {"dpo_shift/f"}


def pairs(n: int = 8) -> Dataset:
    rows = []
    for i in range(n):
        a, b = i % 5 + 1, i // 5 + 3
        rows.append({"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}],
                     "chosen": [{"role": "assistant", "content": f"{a} + {b} = {a + b}. The answer is {a + b}."}],
                     "rejected": [{"role": "assistant", "content": f"It is {a + b + 3}, maybe {2 * a}."}]})
    return Dataset.from_list(rows)


def config_kwargs(out, **kw) -> dict:
    base = dict(output_dir=str(out), max_steps=2, per_device_train_batch_size=4, learning_rate=5e-3, beta=0.5,
                logging_steps=1, use_cpu=True, bf16=False, report_to=[], save_strategy="no", seed=0,
                disable_tqdm=True, gradient_checkpointing=False)
    base.update(kw)
    return base


def train(trainer_cls, config, peft: bool, compact: bool = True, **kw):
    """Build and train. TRL's own DPOTrainer runs with its fused LM head scoring only the response positions, as
    posttrain's DPO trainers do on the CPU (their one change to TRL's arithmetic, tested on its own below), unless
    `compact=False`."""
    switch = compact and trainer_cls is trl.DPOTrainer
    with compact_lm_head_on_cpu(torch.device("cpu")) if switch else contextlib.nullcontext():
        trainer = trainer_cls(model=load_model("tiny-qwen2"), args=config, train_dataset=pairs(),
                              processing_class=load_tokenizer("tiny-qwen2"),
                              peft_config=lora_config(8, 16, 0.0, "all-linear", None) if peft else None, **kw)
        trainer.train()
    return trainer


def weights(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def steps(trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("setting", ["lora", "full", pytest.param("full_precomputed_reference", marks=pytest.mark.slow)])
def test_f_one_is_trls_dpo_bit_for_bit(tmp_path, setting):
    extra = {"precompute_ref_log_probs": True} if setting.endswith("reference") else {}
    peft = setting == "lora"
    theirs = train(trl.DPOTrainer, trl.DPOConfig(**config_kwargs(tmp_path / "trl", **extra)), peft)
    ours = train(DPOShiftTrainer, DPOShiftConfig(**config_kwargs(tmp_path / "ours", dpo_shift_f=1.0, **extra)), peft)
    w_theirs, w_ours = weights(theirs), weights(ours)
    assert w_theirs.keys() == w_ours.keys()
    for name in w_ours:
        assert torch.equal(w_ours[name], w_theirs[name]), name
    for a, b in zip(steps(ours), steps(theirs), strict=True):
        assert a["dpo_shift/f"] == 1.0
        assert {k: v for k, v in a.items() if k not in TRL_ONLY} == b, "logged metrics differ"
    # and training did move the weights (LoRA: its B matrices; full: everything)
    start = load_model("tiny-qwen2").state_dict()
    if not peft:
        assert any(not torch.equal(w_ours[n], start[n]) for n in w_ours if n in start)
    else:
        assert any(w.abs().sum() > 0 for n, w in w_ours.items() if "lora_B" in n)


@pytest.mark.parametrize("setting", ["lora", "full_precomputed_reference"])
def test_dpo_scores_only_the_response_positions_on_cpu(tmp_path, monkeypatch, scored_positions, setting):
    """TRL's fused LM head scores every prompt and padding position off Triton devices; posttrain's DPOTrainer makes
    it score only the labelled (response) positions on the CPU, in the loss and in the precomputed reference
    log-probs, and leaves TRL's switch as it was."""
    import trl.trainer.utils as trl_utils

    scored = scored_positions
    switch = trl_utils._use_triton
    responses, positions = [], []
    original = trl.DPOTrainer._compute_loss

    def counting(self, model, inputs, return_outputs):
        responses.append(int(inputs["completion_mask"][:, 1:].sum()))
        positions.append(inputs["completion_mask"][:, 1:].numel())  # what TRL scores off Triton devices
        return original(self, model, inputs, return_outputs)

    monkeypatch.setattr(trl.DPOTrainer, "_compute_loss", counting)
    precompute = setting.endswith("reference")
    trainer = train(DPOTrainer, DPOConfig(**config_kwargs(tmp_path, precompute_ref_log_probs=precompute)),
                    peft=not precompute)
    forwards = 1 if precompute else 2  # the policy; with LoRA, the policy with its adapter disabled as well
    assert len(responses) == 2 and scored[-forwards * 2:] == [n for n in responses for _ in range(forwards)]
    if precompute:  # the reference log-probs, computed in __init__ over the 8 pairs, 4 per batch
        assert len(scored) == 2 + 2 and sum(scored[:2]) == sum(responses)
    assert all(n < p for n, p in zip(responses, positions, strict=True))  # the prompts are not scored
    assert trl_utils._use_triton is switch and trainer.state.global_step == 2


def test_dpo_equals_trls_to_rounding(tmp_path):
    """The loss, metrics and gradient of posttrain's DPOTrainer on a batch equal TRL's (every position scored) to
    float rounding. (Weights after Adam steps are not compared: Adam scales a rounding-sized gradient of a
    rarely-seen token's embedding to a full step.)"""
    results = []
    for cls, config_cls in ((DPOTrainer, DPOConfig), (trl.DPOTrainer, trl.DPOConfig)):
        trainer = cls(model=load_model("tiny-qwen2"), args=config_cls(**config_kwargs(tmp_path / cls.__module__)),
                      train_dataset=pairs(), processing_class=load_tokenizer("tiny-qwen2"))
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
        results.append((loss.detach(), metrics, {n: p.grad.clone() for n, p in trainer.model.named_parameters()}))
    (loss, metrics, grads), (trl_loss, trl_metrics, trl_grads) = results
    torch.testing.assert_close(loss, trl_loss, atol=1e-6, rtol=1e-6)
    assert metrics.keys() == trl_metrics.keys()
    for k in metrics:
        assert metrics[k] == pytest.approx(trl_metrics[k], rel=1e-5, abs=1e-6), k
    assert grads.keys() == trl_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], trl_grads[name], atol=1e-6, rtol=1e-4, msg=name)
    assert any(g.abs().sum() > 0 for g in grads.values())
    assert issubclass(DPOShiftTrainer, DPOTrainer)


def test_f_below_one_trains_differently_and_logs_f(tmp_path):
    theirs = train(trl.DPOTrainer, trl.DPOConfig(**config_kwargs(tmp_path / "trl")), peft=False)
    ours = train(DPOShiftTrainer, DPOShiftConfig(**config_kwargs(tmp_path / "ours", dpo_shift_f=0.75)), peft=False)
    first_ours, first_theirs = steps(ours)[0], steps(theirs)[0]
    # same start, same batch: every logged DPO metric of the first step is identical, the loss is not
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
              "logps/rejected"):
        assert first_ours[k] == first_theirs[k], k
    # at the start the policy is the reference (z = 0, loss ln 2 for any f); the gradient and the next loss differ
    assert first_ours["loss"] == first_theirs["loss"] == pytest.approx(0.693147, abs=1e-6)
    assert first_ours["grad_norm"] != first_theirs["grad_norm"] and first_ours["dpo_shift/f"] == 0.75
    assert steps(ours)[1]["loss"] != steps(theirs)[1]["loss"]
    assert any(not torch.equal(a, b) for a, b in zip(weights(ours).values(), weights(theirs).values()))


def test_logged_rewards_do_not_depend_on_f_at_a_fixed_policy(tmp_path):
    trainer = DPOShiftTrainer(model=load_model("tiny-qwen2"), args=DPOShiftConfig(**config_kwargs(tmp_path)),
                              train_dataset=pairs(), processing_class=load_tokenizer("tiny-qwen2"))
    with torch.no_grad():  # a policy away from the reference (a separate copy of the start), so rewards are not 0
        g = torch.Generator().manual_seed(0)
        for p in trainer.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    trainer.model.train()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    logged, losses = [], []
    for f in (1.0, 0.9, 0.5):
        trainer.args.dpo_shift_f = f
        trainer._metrics["train"].clear()
        with torch.no_grad():
            losses.append(trainer.compute_loss(trainer.model, batch).item())
        logged.append({k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith(("rewards/", "logps/"))})
    assert logged[0] == logged[1] == logged[2] and len(logged[0]) == 6
    assert logged[0]["rewards/chosen"] != 0 and logged[0]["rewards/rejected"] != 0
    assert len(set(losses)) == 3


def test_f_follows_the_schedule_over_optimizer_steps(tmp_path):
    # 2 micro-batches per optimizer step: the logged f (their mean) is the step's f only if it is constant within it;
    # f = f_min + (f_max - f_min) t / T at t = 0..3 of T = 4 (first, middle and last steps of the other schedules:
    # tests/algos/test_algos_preference.py)
    config = DPOShiftConfig(**config_kwargs(tmp_path, max_steps=4, per_device_train_batch_size=2,
                                            gradient_accumulation_steps=2, dpo_shift_schedule="linear_increase"))
    trainer = train(DPOShiftTrainer, config, peft=True)
    assert [h["dpo_shift/f"] for h in steps(trainer)] == pytest.approx([0.75, 0.8125, 0.875, 0.9375], abs=1e-12)


def test_resume_continues_identically(tmp_path):
    kw = dict(max_steps=3, per_device_train_batch_size=2, dpo_shift_schedule="linear_increase", save_strategy="steps",
              save_steps=2)
    full = train(DPOShiftTrainer, DPOShiftConfig(**config_kwargs(tmp_path / "full", **kw)), peft=True)
    resumed = DPOShiftTrainer(model=load_model("tiny-qwen2"),
                              args=DPOShiftConfig(**config_kwargs(tmp_path / "resumed", **kw)), train_dataset=pairs(),
                              processing_class=load_tokenizer("tiny-qwen2"),
                              peft_config=lora_config(8, 16, 0.0, "all-linear", None))
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    a, b = steps(full)[2:], [h for h in steps(resumed) if h["step"] > 2]
    assert [h["step"] for h in b] == [3] and b[0]["dpo_shift/f"] == pytest.approx(0.75 + 0.25 * 2 / 3)
    for x, y in zip(a, b, strict=True):
        for k in ("loss", "dpo_shift/f", "rewards/margins", "logps/chosen"):
            assert x[k] == pytest.approx(y[k], rel=1e-6, abs=1e-9), k
    for (n, w), (_, v) in zip(weights(full).items(), weights(resumed).items()):
        torch.testing.assert_close(w, v, rtol=1e-6, atol=1e-8, msg=n)


def test_evaluate_logs_f_and_dpo_metrics(tmp_path):
    trainer = DPOShiftTrainer(model=load_model("tiny-qwen2"),
                              args=DPOShiftConfig(**config_kwargs(tmp_path, per_device_eval_batch_size=4)),
                              train_dataset=pairs(), eval_dataset=pairs(4), processing_class=load_tokenizer("tiny-qwen2"))
    metrics = trainer.evaluate()  # prediction_step asks for the outputs too: one more forward inside TRL's loss
    assert metrics["eval_dpo_shift/f"] == 0.95 and "eval_rewards/accuracies" in metrics and "eval_loss" in metrics


def test_a_change_in_trls_dpo_computation_fails_loudly(tmp_path, monkeypatch):
    # What the trainer relies on: TRL 1.16's `_compute_loss(model, inputs, return_outputs)` hook ...
    assert list(inspect.signature(trl.DPOTrainer._compute_loss).parameters) == ["self", "model", "inputs",
                                                                                "return_outputs"]
    assert "_compute_loss" in trl.DPOTrainer.__dict__
    # ... and TRL summing the fused head's per-token log-probs into the sequence log-probs it logs: if TRL computed
    # them otherwise, the first step's check stops the run.
    original = dpo_module._sequence_logps
    monkeypatch.setattr(dpo_module, "_sequence_logps", lambda out, n: tuple(x * 1.001 for x in original(out, n)))
    with pytest.raises(RuntimeError, match="no longer computes DPO as TRL 1.16 did"):
        train(DPOShiftTrainer, DPOShiftConfig(**config_kwargs(tmp_path, max_steps=1)), peft=False)


def test_a_different_number_of_forwards_fails_loudly(tmp_path, monkeypatch):
    trainer = DPOShiftTrainer(model=load_model("tiny-qwen2"), args=DPOShiftConfig(**config_kwargs(tmp_path)),
                              train_dataset=pairs(), processing_class=load_tokenizer("tiny-qwen2"))
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    original = trl.DPOTrainer._compute_loss

    def twice(self, model, inputs, return_outputs):  # a TRL that ran one more policy forward
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        return original(self, model, inputs, return_outputs)

    monkeypatch.setattr(trl.DPOTrainer, "_compute_loss", twice)
    with pytest.raises(RuntimeError, match="made 2 policy and 1 reference forwards, not the 1 and 1"):
        trainer.compute_loss(trainer.model, batch)


@pytest.mark.parametrize("options, message", [
    ({"loss_type": ["ipo"]}, "loss_type: DPO-Shift .* sigmoid"),
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}, "loss_type"),
    ({"f_divergence_type": "js_divergence"}, "f_divergence_type"),
    ({"ld_alpha": 0.5}, "ld_alpha"),
    ({"use_weighting": True}, "use_weighting"),
    ({"dpo_shift_f": 1.2}, "dpo_shift_f: must be in"),
    ({"dpo_shift_schedule": "cosine"}, "unknown schedule 'cosine'"),
])
def test_options_where_the_shift_is_undefined_are_refused(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        DPOShiftConfig(**config_kwargs(tmp_path, **options))


def test_dpo_config_refuses_label_smoothing_that_trl_ignores(tmp_path):
    with pytest.raises(ValueError, match="sigmoid loss ignores it"):
        DPOConfig(**config_kwargs(tmp_path, label_smoothing=0.1))
    assert DPOConfig(**config_kwargs(tmp_path, label_smoothing=0.1, loss_type=["robust"])).label_smoothing == 0.1
    assert DPOShiftConfig(**config_kwargs(tmp_path, label_smoothing=0.1)).label_smoothing == 0.1


def test_the_trainer_needs_its_config(tmp_path):
    with pytest.raises(TypeError, match="needs a DPOShiftConfig"):
        DPOShiftTrainer(model=load_model("tiny-qwen2"), args=trl.DPOConfig(**config_kwargs(tmp_path)),
                        train_dataset=pairs(), processing_class=load_tokenizer("tiny-qwen2"))
