"""kill -9 during the stages of the plumbing run (``helpers.TINY_RUN``: every stage of the smoke preset on a tiny
random model): every rerun resumes, and the finished run's results equal those of an uninterrupted run on the same
seed. Resuming is plumbing; it does not depend on the model's size."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import TINY_RUN, empty_cache

KILL_AT = (("transcoder", 1.0, True), ("explain", 0.2, True), ("score", 0.0, False), ("simulate_explain", 0.2, True),
           ("calibrate", 0.0, False), ("evaluate_eval_all", 1.0, True))
"""(stage, seconds after its start, whether the kill must land before the stage ends) of a kill -9, in consecutive
runs of one output folder: training, LLM calls, simulations and evaluation are under way when it lands (checked: the
stage's "done" line must not have been logged); score and calibrate take milliseconds on the tiny model and are
killed the moment they start. Caching latents is killed in tests/test_latents.py."""
VOLATILE = ("stage_seconds", "counts", "config")
"""Results keys that legitimately differ between runs: timings, cache hit counts, the output path."""


def _run(out: Path, cache: Path, kill_at: str | None = None, delay: float = 0.0, inside: bool = False,
         timeout: float = 300) -> int | None:
    """``nl-rewrite run`` in a subprocess; with ``kill_at``, SIGKILL it ``delay`` seconds after that stage starts
    (with ``inside``, fail if the stage had already finished). Returns the exit code, or None when it was killed."""
    env = {**os.environ, "NL_REWRITE_CACHE": str(cache)}
    cmd = [sys.executable, "-m", "nl_rewrite.cli.main", "run", *TINY_RUN, "--out", str(out)]
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
                after = proc.stderr.read()  # type: ignore[union-attr]  # what it logged before the kill landed
                assert not (inside and f"stage {kill_at} done" in after), \
                    f"stage {kill_at} finished within {delay} s: the kill did not land inside it"
                return None
        return proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()


def _stable(results: dict) -> dict:
    return {k: v for k, v in results.items() if k not in VOLATILE}


def test_kill_9_in_each_stage_then_rerun_gives_the_uninterrupted_results(tmp_path, tiny_run):
    reference = tiny_run.results  # the same options and seed, uninterrupted, from an empty cache
    out, cache = tmp_path / "killed", empty_cache(tmp_path / "cache_killed")
    for stage, delay, inside in KILL_AT:
        assert _run(out, cache, stage, delay, inside) is None, f"the run finished before stage {stage} began"
        assert not (out / "results.json").exists()
    assert _run(out, cache) == 0
    resumed = json.loads((out / "results.json").read_text())
    assert _stable(resumed) == _stable(reference)
    assert resumed["counts"]["explained_ok"] == reference["counts"]["explained_ok"]
