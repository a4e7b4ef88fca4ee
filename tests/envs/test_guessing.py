"""The multi-turn guessing game: game rules, sparse terminal reward, the TRL rollout (env tokens masked,
turns counted) and EPO trained on it end to end through the recipe pipeline."""

import json

import pytest

from posttrain.envs import GuessingGame, GuessingGameTool, GuessingTask, guessing_reward, secrets_from_dataset
from posttrain.envs.guessing import _feedback_ids
from posttrain.models import load_tokenizer


def test_game_feedback_and_sparse_reward():
    g = GuessingGame(secret=7, max_turns=3)
    assert g.step("I guess 4") == "higher" and g.reward() == 0.0
    assert g.step("10") == "lower" and not g.done
    assert g.step("then 7") == "correct" and g.done and g.reward() == 1.0
    with pytest.raises(RuntimeError):
        g.step("8")
    lost = GuessingGame(secret=2, max_turns=2)
    lost.step("no idea"), lost.step("5")
    assert lost.done and lost.reward() == 0.0 and lost.history == [None, 5]


def test_tool_environment_interface():
    env = GuessingGameTool(max_turns=2)
    assert env.reset(secret=3) is None
    assert env.guess(1) == "higher" and env.guess(3) == "correct" and env.get_reward() == 1.0
    assert env.guess(3) == "The game is over."


def test_task_prompts_unique_and_secrets_recoverable():
    ds = GuessingTask(n=20).load()
    secrets = secrets_from_dataset(ds)
    assert len(secrets) == 20 and all(1 <= s <= 16 for s in secrets.values())
    assert guessing_reward(None, [None, None], solved=[True, False]) == [1.0, 0.0]


def test_feedback_is_a_user_turn_of_the_chat_template():
    tok = load_tokenizer("tiny-qwen2")
    text = tok.decode(_feedback_ids(tok, "higher", ended=True))
    assert text == "\n<|im_start|>user\nhigher<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(_feedback_ids(tok, "higher", ended=False)).startswith("<|im_end|>")


def test_epo_on_the_guessing_game_through_the_recipe(tmp_path):
    from posttrain.recipe import load_recipe
    from posttrain.train import run_recipe

    recipe = load_recipe("recipes/grpo/epo_guessing.yaml", [
        "model.name_or_path=tiny-qwen2", "model.peft=null", "trainer.max_steps=2", "trainer.per_device_train_batch_size=8",
        "rollout.num_generations=4", "rollout.max_new_tokens=48", "data.train.options.tokens_per_turn=6",
        f"output_dir={tmp_path}"])
    run_recipe(recipe)
    history = [json.loads(line) for line in (tmp_path / "report" / "metrics.jsonl").read_text().splitlines()]
    steps = [h for h in history if "loss" in h]
    assert len(steps) == 2
    for h in steps:
        assert "turn_entropy/0" in h and "turn_entropy/1" in h  # several turns were played
        assert h["epo/beta"] > 1 and 0 <= h["epo/corridor_fraction"] <= 1
        # completions/mean_length counts model tokens only: env feedback is masked out of the loss
        assert h["completions/mean_length"] < 48


class _RecordingEngine:
    """A rollout engine that records the token contexts it is asked to continue (wraps a real HFEngine)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def generate_ids(self, prompt_ids, sampling=None, **kwargs):
        self.calls.append(([list(p) for p in prompt_ids], sampling))
        return self.inner.generate_ids(prompt_ids, sampling, **kwargs)


def test_rollout_generates_through_the_trainers_shared_engine():
    """With a shared rollout engine (`rollout.engine: vllm` in a recipe) the multi-turn rollout generates through
    it, turn by turn, continuing each game's exact token context: prompt, the agent's tokens, the feedback."""
    from types import SimpleNamespace

    import torch

    from posttrain.envs import guessing_rollout
    from posttrain.models import load_model
    from posttrain.rollout import HFEngine

    torch.manual_seed(0)
    tok, model = load_tokenizer("tiny-qwen2"), load_model("tiny-qwen2", dtype="float32")
    ds = GuessingTask(n=3, max_turns=3).load()
    engine = _RecordingEngine(HFEngine(model, tok, progress=False))
    trainer = SimpleNamespace(processing_class=tok, max_completion_length=40, rollout_engine=engine, temperature=1.0,
                              top_p=1.0, top_k=0, min_p=None, eos_token_ids=[tok.eos_token_id])
    out = guessing_rollout(secrets_from_dataset(ds), max_turns=3, tokens_per_turn=5)(list(ds["prompt"]), trainer)
    assert len(engine.calls) >= 2  # several turns, each one call for all games still playing
    first_contexts, sampling = engine.calls[0]
    assert first_contexts == out["prompt_ids"] and sampling.max_new_tokens == 5 and sampling.n == 1
    for contexts, _ in engine.calls:
        for ctx in contexts:  # every context is a prefix of one game's final prompt + completion
            assert any(ctx == (p + c)[: len(ctx)] for p, c in zip(out["prompt_ids"], out["completion_ids"]))
    for c, m, lp in zip(out["completion_ids"], out["env_mask"], out["logprobs"]):
        assert len(c) == len(m) == len(lp) <= 40 and m[0] == 1
        # sampled-token log-probabilities on the agent's tokens (for TRL's importance sampling), NaN on feedback
        assert all((x == x and x <= 0) if keep else x != x for x, keep in zip(lp, m))
    assert sum(len(contexts) for contexts, _ in engine.calls[1:]) > 0  # a later turn continued some game
