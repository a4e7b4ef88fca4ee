"""Held-out preference pairs: log-probs as TRL's DPOTrainer computes them, the pair metrics, and `kind: pairs`
suite entries through the harness and `posttrain eval`."""

from __future__ import annotations

import json

import pytest
import torch
import trl
from datasets import Dataset

from posttrain.eval.api import evaluate
from posttrain.eval.preference import pair_logps, pair_metrics
from posttrain.eval.report import write_results
from posttrain.eval.suite import SuiteError, suite_from_dict
from posttrain.models import load_model, load_tokenizer
from tests.trainers.test_dpo_shift import pairs


def _standard(n: int = 8) -> list[dict]:
    return [{"prompt": f"Q: what is {i} + 2?\nA:", "chosen": f" {i + 2}", "rejected": f" {i + 7} or so"}
            for i in range(n)]


@pytest.mark.parametrize("fmt", ["conversational", "standard"])
def test_pair_logps_equal_what_trls_dpo_logs(tmp_path, fmt):
    """At the first step (policy = start), TRL logs the mean sequence log-probs of the batch: ours must match."""
    rows = [dict(r) for r in pairs(8)] if fmt == "conversational" else _standard(8)
    tokenizer = load_tokenizer("tiny-qwen2")
    chosen, rejected = pair_logps(load_model("tiny-qwen2"), tokenizer, rows, batch_size=3)
    config = trl.DPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=8, use_cpu=True,
                           bf16=False, report_to=[], save_strategy="no", disable_tqdm=True,
                           gradient_checkpointing=False)
    trainer = trl.DPOTrainer(model=load_model("tiny-qwen2"), args=config, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer)
    trainer.train()
    logged = trainer.state.log_history[0]
    assert sum(chosen) / 8 == pytest.approx(logged["logps/chosen"], rel=1e-5)
    assert sum(rejected) / 8 == pytest.approx(logged["logps/rejected"], rel=1e-5)
    assert all(c < 0 for c in chosen)


def test_pair_metrics_hand_computed():
    policy = ([-10.0, -20.0, -5.0], [-30.0, -18.0, -9.0])
    reference = ([-12.0, -19.0, -5.5], [-25.0, -20.0, -8.0])
    m, se = pair_metrics(policy, reference)
    # d_w = [2, -1, 0.5], d_l = [-5, 2, -1]; d_w - d_l = [7, -3, 1.5]
    assert m["n_pairs"] == 3 and m["logps/chosen"] == pytest.approx(-35 / 3)
    assert m["logps/chosen_change"] == pytest.approx(0.5) and m["logps/rejected_change"] == pytest.approx(-4 / 3)
    assert m["chosen_up"] == pytest.approx(2 / 3) and m["reward_accuracy"] == pytest.approx(2 / 3)
    assert m["margin"] == pytest.approx(5.5 / 3) and se["margin"] > 0
    only = pair_metrics(policy)[0]
    assert set(only) == {"n_pairs", "logps/chosen", "logps/rejected"}


def _pairs_file(tmp_path, n=6):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in pairs(n)))
    return path


def test_a_pairs_entry_against_the_adapter_off_reference(tmp_path):
    from peft import get_peft_model

    from posttrain.models.loading import lora_config

    model = get_peft_model(load_model("tiny-qwen2"), lora_config(4, 8, 0.0, "all-linear", None))
    with torch.no_grad():  # a trained-looking adapter (LoRA starts as the identity)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    suite = suite_from_dict({"name": "p", "tasks": [{"name": "held", "kind": "pairs", "path": "pairs.jsonl",
                                                     "limit": 5}]})
    _pairs_file(tmp_path)
    out = tmp_path / "ev"
    results = evaluate(None, load_tokenizer("tiny-qwen2"), suite, out, hf_model=model, data_dir=tmp_path)
    m = results["tasks"]["held"]["metrics"]
    assert m["n_pairs"] == 5 and m["logps/chosen_change"] != 0 and 0 <= m["reward_accuracy"] <= 1
    records = [json.loads(x) for x in (out / "samples_held.jsonl").read_text().splitlines()]
    assert len(records) == 5 and records[0]["logp_chosen"] - records[0]["ref_logp_chosen"] != 0
    saved = json.loads((out / "results.json").read_text())
    assert "pair_logps" not in saved and saved["tasks"]["held"]["kind"] == "pairs"
    assert (out / "pairs_held.png").read_bytes()[:4] == b"\x89PNG" and "reward_accuracy" in (out / "results.md").read_text()
    write_results(out, results)  # results with their raw log-probs still serialise


def test_cli_eval_on_pairs_with_a_base_model(tmp_path, capsys):
    from posttrain.cli import main

    path = _pairs_file(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--model", "tiny-qwen2", "--base-model", "tiny-qwen2", "--suite", "eval/pairs.yaml",
              "--path", f"heldout_pairs={path}", "--output", str(tmp_path / "ev"), "--no-progress"])
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    assert "heldout_pairs: n_pairs 6.000" in printed
    m = json.loads((tmp_path / "ev" / "results.json").read_text())["tasks"]["heldout_pairs"]["metrics"]
    assert m["logps/chosen_change"] == 0 and m["reward_accuracy"] == 0  # the model is its own reference


def test_pairs_entries_are_validated():
    with pytest.raises(SuiteError, match="a 'pairs' entry reads the preference pairs"):
        suite_from_dict({"name": "p", "tasks": [{"name": "held", "kind": "pairs", "lm_eval": "x"}]})
    with pytest.raises(SuiteError, match="expected one of 'generate', 'pairs'"):
        suite_from_dict({"name": "p", "tasks": [{"name": "held", "kind": "pair"}]})
