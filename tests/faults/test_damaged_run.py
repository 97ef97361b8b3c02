"""Every file of a finished run damaged, one kind of file at a time: the rerun recomputes what it cannot read and
gives the undamaged run's results, or stops with a clear error naming the file. The files are found by walking the
plumbing run's output folder and user cache (``tiny_run``), so a file a later change adds is covered without
editing this test."""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest

from helpers import SHARED_CACHE_FOLDERS, TINY_RUN
from nl_rewrite.cli.main import build_parser, main
from nl_rewrite.errors import NLRewriteError
from nl_rewrite.pipeline.experiment import Artifacts, run_experiment
from nl_rewrite.pipeline.report import write_outputs

DAMAGES = {
    "truncated": lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),
    "garbage": lambda path: path.write_bytes(b"\x00{this is not what was here\xff"),
    "empty": lambda path: path.write_bytes(b""),
    "wrong fields": lambda path: path.write_bytes(b'{"unexpected": [1, 2]}\n'),  # parses, as JSON and as JSONL
    "deleted": lambda path: path.unlink(),
}
"""Applied in turn to the kinds of file, so each damage meets about a fifth of them."""


def kind_of(relative: Path) -> str:
    """Files that differ only by a number, a hash id (shards, per-latent files, budgets) or the split they hold
    (the explain and eval latent caches and simulations, written and read by the same code) are one kind."""
    return re.sub(r"[0-9a-f]{16}|\d+", "N", str(relative).replace("latents_eval/", "latents/").replace("/eval/", "/explain/"))


def run_files(root: Path) -> list[Path]:
    """Every file of the run under ``root`` (its output folder and its cache, not the shared models and windows)."""
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file()
                  and not (p.relative_to(root).parts[:2] in {("cache", name) for name in SHARED_CACHE_FOLDERS}))


def copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, symlinks=True)  # the shared folders stay links
    return target


def with_cache(root: Path, fn):
    """``fn()`` with ``root``'s cache as the user cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NL_REWRITE_CACHE", str(root / "cache"))
        return fn()


def argv(root: Path) -> list[str]:
    return ["run", *TINY_RUN, "--out", str(root / "run")]


def answer(art: Artifacts) -> str:
    """What a run measures and writes, as comparable text (NaN included)."""
    return json.dumps({"eval": {mode: [r.ce, r.kl] for mode, r in art.results.items()},
                       "pool": [art.pool_results.ce, art.pool_results.kl],
                       "info": [{k: asdict(v) for k, v in block.items()} for block in (art.info, art.pool_info)],
                       "generations": [asdict(g) for g in art.generations],
                       "explanations": [e.text for e in art.explanations], "scores": [asdict(s) for s in art.scores],
                       "lexical": {b: arm.texts for b, arm in art.lexical.items()}}, sort_keys=True, default=str)


def rerun(root: Path) -> Artifacts:
    cfg = build_parser().parse_args(argv(root)).cfg
    return with_cache(root, lambda: run_experiment(cfg))


def damaged_rerun(source: Path, root: Path, damages: dict[Path, str], expected: str, caplog
                  ) -> tuple[list[str], list[Path]]:
    """Rerun a copy of ``source`` with ``damages`` (file → damage) applied: the problems found, and the damaged
    files (not deleted ones) the rerun replaced without naming them in its log (each may have been replaced before
    it was read)."""
    copy_run(source, root)
    damaged = {}
    for relative, damage in damages.items():
        DAMAGES[damage](root / relative)
        damaged[relative] = (root / relative).read_bytes() if (root / relative).exists() else None
    caplog.clear()
    problems = []
    try:
        if answer(rerun(root)) != expected:
            problems = [f"{sorted(map(str, damages))}: the rerun's results differ from the undamaged run's"]
    except NLRewriteError as exc:
        if not any(str(root / relative) in str(exc) for relative in damages):
            problems = [f"{sorted(map(str, damages))}: an error that names none of the damaged files: {exc}"]
    except Exception as exc:  # what a user would see as a raw traceback
        problems = [f"{sorted(map(str, damages))}: {type(exc).__name__}: {exc}"]
    # a deleted file that comes back was missing, as in every first run: nothing damaged could have been read
    replaced = [relative for relative, data in damaged.items()
                if data is not None and not named(root / relative, caplog.messages) and changed(root / relative, data)]
    shutil.rmtree(root)
    return problems, replaced


def changed(path: Path, damaged: bytes | None) -> bool:
    """Whether the rerun replaced a damaged (or deleted: None) file."""
    return path.is_file() if damaged is None else not path.is_file() or path.read_bytes() != damaged


def named(path: Path, messages: list[str]) -> bool:
    """Whether a log message names ``path`` (whole, or its folder and its name)."""
    return any(str(path) in m or (str(path.parent) in m and path.name in m) for m in messages)


@pytest.mark.slow
def test_every_damaged_file_of_a_finished_run_is_recomputed_or_named(tiny_run, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    source = copy_run(tiny_run.out.parent, tmp_path / "undamaged")
    before = {p: (source / p).stat().st_mtime_ns for p in run_files(source)}
    finished = rerun(source)
    expected = answer(finished)
    write_outputs(finished, source / "run")  # what `nl-rewrite run` does after run_experiment
    outputs = [p for p in run_files(source) if (source / p).stat().st_mtime_ns != before.get(p)]
    # the outputs every rerun rewrites (results, plots, report, manifest, config): damaged together, read back once
    root = copy_run(source, tmp_path / "outputs")
    for i, relative in enumerate(outputs):
        list(DAMAGES.values())[i % len(DAMAGES)](root / relative)
    assert with_cache(root, lambda: main(argv(root))) == 0
    assert json.loads((root / "run" / "results.json").read_text())["answer"] == tiny_run.results["answer"]

    kinds: dict[str, Path] = {}
    for relative in run_files(source):
        if relative not in outputs:
            kinds.setdefault(kind_of(relative), relative)
    assert len(kinds) >= 20, f"the run should leave at least 20 kinds of cached file, found {sorted(kinds)}"
    damages = {relative: list(DAMAGES)[i % len(DAMAGES)] for i, relative in enumerate(sorted(kinds.values()))}
    # half the kinds at once, then the other half. A file the rerun names in its log was read and recovered from;
    # one still damaged afterwards was never needed. One replaced without being named may have been replaced
    # before it was read (a rebuilt latent cache replaces its shards), so it is damaged again on its own: a few
    # reruns instead of one per kind.
    failures, alone = [], []
    for half in (0, 1):
        batch = {relative: damage for i, (relative, damage) in enumerate(damages.items()) if i % 2 == half}
        problems, replaced = damaged_rerun(source, tmp_path / f"half{half}", batch, expected, caplog)
        failures, alone = failures + problems, alone + replaced
    for i, relative in enumerate(alone):
        failures += damaged_rerun(source, tmp_path / f"alone{i}", {relative: damages[relative]}, expected, caplog)[0]
    assert not failures, "\n".join(failures)
    assert len(alone) < len(damages) / 3, f"most damaged files should be named when read; not named: {alone}"
