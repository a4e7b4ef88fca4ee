"""The entropy-tracking GRPO base: metrics land in trainer_state.json, LoRA and full training run,
the maths equals TRL's, resume reproduces an uninterrupted run, method state survives checkpoints."""

import json

import pytest
import torch
import trl

from posttrain.models import load_model, load_tokenizer, lora_config
from posttrain.trainers.fused_head import compact_lm_head_on_cpu
from posttrain.trainers.grpo import GRPOConfig, GRPOTrainer
from tests.trainers.tiny_setting import config_kwargs, dataset, digit_reward

TRACKED = ["entropy/mean", "entropy/p50", "entropy/p95", "entropy/top20_mean",
           "groups/frac_all_correct", "groups/frac_all_wrong", "groups/unique_answers"]




def config(out, **kw):
    return GRPOConfig(**config_kwargs(out, **kw))


def make(out, cls=GRPOTrainer, peft=False, **kw):
    kwargs = dict(model=load_model("tiny-qwen2"), reward_funcs=[digit_reward], args=config(out, **kw),
                  train_dataset=dataset(), processing_class=load_tokenizer("tiny-qwen2"),
                  peft_config=lora_config(r=4, alpha=8) if peft else None)
    return cls(**kwargs)


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_tracked_metrics_in_trainer_state(tmp_path, peft):
    trainer = make(tmp_path, peft=peft)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    trainer.save_state()
    history = json.loads((tmp_path / "trainer_state.json").read_text())["log_history"]
    steps = [h for h in history if "loss" in h]
    assert len(steps) == 2
    for h in steps:
        for key in TRACKED:
            assert key in h, key
        assert 0 <= h["groups/frac_all_correct"] + h["groups/frac_all_wrong"] <= 1
        assert 1 <= h["groups/unique_answers"] <= 4
        assert h["entropy/p50"] <= h["entropy/p95"] + 1e-6 and h["entropy/mean"] <= h["entropy/top20_mean"] + 1e-6
        # Same tokens, same entropies: our mean equals TRL's own `entropy` metric.
        assert h["entropy/mean"] == pytest.approx(h["entropy"], rel=1e-5)
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before), "no trainable parameter changed"
    if peft:
        assert all("lora" in n for n in before)


def test_same_loss_and_weights_as_trl(tmp_path):
    """The base only observes: on the same seed and data it trains exactly like TRL's GRPOTrainer (with TRL's
    own model.generate: the continuous-batching decoder draws the same distribution in another order)."""
    ours = make(tmp_path / "ours", hf_continuous_batching=False)
    ours.train()

    def trl_run(out):
        return trl.GRPOTrainer(model=load_model("tiny-qwen2"), reward_funcs=[digit_reward],
                               args=trl.GRPOConfig(**config_kwargs(out)), train_dataset=dataset(),
                               processing_class=load_tokenizer("tiny-qwen2"))

    # the base scores only the completion positions on the CPU (TRL's CUDA path; the loss, log-probs and
    # gradients are TRL's CPU path's to float rounding, test_compact_lm_head_equals_every_position_scoring)
    theirs = trl_run(tmp_path / "trl")
    with compact_lm_head_on_cpu(torch.device("cpu")):
        theirs.train()
    losses = lambda t: [h["loss"] for h in t.state.log_history if "loss" in h]  # noqa: E731
    assert losses(ours) == losses(theirs)
    for (n, p), (_, q) in zip(ours.model.named_parameters(), theirs.model.named_parameters()):
        assert torch.equal(p, q), n


def _weights(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_resume_equals_uninterrupted(tmp_path, peft):
    full = make(tmp_path / "full", peft=peft, max_steps=4, save_strategy="steps", save_steps=2)
    full.train()
    resumed = make(tmp_path / "resumed", peft=peft, max_steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    losses = lambda t: [h["loss"] for h in t.state.log_history if "loss" in h]  # noqa: E731
    assert losses(resumed)[-2:] == pytest.approx(losses(full)[-2:], abs=1e-6)
    a, b = _weights(full), _weights(resumed)
    for n in a:
        assert torch.allclose(a[n], b[n], atol=1e-6), n


class Counter:
    def __init__(self):
        self.count = 0

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]


class CountingTrainer(GRPOTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.counter = Counter()
        self.method_states["counter"] = self.counter

    def _compute_loss(self, model, inputs):
        self.counter.count += 1
        return super()._compute_loss(model, inputs)


def test_method_state_saved_and_restored(tmp_path):
    t = make(tmp_path / "a", cls=CountingTrainer, max_steps=3, save_strategy="steps", save_steps=2)
    t.train()
    saved = json.loads((tmp_path / "a" / "checkpoint-2" / "posttrain_state.json").read_text())
    assert saved == {"counter": {"count": 2}}
    r = make(tmp_path / "b", cls=CountingTrainer, max_steps=3)
    r.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert r.counter.count == 3  # 2 restored + 1 step after the resume


def test_missing_method_state_is_an_error(tmp_path):
    make(tmp_path / "plain", max_steps=2, save_strategy="steps", save_steps=2).train()
    r = make(tmp_path / "b", cls=CountingTrainer, max_steps=3)
    with pytest.raises(FileNotFoundError, match="cannot restore method state"):
        r.train(resume_from_checkpoint=str(tmp_path / "plain" / "checkpoint-2"))


def test_rollouts_jsonl_every_n_steps(tmp_path):
    """rollouts.jsonl: one line per completion of every N-th step, with rewards, advantages and mean entropy."""
    import json

    from posttrain.models import load_model, load_tokenizer
    from posttrain.trainers.grpo import GRPOConfig, GRPOTrainer
    from tests.trainers.tiny_setting import config_kwargs, dataset, digit_reward

    t = GRPOTrainer(model=load_model("tiny-qwen2"), reward_funcs=[digit_reward],
                    args=GRPOConfig(**config_kwargs(tmp_path, max_steps=3, rollouts_log_steps=2)),
                    train_dataset=dataset(), processing_class=load_tokenizer("tiny-qwen2"))
    t.train()
    lines = [json.loads(x) for x in (tmp_path / "rollouts.jsonl").read_text().splitlines()]
    assert sorted({x["step"] for x in lines}) == [0, 2] and len(lines) == 16  # steps 0 and 2, 8 completions each
    first = [x for x in lines if x["step"] == 0]
    assert [x["row"] for x in first] == list(range(8))
    assert all(set(x["rewards"]) == {"accuracy"} and 0 <= x["rewards"]["accuracy"] <= 1 for x in lines)
    assert all(x["entropy_mean"] > 0 and 1 <= x["length"] <= 12 for x in lines)
    history = [h for h in t.state.log_history if "reward" in h]
    assert sum(x["rewards"]["accuracy"] for x in first) / 8 == pytest.approx(history[0]["reward"], abs=1e-6)
    assert abs(sum(x["advantage"] for x in first)) < 1e-4  # group-normalised advantages sum to ~0


def test_loss_forward_on_cpu_scores_only_the_completion_tokens(tmp_path, scored_positions):
    """TRL's fused LM head scores every position off Triton devices; the base makes it score only the labelled
    (completion) positions on the CPU, and leaves TRL's switch as it was afterwards."""
    import trl.trainer.utils as trl_utils

    scored = scored_positions
    switch = trl_utils._use_triton
    masks = []
    trainer = make(tmp_path)
    compute_loss = trainer._compute_loss
    trainer._compute_loss = lambda model, inputs: masks.append(int(inputs["completion_mask"].sum())) or compute_loss(
        model, inputs)
    trainer.train()
    assert masks and scored[-len(masks):] == masks
    assert trl_utils._use_triton is switch


def test_compact_lm_head_equals_every_position_scoring():
    from trl.trainer.utils import add_fused_lm_head

    model = load_model("tiny-qwen2")
    add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))
    ids = torch.randint(3, 200, (4, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:], mask[2, :3] = 0, 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :5] = -100
    results = []
    for compact in (False, True):
        model.zero_grad()
        with compact_lm_head_on_cpu(torch.device("cpu" if compact else "meta")):
            out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        (out.log_probs.sum() + 0.1 * out.entropy.sum()).backward()
        results.append([out.log_probs.detach(), out.entropy.detach()]
                       + [p.grad.clone() for p in model.parameters()])
    for ours, theirs in zip(*results, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
