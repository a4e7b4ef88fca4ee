"""Best-of-n (`posttrain bon`): picks, per-sample records and curves from one sampling pass, and the command."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.algos.ensembles import aggregate, best_of_n_kl
from posttrain.data import get_task
from posttrain.eval.bon import best_of_n, bon_curves
from posttrain.models import load_tokenizer
from posttrain.rewards.ensemble import RewardEnsemble
from posttrain.rollout.base import Completion, GenerationOutput
from tests.trainers.reward_setting import trained_ensemble


class ScriptedEngine:
    """Completions that depend on the prompt's answer: the right one, near misses, and chatter."""

    def __init__(self, rows):
        self.rows = rows
        self.calls = []

    def generate(self, prompts, sampling):
        self.calls.append((len(prompts), sampling.n, sampling.seed))
        out = []
        for p in prompts:
            row = next(r for r in self.rows if r["prompt"][-1]["content"] in p)
            a = int(row["answer"])
            texts = [f"The answer is \\boxed{{{a}}}.", f"It is {a + 1}", f"{a - 1}", "Let us compute step by step",
                     f"so {a}", f"It is {a + 2}"][: sampling.n]
            out.append(GenerationOutput(prompt=p, prompt_token_ids=[], completions=[
                Completion(token_ids=[1] * (i + 1), text=t, finish_reason="stop") for i, t in enumerate(texts)]))
        return out


def test_best_of_n_writes_picks_scores_and_curves(tmp_path):
    task = get_task("arithmetic")
    rows = list(task.load(split="test", limit=5))
    folder = trained_ensemble("heads")
    ensemble = RewardEnsemble.from_pretrained(folder)
    engine = ScriptedEngine(rows)
    results = best_of_n(engine, load_tokenizer("tiny-qwen2"), ensemble, task, rows, tmp_path, n=6, aggregate="wco",
                        chunk_size=2, seed=7, progress=False)
    assert [c[:2] for c in engine.calls] == [(2, 6), (2, 6), (1, 6)] and [c[2] for c in engine.calls] == [7, 9, 11]
    records = [json.loads(line) for line in (tmp_path / "samples_bon.jsonl").read_text().splitlines()]
    assert len(records) == 5 and len(records[0]["completions"]) == 6 and len(records[0]["member_scores"]) == 2
    gold = torch.tensor([r["gold"] for r in records])
    assert gold[:, 0].eq(1).all() and gold[:, 4].eq(1).all() and gold[:, 1].eq(0).all()  # the task's grader
    scores = torch.tensor([r["member_scores"] for r in records]).permute(1, 0, 2)  # raw [K, M, N]
    wco = aggregate(ensemble.standardize(scores).reshape(2, -1), "wco").reshape(5, 6)  # aggregated standardised
    assert results["ensemble"]["standardized"]
    for i, r in enumerate(records):
        assert r["picks"]["wco"] == int(torch.nonzero(wco[i] == wco[i].max())[-1])  # ties: the later sample
    assert results["picks"]["gold_mean"] == pytest.approx(gold[torch.arange(5), wco.argmax(1)].mean().item())
    assert results["ns"] == list(range(1, 7)) and results["kl"] == pytest.approx([best_of_n_kl(n) for n in range(1, 7)])
    curves = results["curves"]
    assert set(curves) == {"mean", "wco", "uwo", "member_0", "member_1"}
    assert curves["wco"]["gold"][0] == pytest.approx(gold.mean().item())  # n = 1: the mean gold
    assert curves["wco"]["gold"][-1] == pytest.approx(results["picks"]["gold_mean"])  # n = N: the pick's gold
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"]["aggregate"] == "wco" and saved["ensemble"]["k"] == 2 and "versions" in saved
    assert (tmp_path / "bon.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| wco |" in (tmp_path / "results.md").read_text()
    with pytest.raises(KeyError, match="unknown ensemble_aggregate"):
        best_of_n(engine, None, ensemble, task, rows, tmp_path, aggregate="median")


def test_curves_of_a_perfect_proxy_rise_and_the_fit_is_reported():
    g = torch.Generator().manual_seed(0)
    gold = torch.randn(20, 16, generator=g, dtype=torch.float64)
    out = bon_curves(gold.unsqueeze(0), gold, ["mean", "wco"])  # K = 1, proxy = gold
    curve = out["curves"]["mean"]["gold"]
    assert all(b >= a - 1e-9 for a, b in zip(curve, curve[1:]))
    assert out["curves"]["mean"]["gold"] == pytest.approx(out["curves"]["wco"]["gold"])  # K = 1: aggregates agree
    assert out["curves"]["mean"]["proxy"] == pytest.approx(curve)
    assert out["fits"]["mean"]["a"] > 0 and out["sqrt_kl"][0] == 0.0


def test_bon_command_end_to_end(tmp_path, capsys):
    from posttrain.cli import main

    with pytest.raises(SystemExit) as code:
        main(["bon", "--model", "tiny-qwen2", "--ensemble", str(trained_ensemble("heads")), "--limit", "3", "--n", "4",
              "--aggregate", "uwo", "--max-new-tokens", "6", "--no-progress", "--output", str(tmp_path)])
    assert code.value.code == 0
    assert "best-of-4 by uwo" in capsys.readouterr().out
    for name in ("results.json", "results.md", "samples_bon.jsonl", "bon.png"):
        assert (tmp_path / name).is_file(), name
    with pytest.raises(SystemExit) as code:
        main(["bon", "--model", "tiny-qwen2", "--ensemble", str(tmp_path), "--output", str(tmp_path / "x")])
    assert code.value.code == 2 and "ensemble.json not found" in capsys.readouterr().err


def test_bon_help_documents_the_command(capsys):
    from posttrain.cli import main

    with pytest.raises(SystemExit):
        main(["bon", "--help"])
    text = capsys.readouterr().out
    for word in ("--ensemble", "--aggregate", "wco", "uwo", "KL(n) = log n - (n-1)/n", "results.json", "bon.png"):
        assert word in text, word
