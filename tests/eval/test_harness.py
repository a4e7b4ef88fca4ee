"""The suite harness with a scripted engine (no model): numbers, per-sample files, resume after interruption."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.eval.api import evaluate
from posttrain.eval.harness import ResumeMismatch, evaluate_suite, read_records, summarize_records
from posttrain.eval.metrics import pass_at_k
from posttrain.eval.suite import load_suite


def _suite(tmp_path: Path, data: Path, n: int = 4, extra: str = "") -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text(f"""
name: toy
sampling: {{n: {n}, temperature: 1.0, max_new_tokens: 8}}
tasks:
  - {{name: add, task: arithmetic, path: {data}, prompt_format: plain}}
{extra}""")
    return path


def test_metrics_match_the_samples(tmp_path, addition_data, scripted_engine):
    # prompt i gets (i % 5) right answers out of 4 samples (capped at 4)
    engine = scripted_engine(right=lambda i, n: min(i % 5, n))
    suite = load_suite(_suite(tmp_path, addition_data))
    out = tmp_path / "out"
    results = evaluate(engine, None, suite, out, model_info={"name_or_path": "scripted"})
    m, se = results["tasks"]["add"]["metrics"], results["tasks"]["add"]["stderr"]
    counts = [min(i % 5, 4) for i in range(10)]
    assert m["n_prompts"] == 10 and m["n_samples"] == 40 and m["n"] == 4
    assert m["accuracy"] == pytest.approx(sum(counts) / 40)
    for k in range(1, 5):
        assert m[f"pass@{k}"] == pytest.approx(sum(pass_at_k(4, c, k) for c in counts) / 10)
    assert m["pass@1"] == pytest.approx(m["accuracy"])
    # maj@4: the right answer is repeated c times, each wrong answer is unique -> majority right iff c >= 2,
    # or c == 1 (a 1-1-1-1 tie goes to the first sample, which is the right one)
    assert m["maj@4"] == pytest.approx(sum(c >= 1 for c in counts) / 10)
    assert m["groups/frac_all_correct"] == pytest.approx(0.2) and m["groups/frac_all_wrong"] == pytest.approx(0.2)
    assert m["unique_answers"] == pytest.approx(sum((1 if c else 0) + (4 - c) for c in counts) / 10)
    assert m["entropy/mean"] == pytest.approx(1.0) and se["entropy/mean"] == pytest.approx(0.0)
    assert m["length/mean"] == pytest.approx(4.5)  # lengths 3, 4, 5, 6
    assert se["accuracy"] > 0
    # every output file, and results.json agrees with the per-sample file
    for name in ("results.json", "results.md", "samples_add.jsonl", "pass_at_k.png", "entropy_add.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "results.json").read_text())
    records = read_records(out / "samples_add.jsonl")
    assert [r["index"] for r in records] == list(range(10))
    assert saved["tasks"]["add"]["metrics"] == pytest.approx(summarize_records(records)[0])
    assert saved["model"]["name_or_path"] == "scripted" and "torch" in saved["versions"]
    assert "entropies" not in saved
    assert "| add | 10 | 4 | 0.500 ±" in (out / "results.md").read_text()


def test_interrupted_run_resumes_without_recomputing(tmp_path, addition_data, scripted_engine):
    suite = load_suite(_suite(tmp_path, addition_data))
    out = tmp_path / "out"
    first = scripted_engine(fail_after=2)  # chunks of 3 prompts: 2 chunks done, then killed
    with pytest.raises(KeyboardInterrupt):
        evaluate_suite(first, None, suite, out, chunk_size=3, progress=False)
    assert first.n_prompts == 6
    samples = out / "samples_add.jsonl"
    assert len(read_records(samples)) == 6
    with samples.open("a") as f:  # killed in the middle of writing a record
        f.write('{"index": 6, "id": "q6", "prom')
    second = scripted_engine()
    results = evaluate_suite(second, None, suite, out, chunk_size=3, progress=False)
    assert second.n_prompts == 4  # only prompts 6..9 generated again
    assert all("#6 " in p or "#7 " in p or "#8 " in p or "#9 " in p for call in second.calls for p in call)
    info = results["tasks"]["add"]["info"]
    assert info["resumed"] == 6 and info["generated"] == 4
    records = read_records(samples)
    assert [r["index"] for r in records] == list(range(10))
    fresh = evaluate_suite(scripted_engine(), None, suite, tmp_path / "fresh", chunk_size=3, progress=False)
    assert results["tasks"]["add"]["metrics"] == fresh["tasks"]["add"]["metrics"]
    # a finished run costs nothing to re-run; a larger limit only adds the new prompts
    third = scripted_engine()
    evaluate_suite(third, None, suite, out, chunk_size=3, progress=False)
    assert third.n_prompts == 0


def test_resume_refuses_other_config_and_overwrite_restarts(tmp_path, addition_data, scripted_engine):
    out = tmp_path / "out"
    evaluate_suite(scripted_engine(), None, load_suite(_suite(tmp_path, addition_data, n=4)), out, progress=False)
    other = load_suite(_suite(tmp_path, addition_data, n=2))
    with pytest.raises(ResumeMismatch, match="different model, task or sampling"):
        evaluate_suite(scripted_engine(), None, other, out, progress=False)
    engine = scripted_engine()
    evaluate_suite(engine, None, other, out, progress=False, resume=False)
    assert engine.n_prompts == 10
    assert all(len(r["completions"]) == 2 for r in read_records(out / "samples_add.jsonl"))


def test_grader_choice_in_suite(tmp_path, addition_data, scripted_engine):
    # extractor last_number + grader exact: "\boxed{3}" -> "3"; the task default grades the box the same
    suite = load_suite(_suite(tmp_path, addition_data, n=1, extra=(
        f"  - {{name: add_exact, task: arithmetic, path: {addition_data}, extractor: last_number, grader: exact}}\n"
        f"  - {{name: add_choice, task: arithmetic, path: {addition_data}, extractor: choice, grader: choice}}\n")))
    res = evaluate_suite(scripted_engine(), None, suite, tmp_path / "o", progress=False)["tasks"]
    assert res["add"]["metrics"]["accuracy"] == res["add_exact"]["metrics"]["accuracy"] == 0.5
    assert res["add_choice"]["metrics"]["accuracy"] == 0.0 and res["add_choice"]["metrics"]["no_answer"] == 1.0


def test_training_log_adds_curves_with_the_entropy_law(tmp_path, addition_data, scripted_engine):
    from posttrain.eval.report import read_log_history

    history = [{"step": i, "reward": 0.2 + 0.05 * i, "entropy/mean": 1.0 - 0.08 * i} for i in range(8)]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    assert read_log_history(tmp_path / "run") == history
    with pytest.raises(FileNotFoundError, match="no trainer_state.json"):
        read_log_history(tmp_path)
    suite = load_suite(_suite(tmp_path, addition_data, n=1))
    res = evaluate(scripted_engine(), None, suite, tmp_path / "o", log_history=read_log_history(tmp_path / "run"))
    assert "training_curves.png" in res["plots"]
    assert (tmp_path / "o" / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sampled_prompts_never_share_a_seed_across_chunks(tmp_path, addition_data, scripted_engine):
    """Engines seed prompt i of a call with seed + i*n .. seed + i*n + n - 1 (vLLM's per-sample seeds); chunk
    seeds must step by n per row so that two prompts of a task never draw the same noise when n > 1."""
    from posttrain.rollout.vllm import _prompt_seeds

    class Recording(scripted_engine):
        def __init__(self):
            super().__init__()
            self.seeds = []

        def generate(self, prompts, sampling):
            self.seeds.append(sampling.seed)
            starts = _prompt_seeds(sampling, len(prompts))
            self.sample_seeds = getattr(self, "sample_seeds", []) + [s + j for s in starts for j in range(sampling.n)]
            return super().generate(prompts, sampling)

    engine = Recording()
    evaluate_suite(engine, None, load_suite(_suite(tmp_path, addition_data, n=4)), tmp_path / "out", chunk_size=3,
                   progress=False)
    assert len(engine.seeds) == 4  # 10 rows in chunks of 3
    assert len(engine.sample_seeds) == 40 and len(set(engine.sample_seeds)) == 40


def test_lm_eval_style_results_file_reads_with_lm_evals_table(tmp_path, addition_data, scripted_engine):
    """Besides results.json, a results_<timestamp>.json in lm-eval's aggregated format that lm-eval's own reader
    (make_table) and file finder (get_results_filenames) take."""
    lm_utils = pytest.importorskip("lm_eval.utils")
    engine = scripted_engine(right=lambda i, n: min(i % 5, n))
    out = tmp_path / "out"
    results = evaluate(engine, None, load_suite(_suite(tmp_path, addition_data)), out, model_info={"name_or_path": "m"})
    files = lm_utils.get_results_filenames([str(p) for p in out.iterdir()])
    assert len(files) == 1
    data = json.loads(Path(files[0]).read_text())
    row = data["results"]["add"]
    assert row["exact_match,none"] == pytest.approx(results["tasks"]["add"]["metrics"]["accuracy"])
    assert row["exact_match_stderr,none"] == pytest.approx(results["tasks"]["add"]["stderr"]["accuracy"])
    assert row["pass@4,none"] == pytest.approx(results["tasks"]["add"]["metrics"]["pass@4"])
    table = lm_utils.make_table(data)
    assert "exact_match" in table and f"{row['exact_match,none']:.4f}" in table
    assert data["n-samples"]["add"] == {"original": 10, "effective": 10} and data["model_name"] == "m"
