"""Shared fixtures: a tiny random bridge for unit tests, the real embedded model for end-to-end tests.

Every test gets its own NL_REWRITE_CACHE so nothing leaks between tests, except what ``helpers.empty_cache`` links
from the user cache: the converted embedded model (a 25 s GGUF conversion) and the tokenised corpus windows.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
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
XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
"""Processes running the suite (pytest-xdist's ``-n``): they share the cores, so each takes its share of threads."""
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // XDIST_WORKERS)))


from helpers import (REAL_MODEL_FIXTURES, SHARED_RUNS, SMOKE_RUN, acceptance_error, empty_cache,  # noqa: E402
                     record_real_model_loads, reuse_freed_memory)

reuse_freed_memory()

REAL_MODEL_LOADS = record_real_model_loads()
"""Embedded (real) models loaded in this process since the current test started: setup, fixtures and call."""


def shared_run_of(item) -> str | None:
    """The shared run (:data:`helpers.SHARED_RUNS`) a test reads, if any."""
    return next((name for name in SHARED_RUNS if name in getattr(item, "fixturenames", ())), None)


def pytest_itemcollected(item):
    """Under pytest-xdist (``--dist loadgroup``), tests go to processes by group, so a shared fixture is made once:
    the tests reading one shared run form one group, the other tests of a module another (its module-scoped
    fixtures). xdist reads the groups after collection."""
    item.add_marker(pytest.mark.xdist_group(shared_run_of(item) or item.nodeid.split("::")[0]))


def pytest_collection_modifyitems(items):
    """The shared runs' groups first (the longest units of work), so parallel processes start them at once instead
    of one being left with a run at the end."""
    items.sort(key=lambda item: shared_run_of(item) is None)


def pytest_runtest_logstart(nodeid, location):
    REAL_MODEL_LOADS.clear()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """Fail a test that loaded the real SmolLM2 without the ``acceptance`` marker: plumbing belongs on tiny-smollm2,
    and the suite's time on the few tests where the real model is the point."""
    result = yield
    used = REAL_MODEL_LOADS + [f"{name} (fixture)" for name in REAL_MODEL_FIXTURES if name in item.fixturenames]
    problem = acceptance_error(item.nodeid, used, item.get_closest_marker("acceptance") is not None)
    if problem:
        raise pytest.fail.Exception(problem, pytrace=False)
    return result


@pytest.fixture
def real_model_loads() -> list[str]:
    return REAL_MODEL_LOADS


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
    warnings: list[str]
    """Every warning the run raised (``category: message (file:line)``), whatever the session's filters hide."""


def shared_run(root: Path, argv: list[str]) -> SmokeRun:
    """``nl-rewrite <argv> --out <root>/run`` from an empty cache under ``root``, in this process (so with the runtime
    shape checks on)."""
    from nl_rewrite.cli.main import main

    cache, out = empty_cache(root / "cache"), root / "run"
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings(record=True) as raised:
        patch.setenv("NL_REWRITE_CACHE", str(cache))
        warnings.simplefilter("always")
        code = main([*argv, "--out", str(out)])
    assert code == 0, f"the shared run {argv} failed; see its log above"
    return SmokeRun(out, cache, json.loads((out / "results.json").read_text()),
                    [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in raised])


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> SmokeRun:
    """The acceptance run: one uninterrupted `nl-rewrite run --preset smoke` on the real SmolLM2 from an empty cache,
    shared by every test that reads what the real model does end to end (about 150 s, once per session). Its
    positions are all the windows': the preset's second mode, the last position, is plumbing the tiny run checks
    (tests/test_plan.py), and it would add a fifth of the run's time."""
    return shared_run(tmp_path_factory.mktemp("smoke"), SMOKE_RUN)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> SmokeRun:
    """The plumbing run: `nl-rewrite run` with ``helpers.TINY_RUN`` (a random 2-layer model with SmolLM2's real
    tokenizer as subject and as LLM) from an empty cache, shared by the resume, fault, Ray, secrets and trained-
    simulator tests (about 30 s, once per session). Its numbers mean nothing; its files are all a real run writes."""
    from helpers import TINY_RUN

    return shared_run(tmp_path_factory.mktemp("tiny"), ["run", *TINY_RUN])
