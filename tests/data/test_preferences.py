"""Preference pairs: TRL's formats, row checks that name file and line, and the offline pair builder."""

from __future__ import annotations

import json

import pytest

from posttrain.data.preferences import (
    PairBuildSpec,
    PreferenceSource,
    build_preference_pairs,
    check_preference_row,
    load_preferences,
    resolve_preferences,
)
from posttrain.rollout.base import Completion, GenerationOutput

USER = [{"role": "user", "content": "What is 2 + 2?"}]


def _assistant(text):
    return [{"role": "assistant", "content": text}]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_standard_and_conversational_rows_pass_unchanged():
    row = {"prompt": "2+2?", "chosen": "4", "rejected": "5", "id": "a"}
    assert check_preference_row(row, "f:1") == row
    conv = {"prompt": USER, "chosen": _assistant("4"), "rejected": _assistant("5")}
    assert check_preference_row(conv, "f:1") == conv


def test_implicit_prompt_is_extracted_from_shared_turns():
    row = {"chosen": USER + _assistant("4"), "rejected": USER + _assistant("5")}
    out = check_preference_row(row, "f:1")
    assert out["prompt"] == USER and out["chosen"] == _assistant("4") and out["rejected"] == _assistant("5")


def test_ultrafeedback_style_string_prompt_beside_conversations():
    row = {"prompt": "What is 2 + 2?", "chosen": USER + _assistant("4"), "rejected": USER + _assistant("5"),
           "score_chosen": 8.0}
    out = check_preference_row(row, "f:1")
    assert out["prompt"] == USER and out["chosen"] == _assistant("4") and out["score_chosen"] == 8.0


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "chosen": "a"}, "f.jsonl:3: missing field 'rejected'"),
    ({"chosen": "a", "rejected": "b"}, "f.jsonl:3: missing field 'prompt'"),
    ({"prompt": "p", "chosen": "  ", "rejected": "b"}, "f.jsonl:3: empty 'chosen' response"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "f.jsonl:3: 'chosen' and 'rejected' are identical"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "f.jsonl:3: empty 'prompt'"),
    ({"prompt": "p", "chosen": "a", "rejected": _assistant("b")}, "both be strings or both be message lists"),
    ({"prompt": USER, "chosen": "a", "rejected": "b"}, "mix the standard"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, "'chosen' must be a string or a list of chat messages"),
    ({"chosen": _assistant("a"), "rejected": _assistant("b")}, "share no leading turns"),
])
def test_bad_rows_are_named(row, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_preference_row(row, "f.jsonl:3")


def test_load_names_the_file_and_line_of_a_bad_row(tmp_path):
    path = _write(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"},
                                             {"prompt": "q", "chosen": "c", "rejected": "d"},
                                             {"prompt": "r", "chosen": "e", "rejected": "e"}])
    with pytest.raises(ValueError, match=f"{path}:3: 'chosen' and 'rejected' are identical"):
        load_preferences(PreferenceSource(path=str(path)))
    ds = load_preferences(PreferenceSource(path=str(path), limit=2))
    assert ds.column_names == ["prompt", "chosen", "rejected"] and len(ds) == 2


def test_mixed_formats_and_missing_files_are_refused(tmp_path):
    path = _write(tmp_path / "mixed.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"},
                                             {"prompt": USER, "chosen": _assistant("a"), "rejected": _assistant("b")}])
    with pytest.raises(ValueError, match="mix the standard and conversational"):
        load_preferences(PreferenceSource(path=str(path)))
    with pytest.raises(FileNotFoundError, match="preference file not found"):
        load_preferences(PreferenceSource(path=str(tmp_path / "absent.jsonl")))


def test_source_problems():
    assert PreferenceSource().problems("data.train") == [
        "data.train: needs path (a JSONL file), hub_id (a Hub dataset) or build (pairs from a task)"]
    assert PreferenceSource(hub_id="a/b", path="x").problems("data.eval") == [
        "data.eval: give hub_id or path/build, not both"]
    assert PreferenceSource(build=PairBuildSpec()).problems("data.train") == []


class ScriptedEngine:
    """Returns fixed completions per prompt, in order: the builder's pairing logic is what is tested here."""

    def __init__(self, texts_per_prompt):
        self.texts = texts_per_prompt
        self.calls = []

    def generate(self, prompts, sampling):
        self.calls.append((len(prompts), sampling.n))
        return [GenerationOutput(prompt=p, prompt_token_ids=[], completions=[
            Completion(token_ids=[1], text=t, finish_reason="stop") for t in texts])
            for p, texts in zip(prompts, self.texts)]


def _arith_answers(n):
    from posttrain.data import get_task

    return [r["answer"] for r in get_task("arithmetic").load(split="train", limit=n)]


def test_builder_pairs_correct_over_wrong_and_uses_the_reference_for_all_wrong(tmp_path):
    a0, a1, a2 = _arith_answers(3)
    engine = ScriptedEngine([
        [f"It is {a0}", "It is 999", "It is 998", f"It is {a0}"],  # 1 correct text, 2 wrong: 2 sampled pairs
        ["It is 997", "It is 996", "It is 996", "It is 995"],  # all wrong: reference pairs
        [f"{a2}", f"so {a2}", f"= {a2}", f"{a2}!"],  # all right: no pair
    ])
    build = PairBuildSpec(num_prompts=3, n=4, max_pairs_per_prompt=2, seed=1)
    path = build_preference_pairs("scripted", build, tmp_path / "p.jsonl", tokenizer=None, engine=engine)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert engine.calls == [(3, 4)]
    first = [r for r in rows if r["answer"] == a0]
    assert len(first) == 2 and all(r["chosen"] == _assistant(f"It is {a0}") for r in first)
    assert {r["rejected"][0]["content"] for r in first} == {"It is 999", "It is 998"}
    assert all(r["chosen_score"] == 1.0 and r["rejected_score"] == 0.0 for r in rows)
    second = [r for r in rows if r["answer"] == a1]
    assert len(second) == 2 and all(r["chosen"] == _assistant(f"The final answer is \\boxed{{{a1}}}.") for r in second)
    assert not [r for r in rows if r["answer"] == a2]
    meta = json.loads((tmp_path / "p.meta.json").read_text())
    assert meta["pairs"] == 4 and meta["counts"] == {"prompts": 3, "samples": 12, "sampled_pairs": 2,
                                                     "reference_pairs": 2, "prompts_without_pair": 1,
                                                     "correct_samples": 6}
    assert meta["build"]["seed"] == 1 and meta["model"] == "scripted"
    ds = load_preferences(PreferenceSource(path=str(path)))  # the builder's output passes the row checks
    assert len(ds) == 4 and ds[0]["prompt"][0]["role"] == "user"


def test_builder_without_reference_fails_clearly_when_nothing_pairs(tmp_path):
    engine = ScriptedEngine([["x 990", "x 991"]])
    build = PairBuildSpec(num_prompts=1, n=2, reference_chosen=False)
    with pytest.raises(ValueError, match="no preference pairs from 1 prompts"):
        build_preference_pairs("scripted", build, tmp_path / "p.jsonl", engine=engine)


def test_builder_with_a_custom_scorer_orders_by_score(tmp_path):
    engine = ScriptedEngine([["short", "a longer one", "the longest answer here"]])
    build = PairBuildSpec(num_prompts=1, n=3, max_pairs_per_prompt=3, reference_chosen=False)
    path = build_preference_pairs("scripted", build, tmp_path / "p.jsonl", engine=engine,
                                  scorer=lambda text, answer: float(len(text)))
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(rows) == 3 and all(r["chosen_score"] > r["rejected_score"] for r in rows)


def test_resolve_builds_once_then_reuses_and_refuses_other_settings(tmp_path):
    calls = []

    def fake_build(model, build, path):
        calls.append(model)
        _write(path, [{"prompt": "p", "chosen": "a", "rejected": "b"}])
        path.with_name(path.name.removesuffix(".jsonl") + ".meta.json").write_text(
            json.dumps({"build": json.loads(json.dumps(vars(build))), "model": model}))

    source = PreferenceSource(path=str(tmp_path / "pairs.jsonl"), build=PairBuildSpec(num_prompts=4))
    assert resolve_preferences(source, "m", build_fn=fake_build) == tmp_path / "pairs.jsonl"
    assert resolve_preferences(source, "m", build_fn=fake_build) == tmp_path / "pairs.jsonl"
    assert calls == ["m"]
    other = PreferenceSource(path=str(tmp_path / "pairs.jsonl"), build=PairBuildSpec(num_prompts=5))
    with pytest.raises(ValueError, match="built with other settings"):
        resolve_preferences(other, "m", build_fn=fake_build)
    assert resolve_preferences(PreferenceSource(hub_id="a/b"), "m") is None


def test_cache_path_depends_on_model_and_settings(tmp_path, monkeypatch):
    from posttrain.data.preferences import pairs_cache_path

    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path))
    a = pairs_cache_path(PairBuildSpec(), "m1")
    assert a.parent == tmp_path / "pairs" and a.name.startswith("arithmetic-train-")
    assert a != pairs_cache_path(PairBuildSpec(), "m2") != pairs_cache_path(PairBuildSpec(seed=3), "m1")


def test_cli_builds_pairs_with_the_tiny_model(tmp_path, capsys):
    from posttrain.cli import main

    out = tmp_path / "pairs.jsonl"
    with pytest.raises(SystemExit) as exit_:
        main(["data", "preferences", "--model", "tiny-qwen2", "--num-prompts", "6", "--n", "4",
              "--max-new-tokens", "8", "--option", "max_value=15", "--option", "num_eval=20", "--output", str(out)])
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    assert "pairs (" in printed and str(out) in printed
    ds = load_preferences(PreferenceSource(path=str(out)))
    meta = json.loads((tmp_path / "pairs.meta.json").read_text())
    assert len(ds) == meta["pairs"] > 0 and meta["build"]["options"] == {"max_value": 15, "num_eval": 20}
    assert meta["counts"]["samples"] == 24


def test_resolve_builds_real_pairs_once_with_the_tiny_model(tmp_path):
    build = PairBuildSpec(num_prompts=4, n=3, max_new_tokens=6, options={"max_value": 15, "num_eval": 20})
    source = PreferenceSource(path=str(tmp_path / "pairs.jsonl"), build=build)
    path = resolve_preferences(source, "tiny-qwen2")
    first = path.read_text()
    meta = json.loads((tmp_path / "pairs.meta.json").read_text())
    assert meta["model"] == "tiny-qwen2" and meta["pairs"] > 0
    path.write_text(first + "")  # the second call must read this file, not rebuild it
    mtime = path.stat().st_mtime_ns
    assert resolve_preferences(source, "tiny-qwen2") == path and path.stat().st_mtime_ns == mtime
    assert len(load_preferences(source, path)) == meta["pairs"]
