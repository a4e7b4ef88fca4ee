"""Reward models and ensembles on tiny-qwen2: the three member forms behind one interface, members that differ by
seed and equal a single model trained with that seed, the saved folder's checks, label noise, held-out accuracy,
resuming, and the recipe checks that run before any model loads."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file, save_file

from posttrain.algos.ensembles import aggregate
from posttrain.pipelines.reward import MEMBER_FILE, with_label_noise
from posttrain.recipe import RecipeError
from posttrain.rewards.ensemble import HEAD_FILE, RewardEnsemble, load_reward_model, reward_input_ids
from posttrain.train import run_recipe
from posttrain.trainers.reward import RewardConfig, RewardTrainer, init_reward_head
from tests.trainers.reward_setting import answer, question, recipe, trained_ensemble, write_pairs

FORMS = ["full", "lora", "heads"]
PROMPTS = [question(2, 3), question(4, 4), question(1, 9), question(6, 2)]
COMPLETIONS = [answer("The answer is \\boxed{5}."), answer("It is 7"), answer("10"), answer("The answer is 9")]


def _single_member(folder, form, k):
    """Member k as a standalone sequence-classification model, built without RewardEnsemble."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    member = folder / f"member_{k}"
    if form == "full":
        model = AutoModelForSequenceClassification.from_pretrained(member)
    else:
        model = load_reward_model("tiny-qwen2")
        if form == "lora":
            model = PeftModel.from_pretrained(model, member)
        else:
            model.score.load_state_dict(load_file(member / HEAD_FILE))
    return model.eval()


@pytest.mark.parametrize("form", FORMS)
def test_three_forms_same_interface_and_each_member_equals_its_single_model(form):
    folder = trained_ensemble(form)
    ens = RewardEnsemble.from_pretrained(folder)
    assert (ens.form, ens.k, ens.seeds) == (form, 2, [42, 43])
    for how in ("mean", "wco", "uwo"):
        agg, scores = ens(PROMPTS, COMPLETIONS, how=how, uwo_lambda=0.5)
        assert agg.shape == (4,) and scores.shape == (2, 4) and scores.dtype == torch.float32
        assert torch.equal(agg, aggregate(ens.standardize(scores), how, 0.5))
    ids = reward_input_ids(ens.tokenizer, PROMPTS, COMPLETIONS)
    assert len({len(x) for x in ids}) > 1  # the batch needs padding: pooling at the last real token is tested
    with torch.inference_mode():
        for k in range(2):
            single = _single_member(folder, form, k)
            reference = torch.stack([single(input_ids=torch.tensor([x])).logits[0, 0] for x in ids])  # unpadded
            assert torch.allclose(scores[k], reference, atol=1e-5), (form, k)
    assert (scores[0] - scores[1]).abs().max() > 1e-4  # members trained with different seeds differ
    one = RewardEnsemble.from_pretrained(folder, members=[1])
    assert one.k == 1 and one.seeds == [43] and torch.allclose(one.scores(PROMPTS, COMPLETIONS)[0], scores[1])



@pytest.mark.parametrize("form", FORMS)
def test_a_shared_prompt_runs_once_and_scores_stay_those_of_whole_sequences(form, monkeypatch):
    """Three completions of each of two prompts: the batches in token order hold one prompt each, its prefix runs
    once and the completions continue from its cache; the scores equal those of the whole sequences."""
    import posttrain.rewards.ensemble as ensemble_module

    folder = trained_ensemble(form)
    ens = RewardEnsemble.from_pretrained(folder, batch_size=3)
    prompts = [PROMPTS[0]] * 3 + [PROMPTS[2]] * 3
    completions = [answer("5"), answer("The answer is \\boxed{5}."), answer("It is five, I think"),
                   answer("10"), answer("It is 7"), answer("The sum is \\boxed{10}. Done.")]
    prefixes = []
    real = ensemble_module._with_prefix
    monkeypatch.setattr(ensemble_module, "_with_prefix", lambda fn, batch, p, *a: prefixes.append(p) or real(
        fn, batch, p, *a))
    shared = ens.scores(prompts, completions)
    ids = reward_input_ids(ens.tokenizer, prompts, completions)
    prompt_tokens = len(reward_input_ids(ens.tokenizer, [PROMPTS[0]], [[]])[0])
    assert prefixes and min(prefixes) >= prompt_tokens - 2  # the whole prompt (up to the assistant header) shared
    whole = torch.cat([ensemble_module.pooled_outputs(fn, ids, ens.tokenizer.pad_token_id, ens.device, 3,
                                                      share_prefix=False) for fn in ens._scorers()], dim=1).T
    torch.testing.assert_close(shared, whole, atol=1e-5, rtol=0)
    with torch.inference_mode():
        single = _single_member(folder, form, 1)
        reference = torch.stack([single(input_ids=torch.tensor([x])).logits[0, 0] for x in ids])
    torch.testing.assert_close(shared[1], reference, atol=1e-5, rtol=0)


def test_no_shared_prefix_when_a_continuation_would_be_only_padding():
    """A sequence whose tokens after the shared prefix are all the pad id would pool at the wrong token: such a
    batch runs whole."""
    from posttrain.rewards.ensemble import MIN_SHARED_PREFIX, pooled_outputs

    calls = []

    def fn(input_ids, attention_mask, past_key_values):
        calls.append((input_ids.shape, past_key_values is not None))
        return input_ids.float().sum(1, keepdim=True)

    head = list(range(10, 10 + MIN_SHARED_PREFIX + 2))
    out = pooled_outputs(fn, [head + [0, 0], head + [5, 6, 7]], pad_token_id=0, device="cpu", batch_size=2)
    assert calls == [((2, len(head) + 3), False)] and out[:, 0].tolist() == [sum(head), sum(head) + 18]
    calls.clear()
    pooled_outputs(fn, [head + [3, 0], head + [5, 6, 7]], pad_token_id=0, device="cpu", batch_size=2)
    # the prefix once (filling a cache), then the continuations from it
    assert calls == [((1, len(head)), True), ((2, 3), True)]


def test_training_writes_each_members_calibration_on_reference_responses(tmp_path):
    """ensemble.json holds each member's score mean and deviation on the held-out pairs' responses (on training
    pairs without held-out data); the aggregates standardise with it."""
    from posttrain.rewards.ensemble import EnsembleManifest

    folder = trained_ensemble("heads")
    cal = EnsembleManifest.read(folder).calibration
    assert cal["source"].startswith("held-out pairs") and cal["n"] == 24  # 12 pairs, chosen and rejected
    ens = RewardEnsemble.from_pretrained(folder, normalize=False)
    eval_pairs = [json.loads(line) for line in (folder.parent / "ensemble-pairs" / "eval.jsonl").open()]
    raw = ens.scores([r["prompt"] for r in eval_pairs] * 2, [r["chosen"] for r in eval_pairs] +
                     [r["rejected"] for r in eval_pairs])
    torch.testing.assert_close(torch.tensor(cal["mean"], dtype=torch.float64), raw.double().mean(1), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(cal["std"], dtype=torch.float64), raw.double().std(1, correction=0),
                               atol=1e-5, rtol=0)
    z = RewardEnsemble.from_pretrained(folder).standardize(raw)
    torch.testing.assert_close(z.mean(1), torch.zeros(2), atol=1e-5, rtol=0)
    assert torch.equal(ens.standardize(raw), raw)  # normalize=False: raw scores
    one = RewardEnsemble.from_pretrained(folder, members=[1])
    assert one.manifest.calibration["mean"] == [cal["mean"][1]]
    run_recipe(recipe(tmp_path / "noeval", "heads", data={"train": str(write_pairs(tmp_path / "p.jsonl", 10))},
                      trainer={"num_members": 2}))
    cal = EnsembleManifest.read(tmp_path / "noeval").calibration
    assert cal["source"].startswith("training pairs") and cal["n"] == 20


def test_a_member_offset_does_not_change_the_standardised_aggregates(tmp_path):
    """A reward model is defined up to an additive constant: shift member 0's head bias by +10 and, once calibrated
    on the same responses, WCO and UWO rank responses as before; on raw scores the shifted member drops out of
    WCO's minimum."""
    folder = tmp_path / "ens"
    shutil.copytree(trained_ensemble("heads"), folder)
    responses = [answer(f"The answer is {i}.") for i in range(8)]
    prompts = [PROMPTS[i % 4] for i in range(8)]
    before = RewardEnsemble.from_pretrained(folder)
    before.calibrate(prompts, responses)
    head = load_file(folder / "member_0" / HEAD_FILE)
    head["bias"] = head.get("bias", torch.zeros(1)) + 10.0
    save_file(head, folder / "member_0" / HEAD_FILE)
    after = RewardEnsemble.from_pretrained(folder)
    after.calibrate(prompts, responses)
    for how in ("wco", "uwo"):
        torch.testing.assert_close(after(PROMPTS, COMPLETIONS, how=how)[0], before(PROMPTS, COMPLETIONS, how=how)[0],
                                   atol=1e-4, rtol=0)
    raw = after.scores(PROMPTS, COMPLETIONS)
    assert torch.equal(aggregate(raw, "wco"), raw[1])  # raw: the minimum is always the unshifted member


def test_an_ensemble_without_calibration_aggregates_raw_scores_with_a_warning(tmp_path, caplog):
    folder = tmp_path / "ens"
    shutil.copytree(trained_ensemble("heads"), folder)
    manifest = json.loads((folder / "ensemble.json").read_text())
    manifest.pop("calibration")
    (folder / "ensemble.json").write_text(json.dumps(manifest))
    with caplog.at_level("WARNING"):
        ens = RewardEnsemble.from_pretrained(folder)
    assert "no calibration" in caplog.text
    agg, scores = ens(PROMPTS, COMPLETIONS, how="wco")
    assert torch.equal(agg, aggregate(scores, "wco"))
    ens.calibrate(PROMPTS, COMPLETIONS)
    ens.save_calibration()
    assert json.loads((folder / "ensemble.json").read_text())["calibration"]["n"] == 4

def test_member_weights_differ_by_seed_and_heads_members_hold_only_the_head():
    heads = trained_ensemble("heads")
    w = [load_file(heads / f"member_{k}" / HEAD_FILE)["weight"] for k in range(2)]
    assert w[0].shape == (1, 128) and not torch.equal(w[0], w[1])
    assert not (heads / "member_0" / "model.safetensors").exists()
    lora = trained_ensemble("lora")
    a = [load_file(lora / f"member_{k}" / "adapter_model.safetensors") for k in range(2)]
    assert any(k.endswith("score.weight") for k in a[0])  # each adapter carries its own head
    assert any(not torch.equal(a[0][k], a[1][k]) for k in a[0] if "lora_A" in k)


def test_seed_sets_the_head_initialisation_and_the_data_order(tmp_path):
    model = load_reward_model("tiny-qwen2")
    init_reward_head(model, 1)
    first = model.score.weight.clone()
    init_reward_head(model, 1)
    assert torch.equal(first, model.score.weight)
    init_reward_head(model, 2)
    assert not torch.equal(first, model.score.weight)
    from transformers import set_seed

    from posttrain.data.preferences import PreferenceSource, load_preferences
    from posttrain.models import load_tokenizer

    pairs = load_preferences(PreferenceSource(path=str(write_pairs(tmp_path / "p.jsonl"))))
    tokenizer = load_tokenizer("tiny-qwen2")
    orders = []
    for seed in (1, 2, 1):
        args = RewardConfig(output_dir=str(tmp_path / f"s{seed}"), seed=seed, per_device_train_batch_size=4,
                            use_cpu=True, bf16=False, report_to=[])
        trainer = RewardTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer)
        set_seed(seed)  # what Trainer.train() does before it draws the order
        batch = next(iter(trainer.get_train_dataloader()))
        orders.append(batch["input_ids"])
    assert not torch.equal(orders[0], orders[1]) and torch.equal(orders[0], orders[2])


@pytest.mark.parametrize("form", ["lora", "heads"])
def test_an_ensemble_member_equals_a_single_reward_model_with_its_seed(tmp_path, form):
    """Members share one base: the previous member's adapter or head must leave no trace in the next one."""
    run_recipe(recipe(tmp_path / "one", form, method="reward", seed=43, eval={"after": False}))
    member = RewardEnsemble.from_pretrained(trained_ensemble(form), members=[1]).scores(PROMPTS, COMPLETIONS)
    single = RewardEnsemble.from_pretrained(tmp_path / "one").scores(PROMPTS, COMPLETIONS)
    assert torch.allclose(member, single, atol=1e-6)


def test_heads_on_cached_features_equal_heads_trained_with_the_base_in_the_loop(tmp_path):
    result = run_recipe(recipe(tmp_path / "loop", "heads", trainer={"cache_features": False}, eval={"after": False}))
    assert "feature_minutes" not in result.summary
    cached_folder = trained_ensemble("heads")
    assert "feature_minutes" in json.loads((cached_folder / "report" / "summary.json").read_text())
    cached = RewardEnsemble.from_pretrained(cached_folder).scores(PROMPTS, COMPLETIONS)
    loop = RewardEnsemble.from_pretrained(tmp_path / "loop").scores(PROMPTS, COMPLETIONS)
    assert torch.allclose(cached, loop, atol=1e-5)
    for k in range(2):
        a = load_file(cached_folder / f"member_{k}" / HEAD_FILE)["weight"]
        b = load_file(tmp_path / "loop" / f"member_{k}" / HEAD_FILE)["weight"]
        assert torch.allclose(a, b, atol=1e-6)


def test_single_reward_model_is_a_plain_trl_folder_and_a_one_member_ensemble(tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "rm"
    result = run_recipe(recipe(out, "full", method="reward", trainer={"max_steps": 2}, eval={"after": False}))
    assert result.summary["steps"] == 2 and result.summary["k"] == 1
    plain = AutoModelForSequenceClassification.from_pretrained(out)  # what TRL's GRPO takes as a reward model
    ens = RewardEnsemble.from_pretrained(out)
    ids = reward_input_ids(ens.tokenizer, PROMPTS[:1], COMPLETIONS[:1])
    with torch.inference_mode():
        assert torch.allclose(ens.scores(PROMPTS[:1], COMPLETIONS[:1])[0], plain(input_ids=torch.tensor(ids)).logits[:, 0])


def test_scoring_inputs_are_trls_training_inputs(tmp_path):
    """reward_input_ids reproduces RewardTrainer's tokenisation of chosen responses (conversational and plain)."""
    from posttrain.models import load_tokenizer

    tokenizer = load_tokenizer("tiny-qwen2")
    conv = Dataset.from_list([{"prompt": question(1, 2), "chosen": answer("3"), "rejected": answer("4")},
                              {"prompt": question(5, 5), "chosen": answer("It is 10"), "rejected": answer("9")}])
    plain = Dataset.from_list([{"prompt": "1 + 2 =", "chosen": " 3", "rejected": " 4"},
                               {"prompt": "5 + 5 =", "chosen": " 10<|im_end|>", "rejected": " 9"}])
    for ds in (conv, plain):
        args = RewardConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[])
        trainer = RewardTrainer(model=load_reward_model("tiny-qwen2"), args=args, train_dataset=ds,
                                processing_class=tokenizer)
        expected = [trainer.train_dataset[i]["chosen_ids"] for i in range(2)]
        assert reward_input_ids(tokenizer, ds["prompt"], ds["chosen"]) == expected


def test_heads_training_leaves_the_base_frozen(tmp_path):
    from posttrain.data.preferences import PreferenceSource, load_preferences
    from posttrain.models import load_tokenizer

    model = load_reward_model("tiny-qwen2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = RewardConfig(output_dir=str(tmp_path), form="heads", max_steps=3, learning_rate=0.05,
                        per_device_train_batch_size=4, use_cpu=True, bf16=False, report_to=[], disable_tqdm=True)
    pairs = load_preferences(PreferenceSource(path=str(write_pairs(tmp_path / "p.jsonl"))))
    trainer = RewardTrainer(model=model, args=args, train_dataset=pairs, processing_class=load_tokenizer("tiny-qwen2"))
    trainer.train()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == ["score.weight"]
    trainer.save_model(str(tmp_path / "saved"))
    assert torch.equal(load_file(tmp_path / "saved" / HEAD_FILE)["weight"], model.score.weight)
    with pytest.raises(ValueError, match="trains no adapter"):
        RewardTrainer(model=model, args=args, train_dataset=pairs, peft_config=object())


def test_bad_member_folder_or_missing_head_fails_naming_the_path(tmp_path):
    heads = tmp_path / "heads"
    shutil.copytree(trained_ensemble("heads"), heads)
    (heads / "member_1" / HEAD_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=str(heads / "member_1" / HEAD_FILE)):
        RewardEnsemble.from_pretrained(heads)
    save_file({"weight": torch.zeros(1, 7)}, str(heads / "member_1" / HEAD_FILE))
    with pytest.raises(ValueError, match=rf"{heads / 'member_1' / HEAD_FILE}: expected a head weight of shape \(1, 128\)"):
        RewardEnsemble.from_pretrained(heads)
    shutil.rmtree(heads / "member_1")
    with pytest.raises(FileNotFoundError, match=f"member folder not found: {heads / 'member_1'}"):
        RewardEnsemble.from_pretrained(heads)
    with pytest.raises(ValueError, match=r"members \[5\] not in 0..1"):
        RewardEnsemble.from_pretrained(heads, members=[5])
    (heads / "ensemble.json").unlink()
    with pytest.raises(FileNotFoundError, match=f"{heads / 'ensemble.json'} not found"):
        RewardEnsemble.from_pretrained(heads)

    lora = tmp_path / "lora"
    shutil.copytree(trained_ensemble("lora"), lora)
    weights = lora / "member_0" / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if "score" not in k}, str(weights))
    with pytest.raises(ValueError, match=f"{weights}: the adapter has no reward head"):
        RewardEnsemble.from_pretrained(lora)

    full = tmp_path / "full"
    shutil.copytree(trained_ensemble("full"), full)
    (full / "member_1" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=f"{full / 'member_1'}: no config.json"):
        RewardEnsemble.from_pretrained(full)
    manifest = json.loads((full / "ensemble.json").read_text())
    (full / "ensemble.json").write_text(json.dumps({**manifest, "form": "twin"}))
    with pytest.raises(ValueError, match="form must be one of full, lora, heads, got 'twin'"):
        RewardEnsemble.from_pretrained(full)


def test_label_noise_flips_a_seeded_share_of_pairs():
    ds = Dataset.from_list([{"prompt": f"q{i}", "chosen": f"good{i}", "rejected": f"bad{i}"} for i in range(2000)])
    noisy, flipped = with_label_noise(ds, 0.25, seed=3)
    assert 0.22 * 2000 < flipped < 0.28 * 2000 and sum(noisy["label_flipped"]) == flipped
    for row in noisy:
        i = row["prompt"][1:]
        assert (row["chosen"], row["rejected"]) == ((f"bad{i}", f"good{i}") if row["label_flipped"]
                                                    else (f"good{i}", f"bad{i}"))
    assert with_label_noise(ds, 0.25, seed=3)[0]["label_flipped"] == noisy["label_flipped"]
    assert with_label_noise(ds, 0.25, seed=4)[0]["label_flipped"] != noisy["label_flipped"]
    assert with_label_noise(ds, 0.0, seed=3)[1] == 0


def test_held_out_accuracy_of_members_and_aggregates_is_reported():
    report = trained_ensemble("heads") / "report"
    summary = json.loads((report / "summary.json").read_text())
    ev = summary["eval_after"]
    assert ev["n_pairs"] == 12 and set(ev["accuracy"]) == {"member_0", "member_1", "mean", "wco", "uwo"}
    records = [json.loads(line) for line in (report / "eval_pairs.jsonl").read_text().splitlines()]
    assert len(records) == 12 and len(records[0]["chosen"]) == 2
    for k in range(2):
        acc = sum(r["chosen"][k] > r["rejected"][k] for r in records) / 12
        assert ev["accuracy"][f"member_{k}"] == pytest.approx(acc)
    wco = sum(min(r["chosen"]) > min(r["rejected"]) for r in records) / 12
    assert ev["accuracy"]["wco"] == pytest.approx(wco)
    assert summary["form"] == "heads" and summary["k"] == 2 and len(summary["members"]) == 2
    assert summary["peak_rss_gb"] > 0 and summary["train_pairs"] == 24
    readme = (report / "README.md").read_text()
    assert "| wco |" in readme and "| member | seed |" in readme


def test_resume_skips_finished_members(tmp_path, capsys):
    r = recipe(tmp_path / "ens", "heads", trainer={"num_members": 2, "max_steps": 1}, eval={"after": False})
    run_recipe(r)
    head0 = (tmp_path / "ens" / "member_0" / HEAD_FILE).read_bytes()
    (tmp_path / "ens" / "member_1" / MEMBER_FILE).unlink()
    (tmp_path / "ens" / "member_1" / HEAD_FILE).unlink()
    result = run_recipe(r, resume=True)
    assert "member 0 already trained" in capsys.readouterr().out
    assert (tmp_path / "ens" / "member_0" / HEAD_FILE).read_bytes() == head0
    assert (tmp_path / "ens" / "member_1" / HEAD_FILE).is_file() and len(result.summary["members"]) == 2
    with pytest.raises(ValueError, match="resumes member by member"):
        run_recipe(r, resume=str(tmp_path / "ens" / "member_1"))


def test_recipe_checks_name_the_key_before_any_model_loads(tmp_path, monkeypatch):
    import posttrain.rewards.ensemble as ensemble

    monkeypatch.setattr(ensemble, "load_reward_model", lambda *a, **k: pytest.fail("model loaded before checks"))
    base = {"method": "reward_ensemble", "model": {"name_or_path": "tiny-qwen2"}, "output_dir": str(tmp_path),
            "data": {"train": "pairs.jsonl"}}
    cases = [
        ({"trainer": {"form": "lora"}}, "trainer.form: 'lora' needs model.peft"),
        ({"model": {"name_or_path": "tiny-qwen2", "peft": {"r": 4}}, "trainer": {"form": "heads"}},
         "model.peft: set, but trainer.form is 'heads'"),
        ({"trainer": {"num_members": 3, "member_seeds": [1, 2]}}, "trainer.member_seeds: needs 3 distinct seeds"),
        ({"data": {}}, "data.train: required"),
        ({"data": {"train": {"hub_id": "a/b", "path": "x.jsonl"}}}, "data.train: give hub_id or path/build, not both"),
        ({"rewards": ["accuracy"]}, "rewards: method 'reward_ensemble' (kind 'reward') does not read a rewards section"),
        ({"trainer": {"form": "twin"}}, "trainer.form: expected one of 'full', 'lora', 'heads'"),
        ({"data": {"train": "p.jsonl", "label_noise": 0.7}}, "data.label_noise: must be <= 0.5"),
        ({"trainer": {"form": "heads", "fsdp": "full_shard"}}, "trainer.form: 'heads' trains small scoring heads"),
        ({"trainer": {"form": "heads", "deepspeed": {"zero_optimization": {"stage": 3}}}},
         "there is nothing for zero3 to shard"),
    ]
    for change, message in cases:
        with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            from posttrain.recipe import recipe_from_dict

            recipe_from_dict({**base, **change})
    with pytest.raises(FileNotFoundError, match="preference file not found"):
        run_recipe(recipe(tmp_path / "x", "heads", data={"train": str(tmp_path / "absent.jsonl")}))
