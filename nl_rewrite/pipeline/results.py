"""results.json of ``nl-rewrite run`` as one typed tree: :class:`RunResults`, written once by :func:`write_results`
and read back by :func:`load_results`, which checks it field by field (pydantic) and then what types cannot say
(the references were evaluated, means are finite, recovery is given only for evaluated conditions).

The answer, results.csv, the plots and report.html read this tree, never the JSON's dicts.

The layout (schema ``nl_rewrite.run/2``; every name below is a field of the dataclass of the same shape)::

    {"schema": "nl_rewrite.run/2", "config": {...RunConfig.to_dict()...},
     "n_tokens": int, "gap": {"ce" | "kl": [mean, lo, hi]},          (zero_latents − the coder, all positions)
     "pool": {"size", "n_latents", "share_of_latents", "mass_share", "chosen": {fraction: [ids]}},
     "modes": {"all" | "last": {"conditions": {name: summary}, "per_window_ce", "per_window_kl"}},
     "recovery": {condition: {"ce" | "kl": {"fraction": [v, lo, hi] | null, "nonpositive_denominators",
                                             "n_resamples", "p_vs_worse", "p_vs_better", "reason"}}},  (all positions)
     "conditions_info": {condition: {"family", "fraction_of_latents", "pearson", "label"}},
     "pool_run": {"n_windows", "llm_condition", "conditions", "conditions_info", "gap", "recovery",
                  "gap_vs_pool_zeroed", "recovery_vs_pool_zeroed"},   (pool_zeroed: only the pool's latents set to 0)
     "trained_run": null | {"n_windows", "simulator", "conditions", "conditions_info", "gap", "recovery"},
     "lexical": {budget: {"explained", "mean_pearson_explain", "parse_fallbacks", "linear_calibrations",
                          "mean_chars"}},
     "latents": [...LLM pool latents...], "counts": {...}, "calibration_fallbacks": {...}, "stage_seconds": {...},
     "answer": [sentences], "generations": [{"prompt", "continuations": {model: text}}],
     "diagnostics": null | {"condition", "firing": {"false_positive_rate", "false_negative_rate"},
                            "needs_work": [{"latent", "estimated_share", "explanation"}]},
     "complete": true}        (results.json is the last file a run writes, and a rerun removes it first)

KL is KL(clean || patched) per token, averaged; CE in nats; CIs are 95% paired window-bootstrap intervals.

The schema stays ``/2``: this tree reads and writes exactly the JSON that the dict-built payload of the same name
wrote (same keys, same order, same numbers), so a results.json written before the tree existed loads unchanged.
A file with another schema is refused, naming the version found and the rerun that rewrites it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import JsonValue

from nl_rewrite import io
from nl_rewrite.errors import NLRewriteError
from nl_rewrite.evaluation.evaluator import CLEAN, ConditionSummary
from nl_rewrite.evaluation.generate import Generation
from nl_rewrite.evaluation.recovery import Gap, Recovery
from nl_rewrite.interp.simulation_store import SimulationQuality
from nl_rewrite.pipeline.conditions import ConditionInfo
from nl_rewrite.typed_json import adapter, validated

SCHEMA = "nl_rewrite.run/2"
RESULTS_FILE = "results.json"
"""A run's summary: written last, and removed when a rerun starts, so a folder holding it is a finished run."""
ZERO_LATENTS = "zero_latents"
"""The gap's worse end: every latent of the coder set to 0."""


class ResultsError(NLRewriteError, ValueError):
    """A results.json that is missing, of another schema version, or not a valid run's results."""


@dataclass(frozen=True)
class RunSettings:
    """The few config values the answer and the report print, read (and checked) from the run's ``config``."""

    model: str
    layer: int
    llm: str
    lexical_budget: int
    coder: Literal["transcoder", "sae"] = "transcoder"
    """Results written before SAE runs existed are transcoder runs."""
    sae_site: str = "resid_post"


@dataclass(frozen=True)
class PoolChoice:
    """The LLM pool: the latents carrying the most output mass, and which of them each pool fraction simulates."""

    size: int
    n_latents: int
    """Latents of the run's coder."""
    share_of_latents: float
    mass_share: float
    """The pool's share of the coder's output mass."""
    chosen: dict[str, list[int]]
    """Pool fraction (as written: ``"0.5"``) → the latents it simulates."""


@dataclass(frozen=True)
class ModeResults:
    """Every main condition on all eval windows, scored at one position mode."""

    conditions: dict[str, ConditionSummary]
    per_window_ce: dict[str, list[float]]
    per_window_kl: dict[str, list[float]]


@dataclass(frozen=True)
class ConditionBlock:
    """Conditions evaluated together on the first ``n_windows`` eval windows, beside their own references: the gap
    zero-latents − the coder on those windows, and each simulated condition's recovery of it."""

    n_windows: int
    conditions: dict[str, ConditionSummary]
    conditions_info: dict[str, ConditionInfo]
    gap: Gap
    recovery: dict[str, Recovery]


@dataclass(frozen=True)
class PoolRun(ConditionBlock):
    """The LLM pool's conditions and their own references on the first ``llm_eval_windows`` eval windows."""

    llm_condition: str
    """The LLM condition the answer quotes (empty when none was evaluated)."""
    gap_vs_pool_zeroed: Gap
    """The gap pool_zeroed − the coder: only the pool's latents set to 0, every other latent true."""
    recovery_vs_pool_zeroed: dict[str, Recovery]


@dataclass(frozen=True)
class TrainedRun(ConditionBlock):
    """The trained simulator at 100% of latents, and its references, on the first ``trained_eval_windows``."""

    simulator: str


@dataclass(frozen=True)
class LexicalSummary:
    """One lexical arm (a length budget): how many latents it explained, and how well on held-out explain windows."""

    explained: int
    mean_pearson_explain: float | None
    parse_fallbacks: int
    linear_calibrations: int
    mean_chars: float | None = None
    """Mean explanation length in characters (absent from results written before it existed)."""


@dataclass(frozen=True)
class SimulationScores:
    """How one simulator's calibrated predictions of one latent match its true activations."""

    pearson: float
    spearman: float
    precision: float
    recall: float

    @classmethod
    def of(cls, quality: SimulationQuality) -> SimulationScores:
        return cls(quality.pearson, quality.spearman, quality.precision, quality.recall)


@dataclass(frozen=True)
class LatentRow:
    """One LLM pool latent: its explanations, detection score and simulation quality per calibrator."""

    latent: int
    explanation: str
    lexical_explanation: str
    ok: bool
    error: str | None
    detection_balanced_accuracy: float | None
    detection_auroc: float | None
    simulation: dict[str, SimulationScores]


@dataclass(frozen=True)
class FiringErrors:
    """How a simulation's firing pattern (after TopK) differs from the latents' true one."""

    false_positive_rate: float
    """Of the simulated firings, the share where the latent does not truly fire."""
    false_negative_rate: float
    """Of the true firings, the share the simulation misses."""

    @classmethod
    def of(cls, counts) -> FiringErrors:
        """From (simulated firings, false positives, true firings, misses)."""
        fires, false_positives, truly, misses = (int(c) for c in counts)
        return cls(false_positives / max(fires, 1), misses / max(truly, 1))


@dataclass(frozen=True)
class NeedsWork:
    """A latent whose simulation errors cost the most at the coder's output, with its explanation."""

    latent: int
    estimated_share: float
    """Its share of the summed estimated cost of every latent (squared error × squared decoder-row norm)."""
    explanation: str


@dataclass(frozen=True)
class Diagnostics:
    """Where a simulation of every latent loses the gap, beside its swap conditions' recovery."""

    condition: str
    """The diagnosed condition (the run's headline lexical arm)."""
    firing: FiringErrors
    needs_work: list[NeedsWork]
    """The explanations that most need work, the costliest first."""


@dataclass(frozen=True)
class RunResults:
    """Everything results.json holds (see the module's docstring for the layout)."""

    schema: str
    config: dict[str, JsonValue]
    """``RunConfig.to_dict()`` of the resolved config, as written; :attr:`settings` reads what the report needs."""
    n_tokens: int
    gap: Gap
    pool: PoolChoice
    modes: dict[str, ModeResults]
    recovery: dict[str, Recovery]
    conditions_info: dict[str, ConditionInfo]
    pool_run: PoolRun
    trained_run: TrainedRun | None
    lexical: dict[str, LexicalSummary]
    latents: list[LatentRow]
    counts: dict[str, int]
    calibration_fallbacks: dict[str, dict[str, int]]
    stage_seconds: dict[str, float]
    answer: list[str] = field(default_factory=list)
    """The answer in words (``answer.answer_lines`` of the rest of the tree)."""
    generations: list[Generation] = field(default_factory=list)
    diagnostics: Diagnostics | None = None
    """Where the headline lexical arm loses the gap (absent from results written before it existed)."""
    complete: Literal[True] = True

    @cached_property
    def settings(self) -> RunSettings:
        return validated(RunSettings, self.config, ResultsError, "its config", where="config")

    @property
    def all_positions(self) -> ModeResults:
        """The main conditions scored at every position: what the gap and recovery are measured on."""
        return self.modes["all"]


def results_json(results: RunResults) -> dict:
    """The tree as results.json's JSON object (NaN stays NaN: python mode, then ``json.dumps``, as the stage cache)."""
    return adapter(RunResults).dump_python(results)


def write_results(results: RunResults, path: Path) -> None:
    """Write ``results`` (atomically) after checking them as :func:`load_results` would on reading them back."""
    check_results(results)
    io.write_json(path, results_json(results))


def rerun_fix(path: Path) -> str:
    return f"rerun `nl-rewrite run --config {path.parent / 'config.toml'}` to write it again"


def load_results(path: Path) -> RunResults:
    """The run results in ``path`` (a results.json or the run's folder), checked; :class:`ResultsError` naming the
    file, the problem and the fix otherwise."""
    path = path / RESULTS_FILE if path.is_dir() else path
    data = io.read_json_object(path, ResultsError, "run results", rerun_fix(path))
    found = data.get("schema")
    if found != SCHEMA:
        raise ResultsError(f"{path} has schema {found!r}; this version of nl_rewrite reads {SCHEMA!r} only: "
                           f"{rerun_fix(path)}")
    results = validated(RunResults, data, ResultsError, f"{path} as {SCHEMA} results", rerun_fix(path))
    try:
        check_results(results)  # reads results.settings too: a config lacking what the report prints is refused here
    except ResultsError as exc:
        raise ResultsError(f"{path}: {exc}; {rerun_fix(path)}") from None
    return results


def check_results(results: RunResults) -> None:
    """What the types cannot say: every position mode (and ``all``) evaluated the clean model and the gap's two ends
    with finite means, and recovery is given only for conditions that were evaluated. Raises :class:`ResultsError`."""
    if "all" not in results.modes:
        raise ResultsError("no conditions scored at all positions (modes lacks 'all')")
    for mode, scored in results.modes.items():
        for name in (CLEAN, results.settings.coder, ZERO_LATENTS):
            if name not in scored.conditions:
                raise ResultsError(f"mode {mode}: condition {name!r} missing")
        for name, summary in scored.conditions.items():
            if not (math.isfinite(summary.mean_ce) and math.isfinite(summary.kl_mean)):
                raise ResultsError(f"mode {mode}: condition {name} has a non-finite mean")
    missing = [n for n in results.recovery if n not in results.all_positions.conditions]
    if missing:
        raise ResultsError(f"recovery given for conditions that were not evaluated: {missing}")


def same_results(a: RunResults, b: RunResults) -> bool:
    """Equal as written (NaN equal to NaN, which ``==`` on the trees is not)."""
    return json.dumps(results_json(a)) == json.dumps(results_json(b))
