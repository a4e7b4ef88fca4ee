"""ContinualTrainer on the tiny model: the EMA hook (first step moves nothing, the dynamic weight per tensor, one
update per optimizer step under gradient accumulation, frozen tensors untouched, the end-of-stage replacement,
real gradients asserted), the replay buffer, I-LoRA's consistency term, and the checkpointed states."""

from __future__ import annotations

import random

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from posttrain.algos.ema import DynamicEMAArgs, dynamic_ema_weight, ema_update
from posttrain.models import load_model, load_tokenizer, lora_config
from posttrain.trainers.continual import (
    AdapterEMA,
    ContinualConfig,
    ContinualTrainer,
    ReplayBuffer,
    refuse_unreal_gradients,
)
from posttrain.trainers.state import load_states, save_states


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The tiny model's small matrices run faster on one thread (no spin-waiting on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _dataset(n: int = 16) -> Dataset:
    words = ["red", "green", "blue", "black"]
    return Dataset.from_list([{"prompt": [{"role": "user", "content": f"Colour {i}? Option: {', '.join(words)}"}],
                               "completion": [{"role": "assistant", "content": words[i % 4]}]} for i in range(n)])


def _model():
    from peft import get_peft_model

    torch.manual_seed(0)  # the same LoRA initialisation in every trainer of a test
    return get_peft_model(load_model("tiny-qwen2"), lora_config(r=4, alpha=8), adapter_name="group_0")


def _config(tmp_path, **kw) -> ContinualConfig:
    base = dict(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                logging_steps=1, use_cpu=True, bf16=False, report_to=[], save_strategy="no", seed=0,
                disable_tqdm=True, gradient_checkpointing=False, lr_scheduler_type="constant")
    base.update(kw)
    return ContinualConfig(**base)


def _trainer(tmp_path, model=None, callbacks=None, **kw):
    cfg = _config(tmp_path, **kw)
    ema = AdapterEMA(cfg.ema, cfg.ema_args(), cfg.ema_apply_to) if cfg.ema != "none" else None
    return ContinualTrainer(model=model or _model(), args=cfg, train_dataset=_dataset(),
                            processing_class=load_tokenizer("tiny-qwen2"), ema=ema, callbacks=callbacks)


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# --- AdapterEMA on hand-made tensors -----------------------------------------------------------------------------


def _params(values: dict[str, list[float]], grads: dict[str, list[float]]) -> list[tuple[str, torch.Tensor]]:
    out = []
    for name, v in values.items():
        p = torch.nn.Parameter(torch.tensor(v))
        p.grad = torch.tensor(grads[name])
        out.append((name, p))
    return out


def test_first_step_initialises_the_ema_and_moves_nothing() -> None:
    ema = AdapterEMA("dynamic")
    params = _params({"a": [1.0, 2.0], "b": [3.0]}, {"a": [0.1, 0.1], "b": [0.5]})
    ema.update(params)
    assert all(torch.equal(ema.ema[n], p) for n, p in params) and ema.steps == 1 and ema.stats() == {}
    assert torch.equal(ema.prev_grad["a"], torch.tensor([0.1, 0.1]))


def test_second_step_uses_each_tensors_own_weight() -> None:
    ema = AdapterEMA("dynamic", DynamicEMAArgs(scale=2.0, fallback=0.01))
    ema.update(_params({"a": [0.0, 0.0], "b": [1.0]}, {"a": [0.0, 0.0], "b": [0.3]}))
    # a: theta - ema = [5, 5] (a = 10), g = [0.5, 0.5] (b = 1), g - g_prev = [0.5, 0.5] (c = 1): w = 0.4
    # b: a = 0.5, b = 0.3, c = 0.1: w = 2 * 1.3 / 0.05 = 52 -> the fallback 0.01
    step = _params({"a": [5.0, 5.0], "b": [1.5]}, {"a": [0.5, 0.5], "b": [0.4]})
    ema.update(step)
    assert ema.last_weights == {"a": pytest.approx(0.4), "b": 0.01}
    assert torch.allclose(ema.ema["a"], torch.tensor([2.0, 2.0]))  # 0.6 * 0 + 0.4 * 5
    assert torch.equal(ema.ema["b"], torch.tensor([1.0]) * 0.99 + torch.tensor([1.5]) * 0.01)
    assert ema.stats() == {"ema/weight_mean": pytest.approx(0.205), "ema/fallback_frac": 0.5}
    old = AdapterEMA("dynamic", apply_to="old")
    old.update(_params({"a": [0.0, 0.0]}, {"a": [0.0, 0.0]}))
    old.update(_params({"a": [5.0, 5.0]}, {"a": [0.5, 0.5]}))
    assert torch.allclose(old.ema["a"], torch.tensor([3.0, 3.0]))  # 0.4 * 0 + 0.6 * 5


def test_missing_gradient_is_refused_with_a_clear_message() -> None:
    ema = AdapterEMA("dynamic")
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(RuntimeError, match="has no gradient after the optimizer step.*DeepSpeed ZeRO"):
        ema.update([("lora_A.weight", p)])
    stub = torch.nn.Parameter(torch.empty(0))  # a ZeRO-3 parameter outside its gather: no data, an empty grad
    stub.grad = torch.empty(0)
    with pytest.raises(RuntimeError, match=r"lora_B.weight \(shape \(0,\)\) has a gradient of shape \(0,\)"):
        ema.update([("lora_B.weight", stub)])
    fixed = AdapterEMA("fixed")  # the fixed weight reads no gradient
    fixed.update([("w", torch.nn.Parameter(torch.ones(3)))])
    assert fixed.steps == 1


def test_deepspeed_and_fsdp_are_refused() -> None:
    class Fake:
        is_deepspeed_enabled, is_fsdp_enabled = True, False

    with pytest.raises(ValueError, match="DeepSpeed ZeRO keeps"):
        refuse_unreal_gradients(Fake(), "trainer.ema: dynamic")
    Fake.is_deepspeed_enabled, Fake.is_fsdp_enabled = False, True
    with pytest.raises(ValueError, match="FSDP shards"):
        refuse_unreal_gradients(Fake(), "trainer.ema: dynamic")


def test_ema_state_round_trips_exactly_through_a_checkpoint(tmp_path) -> None:
    ema = AdapterEMA("dynamic")
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        ema.update(_params({"x": torch.randn(4, generator=g).tolist()}, {"x": torch.randn(4, generator=g).tolist()}))
    replay = ReplayBuffer(3, seed=1)
    for i in range(7):
        replay.add({"input_ids": [i, i + 1], "labels": [-100, i + 1]})
    save_states({"ema": ema, "replay": replay}, tmp_path)
    ema2, replay2 = AdapterEMA("dynamic"), ReplayBuffer(3, seed=99)
    load_states({"ema": ema2, "replay": replay2}, tmp_path)
    assert torch.equal(ema2.ema["x"], ema.ema["x"]) and torch.equal(ema2.prev_grad["x"], ema.prev_grad["x"])
    assert ema2.steps == 3 and ema2.last_weights == ema.last_weights
    assert replay2.items == replay.items and replay2.seen == 7
    assert replay2.sample(2) == replay.sample(2)  # the random state came back too
    with pytest.raises(ValueError, match="checkpoint EMA is dynamic/new"):
        AdapterEMA("fixed").load_state_dict(ema.state_dict())


def test_reservoir_keeps_each_row_with_equal_probability() -> None:
    counts = [0] * 50
    for seed in range(400):
        buf = ReplayBuffer(10, seed=seed)
        for i in range(50):
            buf.add({"input_ids": [i], "labels": [i]})
        assert len(buf) == 10 and buf.seen == 50
        for row in buf.items:
            counts[row["input_ids"][0]] += 1
    # each of the 50 rows should be kept in 10/50 of the runs: 80 of 400 (binomial sd 8)
    assert all(40 <= c <= 120 for c in counts), counts
    assert abs(sum(counts[:25]) - sum(counts[25:])) < 200


# --- the hook inside a real trainer -------------------------------------------------------------------------------


class _Recorder(TrainerCallback):
    """Weights after every optimizer step, and at the stage's end before the EMA replacement runs."""

    def __init__(self):
        self.steps: list[dict[str, torch.Tensor]] = []
        self.before_end: dict[str, torch.Tensor] = {}

    def on_optimizer_step(self, args, state, control, model=None, **kw):
        self.steps.append(_trainable(model))

    def on_train_end(self, args, state, control, model=None, **kw):
        self.before_end = _trainable(model)


def test_the_hook_follows_the_formula_and_replaces_the_adapter_at_the_end(tmp_path) -> None:
    recorder = _Recorder()
    trainer = _trainer(tmp_path, callbacks=[recorder])
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    grads: list[dict[str, torch.Tensor]] = []

    class Grads(TrainerCallback):
        def on_optimizer_step(self, args, state, control, model=None, **kw):
            grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad})

    trainer.add_callback(Grads())
    trainer.train()
    ema = trainer.ema
    assert ema.steps == 3 and len(recorder.steps) == 3
    # brute force: replay the recorded weights and gradients through the formula
    expected = {n: t.clone() for n, t in recorder.steps[0].items()}
    for k in (1, 2):
        for n, theta in recorder.steps[k].items():
            w = dynamic_ema_weight(theta, expected[n], grads[k][n], grads[k - 1][n])
            expected[n] = ema_update(expected[n], theta, w)
    assert expected.keys() == ema.ema.keys()
    assert all(torch.allclose(expected[n], ema.ema[n], rtol=0, atol=1e-7) for n in expected)
    # at the end the live adapter IS the EMA, and that changed it (the EMA lags the live weights)
    live = _trainable(trainer.model)
    assert all(torch.equal(live[n], ema.ema[n]) for n in live)
    assert any(not torch.equal(recorder.before_end[n], live[n]) for n in live)
    # frozen tensors (the base model) untouched, and no EMA of them
    after = {n: p for n, p in trainer.model.named_parameters() if not p.requires_grad}
    assert all(torch.equal(frozen[n], after[n]) for n in frozen) and not set(frozen) & set(ema.ema)
    assert all("lora_" in n for n in ema.ema)


def test_one_update_per_optimizer_step_under_gradient_accumulation(tmp_path) -> None:
    accumulated = _trainer(tmp_path / "ga", per_device_train_batch_size=2, gradient_accumulation_steps=2)
    accumulated.train()
    whole = _trainer(tmp_path / "one", per_device_train_batch_size=4, gradient_accumulation_steps=1)
    whole.train()
    assert accumulated.ema.steps == whole.ema.steps == 3
    # 2 x 2 rows accumulated = the same 4 rows at once: the same gradients, weights and EMA (up to float sums)
    for n, t in whole.ema.ema.items():
        torch.testing.assert_close(accumulated.ema.ema[n], t, rtol=1e-4, atol=1e-6)


def test_fixed_ema_and_no_ema(tmp_path) -> None:
    fixed = _trainer(tmp_path / "fixed", ema="fixed", ema_weight=0.5)
    fixed.train()
    assert all(w == 0.5 for w in fixed.ema.last_weights.values()) and not fixed.ema.prev_grad
    plain = _trainer(tmp_path / "none", ema="none")
    plain.train()
    assert plain.ema is None and "ema" not in plain.method_states


def test_replayed_rows_join_the_batch_and_the_loss_normaliser(tmp_path) -> None:
    replay = ReplayBuffer(8, seed=0)
    cfg = _config(tmp_path, ema="none", replay_size=8, replay_batch_size=3)
    trainer = ContinualTrainer(model=_model(), args=cfg, train_dataset=_dataset(), processing_class=load_tokenizer(
        "tiny-qwen2"), replay=replay, replay_active=True)
    old = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, -100, 8, 9]} for _ in range(4)]
    for row in old:
        replay.add(row)
    loader = iter(trainer.get_train_dataloader())
    batches, num_items = trainer.get_batch_samples(loader, 1, torch.device("cpu"))
    batch = batches[0]
    assert batch["input_ids"].shape[0] == 4 + 3 and batch["replay_mask"].tolist() == [False] * 4 + [True] * 3
    assert int((batch["labels"][4:] != -100).sum()) == 3 * 2
    assert int(num_items) == int((batch["labels"][:, 1:] != -100).sum())  # the replayed tokens count too
    assert replay.seen == 8 and len(replay) == 8  # the batch's own rows went into the buffer after sampling
    trainer.replay_active = False
    batches, _ = trainer.get_batch_samples(loader, 1, torch.device("cpu"))
    assert "replay_mask" not in batches[0] and batches[0]["input_ids"].shape[0] == 4


def test_ilora_consistency_term_is_added_on_replayed_rows(tmp_path) -> None:
    cfg = _config(tmp_path, ema="fixed", ema_weight=0.75, ema_output="slow", replay_size=16, consistency_weight=1.0,
                  max_steps=3)
    ema = AdapterEMA("fixed", cfg.ema_args())
    replay = ReplayBuffer(16, seed=0)
    trainer = ContinualTrainer(model=_model(), args=cfg, train_dataset=_dataset(), processing_class=load_tokenizer(
        "tiny-qwen2"), ema=ema, replay=replay, replay_active=True)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert "consistency" not in logs[0]  # step 1: the buffer is empty
    assert logs[1]["consistency"] == 0  # step 2: the slow weights were initialised to the live ones at step 1
    assert logs[2]["consistency"] > 0  # step 3: they differ
    live = _trainable(trainer.model)
    assert any(not torch.equal(live[n], ema.ema[n]) for n in live)  # `slow`: no replacement at the end


def test_hidden_consistency_formula() -> None:
    from posttrain.algos.ema import hidden_consistency

    fast = [torch.zeros(1, 2, 2, requires_grad=True), torch.ones(1, 2, 2, requires_grad=True)]
    slow = [torch.ones(1, 2, 2), torch.ones(1, 2, 2)]
    mask = torch.tensor([[1, 0]])
    # layer 0: (0 - 1)^2 on the 2 values of the real token; layer 1: 0 -> (2 + 0) / (2 * 2)
    term = hidden_consistency(fast, slow, mask)
    assert term.item() == pytest.approx(0.5)
    term.backward()
    assert fast[0].grad[0, 1].abs().sum() == 0 and fast[0].grad[0, 0].abs().sum() > 0
    assert hidden_consistency(fast, slow, torch.zeros(1, 2)).item() == 0


def test_random_seed_is_not_consumed_by_the_hook(tmp_path) -> None:
    """The EMA hook must not touch the RNG, so runs with and without it see the same dropout and data."""
    state = random.getstate(), torch.get_rng_state()
    ema = AdapterEMA("dynamic")
    ema.update(_params({"a": [1.0]}, {"a": [1.0]}))
    ema.update(_params({"a": [2.0]}, {"a": [0.5]}))
    assert random.getstate() == state[0] and torch.equal(torch.get_rng_state(), state[1])


def test_method_state_with_tensors_round_trips_and_missing_state_is_an_error(tmp_path) -> None:
    from posttrain.trainers.continual import EvalHistory

    history = EvalHistory()
    history.records.append({"stage": 1, "step": 5, "accuracy": {"sst2": 0.5}})
    t = torch.randn(3, 2, dtype=torch.float64)

    class Holder:
        def __init__(self, value):
            self.value = value

        def state_dict(self):
            return {"nested": [{"t": self.value}, 3]}

        def load_state_dict(self, state):
            self.value = state["nested"][0]["t"]

    save_states({"history": history, "tensor": Holder(t)}, tmp_path)
    back, holder = EvalHistory(), Holder(None)
    load_states({"history": back, "tensor": holder}, tmp_path)
    assert back.records == history.records and torch.equal(holder.value, t) and holder.value.dtype == torch.float64
    with pytest.raises(KeyError, match="has no state for"):
        load_states({"ema": AdapterEMA("dynamic")}, tmp_path)


# --- the fused LM head on the CPU ---------------------------------------------------------------------------------


def test_sft_scores_only_the_completion_positions_and_equals_trl(tmp_path, scored_positions):
    """TRL's fused LM head scores every prompt and padding position off Triton devices; posttrain's SFT trainers
    make it score only the labelled (completion) positions on the CPU, with TRL's loss and gradient to rounding."""
    import trl
    import trl.trainer.utils as trl_utils

    from posttrain.trainers.continual import SFTConfig, SFTTrainer

    scored = scored_positions
    switch = trl_utils._use_triton
    results = []
    for cls, config_cls in ((SFTTrainer, SFTConfig), (trl.SFTTrainer, trl.SFTConfig)):
        kw = {k: v for k, v in vars(_config(tmp_path)).items() if k in trl.SFTConfig.__dataclass_fields__}
        trainer = cls(model=_model(), args=config_cls(**{**kw, "output_dir": str(tmp_path / cls.__module__)}),
                      train_dataset=_dataset(), processing_class=load_tokenizer("tiny-qwen2"))
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        scored.clear()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        labels = batch["labels"][:, 1:]
        results.append((scored[:], loss.detach(), _grads(trainer.model), int((labels != -100).sum()), labels.numel()))
    (ours, loss, grads, labelled, positions), (theirs, trl_loss, trl_grads, _, _) = results
    assert ours == [labelled] and theirs == [positions] and labelled < positions / 2
    torch.testing.assert_close(loss, trl_loss, atol=1e-6, rtol=1e-6)
    assert grads.keys() == trl_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], trl_grads[name], atol=1e-6, rtol=1e-4, msg=name)
    assert trl_utils._use_triton is switch


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
