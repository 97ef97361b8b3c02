"""Shared fixtures: a tiny random bridge for unit tests, the real embedded model for end-to-end tests.

Every test gets its own NL_REWRITE_CACHE so nothing leaks between tests, except the converted
embedded model, which is linked from the user cache to avoid a 25 s GGUF conversion per session.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny():
    from nl_rewrite.model.loading import tiny_model

    return tiny_model(n_layers=2, d_model=32, d_mlp=64, seed=0)


@pytest.fixture(scope="session")
def smol():
    """The real embedded SmolLM2-135M bridge (converted once into the user cache)."""
    from nl_rewrite.model.loading import load_model

    return load_model("smollm2-135m")


@pytest.fixture
def tmp_cache(tmp_path: Path, monkeypatch) -> Path:
    """An empty nl_rewrite cache for one test, with the converted embedded models linked in."""
    from nl_rewrite.paths import cache_dir

    real_models = cache_dir() / "models"
    real_models.mkdir(parents=True, exist_ok=True)
    root = tmp_path / "cache"
    root.mkdir()
    (root / "models").symlink_to(real_models)
    monkeypatch.setenv("NL_REWRITE_CACHE", str(root))
    return root
