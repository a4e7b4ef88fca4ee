"""Artifacts to ship: a trained run (or one of its checkpoints) as a folder that transformers and vLLM load.

`export_run(run, output, merge=...)` reads the run's adapter (or full model), its tokenizer and chat template,
its resolved recipe and its report, and writes to `output`:
- with `merge`: the base model with the LoRA adapter merged in, as safetensors; without: the adapter alone;
  a full fine-tuned run is copied as it is either way;
- the tokenizer with its chat template;
- `README.md`, a model card: base model, method, data, the recipe that trained it, evaluation results, and how
  to load it;
- `posttrain_export.json`: where it came from (run, checkpoint, base, merge).
`push_to_hub(output, repo_id)` uploads the folder when a Hugging Face token is configured.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

__all__ = ["ExportError", "export_run", "push_to_hub"]


class ExportError(ValueError):
    """A run folder that cannot be exported (reported without a traceback by the CLI)."""


def _run_root(path: Path) -> Path:
    """The run folder of `path` (a run, or a checkpoint-N inside one): where recipe.yaml and report/ are."""
    for candidate in (path, path.parent):
        if (candidate / "recipe.yaml").is_file():
            return candidate
    raise ExportError(f"{path} is not a posttrain run or checkpoint: no recipe.yaml in it or its parent")


def _base_of(path: Path, recipe: Any) -> str:
    config = json.loads((path / "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path")
    if base and Path(base).exists():
        return base
    return recipe.model.name_or_path if recipe is not None else base


def export_run(run: str | Path, output: str | Path, *, merge: bool = False, dtype: str | None = None) -> Path:
    """Export a run or checkpoint folder to `output` (see the module docstring); returns `output`."""
    from posttrain.recipe import load_recipe

    src, out = Path(run).expanduser(), Path(output).expanduser()
    if not src.is_dir():
        raise ExportError(f"run folder not found: {src}")
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty; choose another --output")
    root = _run_root(src)
    recipe = load_recipe(root / "recipe.yaml")
    is_adapter = (src / "adapter_config.json").is_file()
    if not is_adapter and not (src / "config.json").is_file():
        raise ExportError(f"{src} holds neither a LoRA adapter (adapter_config.json) nor a model (config.json)")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_src = src if (src / "tokenizer_config.json").is_file() else root
    from posttrain.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(tokenizer_src) if (tokenizer_src / "tokenizer_config.json").is_file()
                               else recipe.model.name_or_path)
    base = _base_of(src, recipe) if is_adapter else None
    if is_adapter and merge:
        from peft import PeftModel

        model = load_model(base, dtype or recipe.model.dtype)
        merged = PeftModel.from_pretrained(model, str(src)).merge_and_unload()
        merged.save_pretrained(out, safe_serialization=True)
        kind = "merged"
    elif is_adapter:
        for f in src.iterdir():
            if f.name.startswith("adapter_") and f.is_file():
                shutil.copy2(f, out / f.name)
        kind = "adapter"
    else:
        model = load_model(str(src), dtype or "auto")
        model.save_pretrained(out, safe_serialization=True)
        kind = "full"
    tokenizer.save_pretrained(out)
    summary = _summary(root)
    (out / "README.md").write_text(_model_card(recipe, kind, base, summary, src), encoding="utf-8")
    (out / "posttrain_export.json").write_text(json.dumps(
        {"run": str(root), "source": str(src), "kind": kind, "base_model": base, "method": recipe.method},
        indent=2))
    return out


def _summary(root: Path) -> dict[str, Any]:
    path = root / "report" / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _model_card(recipe: Any, kind: str, base: str | None, summary: dict[str, Any], src: Path) -> str:
    from posttrain import __version__

    base_model = base or recipe.model.name_or_path
    data = recipe.data
    data_line = json.dumps(_plain(data), default=str)
    lines = ["---", "library_name: transformers" if kind != "adapter" else "library_name: peft",
             f"base_model: {base_model}", "tags: [posttrain, " + recipe.method + "]", "---", "",
             f"# {recipe.method} on {base_model}", "",
             f"Trained with posttrain {__version__}, method `{recipe.method}`"
             + (", a LoRA adapter merged into the base weights." if kind == "merged"
                else ", a LoRA adapter (load it on the base model)." if kind == "adapter" else ", full fine-tuning."),
             "", "## Data", "", f"`{data_line}`", ""]
    results = {k: summary[k] for k in ("accuracy_before", "accuracy_after", "n_eval", "eval_task", "steps",
                                       "train_minutes") if k in summary}
    if results:
        lines += ["## Evaluation (from the run's report)", "", "| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in results.items()]
        lines.append("")
    load = ("from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "model = AutoModelForCausalLM.from_pretrained(PATH)\ntokenizer = AutoTokenizer.from_pretrained(PATH)")
    if kind == "adapter":
        load = (f"from peft import AutoPeftModelForCausalLM\nmodel = AutoPeftModelForCausalLM.from_pretrained(PATH)"
                f"  # base: {base_model}")
    lines += ["## Use", "", "```python", load, "```", "",
              "## Recipe", "", f"Exported from `{src}`. The resolved recipe that trained it:", "", "```yaml",
              recipe.to_yaml().rstrip(), "```", ""]
    return "\n".join(lines)


def _plain(value: Any) -> Any:
    import dataclasses

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                if getattr(value, f.name) not in (None, {}, [])}
    return value


def push_to_hub(folder: str | Path, repo_id: str, private: bool = True) -> str:
    """Upload an exported folder to the Hugging Face Hub (needs a token: `HF_TOKEN` or `huggingface-cli login`)."""
    from huggingface_hub import HfApi, get_token

    if not get_token():
        raise ExportError("--push-to-hub needs a Hugging Face token: set HF_TOKEN or run `huggingface-cli login`")
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id)
    return f"https://huggingface.co/{repo_id}"
