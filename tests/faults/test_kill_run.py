"""kill -9 during the stages of `nl-rewrite run --preset smoke` (real embedded model): every rerun resumes, and
the finished run's results equal those of an uninterrupted run on the same seed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

KILL_AT = (("transcoder", 1.0), ("explain", 1.0), ("score", 0.0), ("simulate_explain", 1.0), ("calibrate", 0.0),
           ("evaluate_eval_all", 1.0))
"""(stage, seconds after its start) of a kill -9, in consecutive runs of one output folder: training, LLM calls,
simulations and evaluation are under way a second in; score (0.5 s in the smoke preset) and calibrate (a few ms)
are killed the moment they start. Caching latents is killed in tests/test_latents.py."""
VOLATILE = ("stage_seconds", "counts", "config")
"""Results keys that legitimately differ between runs: timings, cache hit counts, the output path."""


def _run(out: Path, cache: Path, kill_at: str | None = None, delay: float = 0.0, timeout: float = 600) -> int | None:
    """``nl-rewrite run`` in a subprocess; with ``kill_at``, SIGKILL it ``delay`` seconds after that stage starts.
    Returns the exit code, or None when it was killed."""
    env = {**os.environ, "NL_REWRITE_CACHE": str(cache)}
    cmd = [sys.executable, "-m", "nl_rewrite.cli.main", "run", "--preset", "smoke", "--out", str(out)]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + timeout
    try:
        for line in proc.stderr:  # type: ignore[union-attr]
            if time.monotonic() > deadline:
                raise TimeoutError(f"nl-rewrite run did not finish within {timeout} s")
            if kill_at and f"stage {kill_at} ..." in line:
                time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return None
        return proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()


def _stable(results: dict) -> dict:
    return {k: v for k, v in results.items() if k not in VOLATILE}


def test_kill_9_in_each_stage_then_rerun_gives_the_uninterrupted_results(tmp_path, smoke_run):
    reference = smoke_run.results  # the same preset and seed, uninterrupted, from an empty cache
    out, cache = tmp_path / "killed", tmp_path / "cache_killed"
    for stage, delay in KILL_AT:
        assert _run(out, cache, kill_at=stage, delay=delay) is None, f"the run finished before stage {stage} began"
        assert not (out / "results.json").exists()
    assert _run(out, cache) == 0
    resumed = json.loads((out / "results.json").read_text())
    assert _stable(resumed) == _stable(reference)
    assert resumed["counts"]["explained_ok"] == reference["counts"]["explained_ok"]
