"""Shared fixtures. ../shared/data is optional: tests that need it skip cleanly when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("POSTTRAIN_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to ../shared/data (benchmarks/, continual/); skips the test when it is absent."""
    if not (SHARED_DATA / "benchmarks").is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def benchmarks_dir(shared_data: Path) -> Path:
    return shared_data / "benchmarks"


@pytest.fixture
def scored_positions(monkeypatch) -> list[int]:
    """The number of positions each call of TRL's fused LM head scores (rows of hidden states it projects),
    appended as the calls happen."""
    import trl.trainer.utils as trl_utils

    scored: list[int] = []
    real = trl_utils._ChunkedLogProbFunction.apply

    def spy(hidden, weight, bias, labels, *rest):
        scored.append(hidden.shape[0])
        return real(hidden, weight, bias, labels, *rest)

    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", spy)
    return scored
