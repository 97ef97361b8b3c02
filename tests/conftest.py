"""Shared fixtures: a tiny random bridge for unit tests, the real embedded model for end-to-end tests.

Every test gets its own NL_REWRITE_CACHE so nothing leaks between tests, except the converted
embedded model, which is linked from the user cache to avoid a 25 s GGUF conversion per session.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import jaxtyping
import pytest
import torch

# Runtime shape checks: every function and dataclass in nl_rewrite is checked by beartype against its annotations,
# jaxtyping dimensions included (a "batch" must be the same size in every argument and the result); the checker is
# tests/runtime_checks.py (beartype, int accepted for float). The hook only affects modules imported after it, so
# nothing here may import nl_rewrite above this line; pytest imports this file before any test module.
# NL_REWRITE_TYPECHECK=0 turns it off (to measure its cost, say); tests/test_typecheck_hook.py proves it is on.
if os.environ.get("NL_REWRITE_TYPECHECK", "1") != "0":
    if "nl_rewrite" in sys.modules:
        raise RuntimeError("nl_rewrite was imported before tests/conftest.py could install the jaxtyping import hook; "
                           "runtime shape checks would silently be off")
    jaxtyping.install_import_hook("nl_rewrite", "runtime_checks.typechecked")

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


def empty_cache(root: Path) -> Path:
    """An empty nl_rewrite cache folder at ``root``, with the user cache's converted embedded models linked in."""
    from nl_rewrite.paths import cache_dir

    real_models = cache_dir() / "models"
    real_models.mkdir(parents=True, exist_ok=True)
    root.mkdir(parents=True)
    (root / "models").symlink_to(real_models)
    return root


@pytest.fixture
def tmp_cache(tmp_path: Path, monkeypatch) -> Path:
    """An empty nl_rewrite cache for one test, with the converted embedded models linked in."""
    root = empty_cache(tmp_path / "cache")
    monkeypatch.setenv("NL_REWRITE_CACHE", str(root))
    return root


@dataclass(frozen=True)
class SmokeRun:
    out: Path
    cache: Path
    """The cache the run started empty (models linked) and filled: its transcoder, windows and LLM calls."""
    results: dict
    """results.json as the uninterrupted run wrote it (tests may rerun into ``out`` later)."""


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> SmokeRun:
    """One uninterrupted `nl-rewrite run --preset smoke` from an empty cache, in this process (so with the runtime
    shape checks on), shared by the end-to-end test, the kill -9 test (its reference) and the secrets test (its
    transcoder): the run takes about 100 s, once per session instead of three times."""
    from nl_rewrite.cli.main import main

    root = tmp_path_factory.mktemp("smoke")
    cache, out = empty_cache(root / "cache"), root / "run"
    saved = os.environ.get("NL_REWRITE_CACHE")
    os.environ["NL_REWRITE_CACHE"] = str(cache)
    try:
        code = main(["run", "--preset", "smoke", "--out", str(out)])
    finally:
        if saved is None:
            del os.environ["NL_REWRITE_CACHE"]
        else:
            os.environ["NL_REWRITE_CACHE"] = saved
    assert code == 0, "the shared smoke run failed; see its log above"
    return SmokeRun(out, cache, json.loads((out / "results.json").read_text()))
