"""kill -9 during the stages of the plumbing run (``helpers.TINY_RUN``: every stage of the smoke preset on a tiny
random model): every rerun resumes, and the finished run's results equal those of an uninterrupted run on the same
seed. Resuming is plumbing; it does not depend on the model's size."""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from helpers import TINY_RUN, empty_cache, start_cli

@dataclass(frozen=True)
class Logged:
    """The moment the run's log shows ``text``: for a stage too quick to kill by the clock and with no file written
    part-way (the tiny transcoder trains in about 0.2 s; its progress bar appears when the first step starts)."""

    text: str


KILL_AT: tuple[tuple[str, float | str | Logged], ...] = (
    ("transcoder", Logged("train transcoder")), ("explain", "explanations.jsonl"), ("score", 0.0),
    ("simulate_explain", "simulations/explain/*/*.safetensors"), ("calibrate", 0.0), ("evaluate_eval_all", 1.0))
"""(stage, when) of a kill -9, in consecutive runs of one output folder. ``when`` is seconds after the stage starts,
a file (a glob in the output folder) the stage writes part-way, or a line of the log: the kill lands once the first
batch of explanations or simulations is on disk, so the rerun must finish a half-written stage. Those kills, and the
ones in training and at 1 s into evaluation, must land inside their stage (checked: its "done" line must not have
been logged). Score and calibrate take milliseconds on the tiny model and are killed the moment they start. Caching
latents is killed in tests/test_latents.py."""
VOLATILE = ("stage_seconds", "counts", "config")
"""Results keys that legitimately differ between runs: timings, cache hit counts, the output path."""


def _wait_for(when: float | str | Logged, out: Path, log: Path, proc, timeout: float = 60) -> None:
    if isinstance(when, (int, float)):
        time.sleep(when)
        return
    deadline = time.monotonic() + timeout

    def seen() -> bool:
        if isinstance(when, Logged):
            return when.text in log.read_text(errors="replace")
        return any(p.stat().st_size for p in out.glob(when))

    while not seen() and proc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)


def _run(out: Path, cache: Path, kill_at: str | None = None, when: float | str | Logged = 0.0, timeout: float = 300
         ) -> int | None:
    """``nl-rewrite run`` in a child process (forked from a server with the imports done: ``helpers.start_cli``);
    with ``kill_at``, SIGKILL it at ``when`` in that stage (see KILL_AT), failing if a kill meant to land inside the
    stage came after it ended. Returns the exit code, or None when it was killed."""
    # as many threads as the in-process reference run used: float sums depend on the thread count
    env = {**os.environ, "NL_REWRITE_CACHE": str(cache), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    log = out.parent / f"{out.name}-{kill_at or 'finish'}.log"
    log.write_text("")  # the child truncates it; until then it is read empty
    proc = start_cli(["run", *TINY_RUN, "--out", str(out)], env, log)
    deadline = time.monotonic() + timeout
    try:
        if kill_at:
            _wait_for(Logged(f"stage {kill_at} ..."), out, log, proc, timeout)
            if proc.is_alive() and f"stage {kill_at} ..." not in log.read_text(errors="replace"):
                raise TimeoutError(f"nl-rewrite run did not reach stage {kill_at} within {timeout} s")
        if not kill_at or not proc.is_alive():
            proc.join(timeout=max(1.0, deadline - time.monotonic()))
            assert not proc.is_alive(), f"nl-rewrite run did not finish within {timeout} s"
            return proc.exitcode
        _wait_for(when, out, log, proc)
        proc.kill()
        proc.join(timeout=10)
        logged = log.read_text(errors="replace")
        assert proc.exitcode == -signal.SIGKILL, f"the run exited by itself (code {proc.exitcode}) in stage " \
                                                 f"{kill_at}: {logged[-2000:]}"
        inside = when != 0.0
        assert not (inside and f"stage {kill_at} done" in logged), \
            f"stage {kill_at} finished before the kill at {when!r}: the kill did not land inside it"
        return None
    finally:
        if proc.is_alive():
            proc.kill()


def _stable(results: dict) -> dict:
    return {k: v for k, v in results.items() if k not in VOLATILE}


def test_kill_9_in_each_stage_then_rerun_gives_the_uninterrupted_results(tmp_path, tiny_run):
    reference = tiny_run.results  # the same options and seed, uninterrupted, from an empty cache
    out, cache = tmp_path / "killed", empty_cache(tmp_path / "cache_killed")
    for stage, when in KILL_AT:
        assert _run(out, cache, stage, when) is None, f"the run finished before stage {stage} began"
        assert not (out / "results.json").exists()
    assert _run(out, cache) == 0
    resumed = json.loads((out / "results.json").read_text())
    assert _stable(resumed) == _stable(reference)
    assert resumed["counts"]["explained_ok"] == reference["counts"]["explained_ok"]
