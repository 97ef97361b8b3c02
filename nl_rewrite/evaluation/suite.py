"""Benchmark suites: everything that makes two evaluations comparable, fixed and fingerprinted.

A :class:`Suite` fixes the corpus splits, window length and count, the seed and the position modes. Running one
evaluates the given replacements on every (split, position mode) *block*, always next to the clean model and to
zero-ablation of each replacement's write site, and adds paired tests per condition (:func:`paired_tests`).

The **fingerprint** hashes the suite, the model's name and the exact token ids of every split's windows: two
result files are comparable exactly when their fingerprints match, and :func:`fingerprint_differences` says in
words why two are not.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Sequence

from pydantic import JsonValue

from nl_rewrite.data.windows import Split, TokenWindows, token_windows
from nl_rewrite.evaluation.evaluator import CLEAN, EvalResults, Evaluator, PositionMode
from nl_rewrite.evaluation.stats import CIBounds
from nl_rewrite.parallel.runner import ShardRunner
from nl_rewrite.replacements.base import Replacement
from nl_rewrite.replacements.baselines import ZeroReplacement
from nl_rewrite.hashing import digest

SUITE_VERSION = 1
"""Bumped when what a suite measures changes, so older fingerprints stop matching."""


@dataclass(frozen=True)
class Suite:
    """What a benchmark measures on: splits, windows, seed and position modes."""

    name: str
    splits: tuple[Split, ...] = ("eval", "eval_ood")
    window: int = 64
    """tokens per window"""
    windows: int = 64
    """windows per split (a seeded sample)"""
    seed: int = 0
    positions: tuple[PositionMode, ...] = ("all", "last")
    corpus: str = "default"

    def block_names(self) -> list[str]:
        return [block_name(s, p) for s in self.splits for p in self.positions]


SUITES = {
    "standard": Suite("standard"),
    "smoke": Suite("smoke", window=16, windows=6),
}
"""Named suites. ``standard`` is the one to publish; ``smoke`` checks that a plugin runs (its CIs are wide)."""


def block_name(split: str, positions: str) -> str:
    return f"{split}/{positions}"


def windows_digest(windows: TokenWindows) -> str:
    return digest(windows.tokens.to("cpu").contiguous().numpy().tobytes())


def fingerprint_parts(suite: Suite, model_name: str, windows: dict[str, TokenWindows]) -> dict:
    return {"suite": asdict(suite), "suite_version": SUITE_VERSION, "model": model_name,
            "windows": {split: windows_digest(w) for split, w in windows.items()}}


def fingerprint(parts: dict) -> str:
    return digest(json.dumps(parts, sort_keys=True))


def fingerprint_differences(a: dict, b: dict) -> list[str]:
    """Why two runs' fingerprint parts differ, in words (empty when they match)."""
    why = [f"{key} differs: {a.get(key)!r} vs {b.get(key)!r}" for key in ("model", "suite_version")
           if a.get(key) != b.get(key)]
    suite_a, suite_b = a.get("suite", {}), b.get("suite", {})
    why += [f"suite {key} differs: {suite_a.get(key)!r} vs {suite_b.get(key)!r}"
            for key in sorted(set(suite_a) | set(suite_b)) if suite_a.get(key) != suite_b.get(key)]
    windows_a, windows_b = a.get("windows", {}), b.get("windows", {})
    why += [f"the {split} windows' tokens differ" for split in sorted(set(windows_a) & set(windows_b))
            if windows_a[split] != windows_b[split]]
    return why


def zero_references(replacements: Sequence[Replacement]) -> dict[str, str]:
    """write site → name of the condition that zero-ablates it (a given ``ZeroReplacement`` is reused)."""
    refs = {str(r.write_site): r.name for r in replacements if type(r) is ZeroReplacement}
    return {str(r.write_site): refs.get(str(r.write_site), f"zero@{r.write_site}") for r in replacements}


def with_references(replacements: Sequence[Replacement]) -> list[Replacement]:
    """The replacements plus a ``ZeroReplacement`` for every write site that has none yet."""
    have = {r.name for r in replacements}
    extra = {name: ZeroReplacement(site, name=name) for site, name in zero_references(replacements).items()
             if name not in have}
    return [*replacements, *extra.values()]


@dataclass(frozen=True)
class VersusClean:
    """A condition against the clean model: condition − clean (nats, 95% window-bootstrap CIs)."""

    ce_delta: float
    ce_delta_ci: CIBounds
    kl: float
    """KL(clean‖patched): the clean model's own is 0."""
    kl_ci: CIBounds
    wilcoxon_p: float
    """Paired Wilcoxon p on per-window CE."""


@dataclass(frozen=True)
class VersusZero:
    """A condition against the zero-ablation of its write site: condition − zero (nats, 95% CIs)."""

    reference: str
    """The zero-ablation condition (the condition itself when it is one)."""
    ce_diff: float
    ce_diff_ci: CIBounds
    kl_diff: float
    kl_diff_ci: CIBounds
    wilcoxon_p: float
    recovered: float | None
    """The fraction of zero-ablation's CE gap the condition closes; None when undefined (the gap's CI includes 0,
    or too many resamples had no ratio)."""
    recovered_ci: CIBounds | None


@dataclass(frozen=True)
class PairedTests:
    """One condition's per-window paired comparisons, as results.json's ``tests`` and compare's table give them."""

    vs_clean: VersusClean
    vs_zero: VersusZero


def paired_tests(results: EvalResults, condition: str, zero: str) -> PairedTests:
    """Per-window paired comparisons of ``condition`` with the clean model and with zero-ablation ``zero``."""
    s = results.summaries[condition]
    ce_diff, ce_diff_ci = results.difference(condition, zero, "ce")
    kl_diff, kl_diff_ci = results.difference(condition, zero, "kl")
    gap_lo = results.summaries[zero].ce_delta_ci[0]
    value, ci = results.fraction_recovered(condition, worse=zero)
    defined = gap_lo > 0 and ci.reliable and math.isfinite(value)
    return PairedTests(
        VersusClean(s.ce_delta, s.ce_delta_ci, s.kl_mean, s.kl_ci, results.wilcoxon(condition, CLEAN)),
        VersusZero(zero, ce_diff, ce_diff_ci, kl_diff, kl_diff_ci,
                   results.wilcoxon(condition, zero) if condition != zero else 1.0,
                   value if defined else None, (ci.lo, ci.hi) if defined else None))


@dataclass
class SuiteResults:
    """One suite's results: an :class:`EvalResults` per block, and which zero-ablation each condition is tested
    against."""

    parts: dict[str, JsonValue]
    """What the fingerprint hashes (suite, model, window digests)."""
    blocks: dict[str, EvalResults]
    references: dict[str, str]
    """condition → the zero-ablation condition of its write site."""

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.parts)

    def tests(self, block: str) -> dict[str, PairedTests]:
        results = self.blocks[block]
        return {c: paired_tests(results, c, self.references[c]) for c in results.conditions if c != CLEAN}

    def to_json(self) -> dict:
        tests = {name: {c: asdict(t) for c, t in self.tests(name).items()} for name in self.blocks}
        return {"fingerprint": self.fingerprint, "fingerprint_parts": self.parts, "references": self.references,
                "blocks": {name: {**r.to_json(), "tests": tests[name]} for name, r in self.blocks.items()}}


@dataclass(frozen=True)
class SuiteFile:
    """What compare reads of an evaluation's results.json (the paired tests and the config in it are not read: the
    tests are recomputed from the per-window numbers, the same for every merged run)."""

    fingerprint_parts: dict[str, JsonValue]
    references: dict[str, str]
    blocks: dict[str, EvalResults]
    """Each block's per-window CE and KL and their summaries (its ``tests`` are ignored)."""

    def suite_results(self) -> SuiteResults:
        return SuiteResults(self.fingerprint_parts, self.blocks, self.references)


def suite_windows(model, suite: Suite, prepend_bos: bool) -> dict[str, TokenWindows]:
    return {split: token_windows(model, split, corpus=suite.corpus, window=suite.window, max_windows=suite.windows,
                                 seed=suite.seed, prepend_bos=prepend_bos) for split in suite.splits}


def run_suite(model, model_name: str, suite: Suite, replacements: Sequence[Replacement], *, prepend_bos: bool,
              batch_size: int = 8, progress: bool = True, runner: ShardRunner | None = None) -> SuiteResults:
    """Every replacement (plus clean and the zero-ablation references) on every block of ``suite``; ``runner``
    (default: this process) evaluates each block in shards of windows."""
    windows = suite_windows(model, suite, prepend_bos)
    conditions = with_references(replacements)
    sites = zero_references(replacements)
    references = {r.name: sites.get(str(r.write_site), r.name) for r in conditions}
    blocks = {block_name(split, mode): Evaluator(model, windows[split], batch_size, mode, seed=suite.seed,
                                                 progress=progress).run(conditions, runner)
              for split in suite.splits for mode in suite.positions}
    return SuiteResults(fingerprint_parts(suite, model_name, windows), blocks, references)
