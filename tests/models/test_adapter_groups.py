"""Adapter groups (the codebook), per-instance routing over them, and loading a continual checkpoint."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from posttrain.models.adapter_groups import (
    AdapterGroups,
    is_adapter_groups_dir,
    load_adapter_groups,
    warm_start_adapter,
)
from posttrain.rollout.base import Completion, GenerationOutput, SamplingParams
from posttrain.rollout.routed import RoutedEngine, RoutedScorer, prompt_lines

SC = "What is the sentiment of the following paragraph? Choose one from the option."
TC = "What is the topic of the following paragraph? Choose one from the option."
NLI = 'What is the logical relationship between the "sentence 1" and the "sentence 2"? Choose one from the option.'


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The tiny model's small matrices run faster on one thread (no spin-waiting on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_codebook_assigns_retrains_and_never_exceeds_the_tasks(tmp_path) -> None:
    groups = AdapterGroups()
    assert groups.assign("sst2", [SC])[:2] == (groups.get("group_0"), True)
    g, created, sims = groups.assign("agnews", [TC])
    assert (g.name, created) == ("group_1", True) and sims[0] == pytest.approx(0.669, abs=1e-3)
    g, created, sims = groups.assign("amazon", [SC])
    assert (g.name, created) == ("group_0", False) and sims == [pytest.approx(1.0), pytest.approx(0.669, abs=1e-3)]
    assert groups.get("group_0").tasks == ["sst2", "amazon"] and groups.get("group_0").instructions == [SC]
    assert len(groups) == 2 <= 3
    loose = AdapterGroups(threshold=0.5)
    loose.assign("cb", [NLI])
    rate = "Rate the review. Choose one from the option."
    g, created, _ = loose.assign("mnli", [NLI, rate])  # (1 + cos) / 2 >= 0.5: retrain, and keep the new one
    assert not created and g.instructions == [NLI, rate]
    path = groups.save(tmp_path)
    again = AdapterGroups.load(tmp_path)
    assert path.name == "codebook.json" and again.state_dict() == groups.state_dict()
    assert is_adapter_groups_dir(tmp_path) and not is_adapter_groups_dir(tmp_path / "nothing")


def test_retrain_needs_the_set_similarity_over_tau() -> None:
    groups = AdapterGroups(threshold=0.9)
    groups.assign("sst2", [SC])
    _, created, sims = groups.assign("mixed", [SC, TC])  # mean of 1.0 and 0.67 = 0.83 < 0.9: a new group
    assert created and sims[0] == pytest.approx((1 + 0.6694) / 2, abs=1e-3)
    single = AdapterGroups(expand=False)
    for task, ins in (("a", [SC]), ("b", [NLI]), ("c", [TC])):
        single.assign(task, ins)
    assert single.names == ["group_0"] and single.get("group_0").tasks == ["a", "b", "c"]


def test_codebook_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no adapter-group codebook"):
        AdapterGroups.load(tmp_path)
    (tmp_path / "codebook.json").write_text('{"groups": "x"}')
    with pytest.raises(ValueError, match="not a codebook"):
        AdapterGroups.load(tmp_path)
    with pytest.raises(ValueError, match="must not be empty"):
        AdapterGroups().assign("t", [])


def test_prompt_lines_drop_the_chat_template_tokens() -> None:
    prompt = f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{SC}\nOption: Good, Bad\nText: fine<|im_end|>" \
             "\n<|im_start|>assistant\n"
    lines = prompt_lines(prompt, ["<|im_start|>", "<|im_end|>"])
    assert SC in lines and "Option: Good, Bad" in lines and not any("<|" in x for x in lines)


class _Engine:
    """Answers with the adapter that was selected when it generated, so routing is visible in the outputs."""

    def __init__(self):
        self.active = "none"
        self.calls: list[tuple[str, list[str]]] = []

    def generate(self, prompts, sampling=None):
        self.calls.append((self.active, list(prompts)))
        return [GenerationOutput(p, [1], [Completion([2], self.active, "stop")]) for p in prompts]


def _routed():
    groups = AdapterGroups()
    for task, ins in (("cb", [NLI]), ("sst2", [SC]), ("agnews", [TC])):
        groups.assign(task, ins)
    engine = _Engine()

    @contextmanager
    def select(name):
        previous, engine.active = engine.active, name
        yield
        engine.active = previous

    return RoutedEngine(engine, groups, select), engine


def test_each_prompt_is_generated_with_its_groups_adapter_in_order() -> None:
    routed, engine = _routed()
    prompts = [f"{SC}\nText: good", f"{NLI}\nsentence 1: a", "Describe the weather.", f"{TC}\nTitle: x", f"{SC}\nb"]
    outs = routed.generate(prompts, SamplingParams(temperature=0))
    assert [o.completions[0].text for o in outs] == ["group_1", "group_0", "group_2", "group_2", "group_1"]
    assert [o.prompt for o in outs] == prompts
    # one generate call per group, each with only its prompts; no match goes to the newest group
    assert engine.calls == [("group_1", [prompts[0], prompts[4]]), ("group_0", [prompts[1]]),
                            ("group_2", [prompts[2], prompts[3]])]
    assert routed.counts == {"group_1": 2, "group_0": 1, "group_2": 2} and engine.active == "none"


def test_routed_scorer_sees_each_output_with_its_adapter() -> None:
    routed, engine = _routed()
    outs = routed.generate([f"{TC}\nTitle: x", f"{SC}\nText: good"], SamplingParams(temperature=0))
    scorer = RoutedScorer(lambda outputs: [(engine.active, o.prompt) for o in outputs], routed)
    assert [s[0] for s in scorer(outs)] == ["group_2", "group_1"]


def test_a_checkpoint_loads_one_adapter_per_group(tmp_path) -> None:
    from peft import get_peft_model

    from posttrain.models import load_model, lora_config

    torch.manual_seed(0)
    model = get_peft_model(load_model("tiny-qwen2"), lora_config(r=4, alpha=8), adapter_name="group_0")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.01)
    model.add_adapter("group_1", lora_config(r=4, alpha=8))
    warm_start_adapter(model, "group_0", "group_1")
    params = dict(model.named_parameters())
    for n, p in params.items():
        if ".group_1." in n:
            assert torch.equal(p, params[n.replace(".group_1.", ".group_0.")])
    with torch.no_grad():
        params["base_model.model.model.layers.0.self_attn.q_proj.lora_B.group_1.weight"].add_(1.0)
    groups = AdapterGroups()
    groups.assign("sst2", [SC])
    groups.assign("agnews", [TC])
    model.save_pretrained(str(tmp_path))
    groups.save(tmp_path)
    loaded, codebook = load_adapter_groups(load_model("tiny-qwen2"), tmp_path)
    assert codebook.names == ["group_0", "group_1"] and loaded.active_adapter == "group_1"
    mine = dict(loaded.named_parameters())
    assert all(torch.equal(mine[n], p) for n, p in params.items() if "lora_" in n)
    with pytest.raises(ValueError, match="no parameters to warm-start"):
        warm_start_adapter(loaded, "group_0", "group_9")
