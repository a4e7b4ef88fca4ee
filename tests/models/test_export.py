"""posttrain export: a LoRA run merged into a folder transformers loads, with the same greedy output as the adapter
model; the adapter-only export, the model card, and the errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from posttrain.cli import main


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    from posttrain.recipe import load_recipe
    from posttrain.train import run_recipe

    out = tmp_path_factory.mktemp("run")
    recipe = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / "grpo" / "grpo.yaml", ["model.name_or_path=tiny-qwen2", "trainer.max_steps=1",
                                                     "trainer.learning_rate=0.05", "eval.before=false",
                                                     "eval.after=false", "rollout.max_new_tokens=6",
                                                     f"output_dir={out}"])
    run_recipe(recipe)
    with torch.no_grad():  # make the adapter matter (one tiny step barely moves it)
        from safetensors.torch import load_file, save_file

        weights = load_file(out / "adapter_model.safetensors")
        gen = torch.Generator().manual_seed(0)
        save_file({k: v + 0.2 * torch.randn(v.shape, generator=gen) if "lora_B" in k else v
                   for k, v in weights.items()}, out / "adapter_model.safetensors")
    return out


def _greedy(model, tok, prompts):
    from posttrain.rollout import HFEngine, SamplingParams

    outs = HFEngine(model, tok, progress=False).generate(prompts, SamplingParams(temperature=0, max_new_tokens=8))
    return [o.completions[0].token_ids for o in outs]


def test_merged_export_loads_and_generates_like_the_adapter(lora_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.models import load_model, load_tokenizer

    with pytest.raises(SystemExit) as code:
        main(["export", str(lora_run), "--output", str(tmp_path / "merged"), "--merge"])
    assert code.value.code == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tok.chat_template and not (tmp_path / "merged" / "adapter_config.json").exists()
    adapter = PeftModel.from_pretrained(load_model("tiny-qwen2"), str(lora_run))
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"What is {i} + 2?"}], tokenize=False,
                                       add_generation_prompt=True) for i in range(4)]
    plain = _greedy(load_model("tiny-qwen2"), load_tokenizer("tiny-qwen2"), prompts)
    assert _greedy(merged, tok, prompts) == _greedy(adapter, tok, prompts) != plain
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "method `grpo`" in card and "base_model:" in card and "```yaml" in card
    meta = json.loads((tmp_path / "merged" / "posttrain_export.json").read_text())
    assert meta["kind"] == "merged" and meta["method"] == "grpo"


def test_adapter_export_and_checkpoint_folders(lora_run, tmp_path):
    from posttrain.models.export import export_run

    out = export_run(lora_run, tmp_path / "adapter")
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert "AutoPeftModelForCausalLM" in (out / "README.md").read_text()


@pytest.mark.parametrize("case", ["missing", "not_a_run", "not_empty"])
def test_export_errors(case, tmp_path, lora_run, capsys):
    run, out = str(lora_run), tmp_path / "out"
    if case == "missing":
        run = str(tmp_path / "absent")
    elif case == "not_a_run":
        (tmp_path / "plain").mkdir()
        run = str(tmp_path / "plain")
    else:
        out.mkdir()
        (out / "x").write_text("x")
    with pytest.raises(SystemExit) as code:
        main(["export", run, "--output", str(out)])
    message = {"missing": "run folder not found", "not_a_run": "no recipe.yaml", "not_empty": "is not empty"}[case]
    assert code.value.code == 2 and message in capsys.readouterr().err


def test_push_without_a_token_is_refused(lora_run, tmp_path, monkeypatch):
    import huggingface_hub

    from posttrain.models.export import ExportError, push_to_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(ExportError, match="needs a Hugging Face token"):
        push_to_hub(lora_run, "me/model")


@pytest.mark.vllm
def test_merged_export_loads_in_vllm(lora_run, tmp_path):
    pytest.importorskip("vllm")
    import os

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from posttrain.models.export import export_run
    from posttrain.rollout import SamplingParams, make_engine

    out = export_run(lora_run, tmp_path / "merged", merge=True)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    engine = make_engine("vllm", str(out), tok, dtype="float32", max_model_len=256)
    res = engine.generate(["What is 1 + 2?"], SamplingParams(temperature=0, max_new_tokens=4))
    assert len(res[0].completions[0].token_ids) >= 1
