"""Does a server score like the embedded backend? The same simulator and detection requests through both.

``compare_backends(reference, candidate)`` sends a fixed probe set (four explanations × one sentence, both
simulator modes, and detection prompts) to both backends and reports, per request kind, the Pearson correlation
of the quantity the pipeline uses (expected digit; yes-minus-no margin), the largest log-prob difference over
choices both returned, and how many read points the candidate left unknown. Use it before pointing a run at a
new server: a quantised server agrees closely but not exactly (docs/llm.md has measured numbers).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from nl_rewrite.interp.simulate import SimulationItem, Simulator, expected_digits
from nl_rewrite.llm.base import LLMBackend, ScoreRequest
from nl_rewrite.llm.readout import usable_rows
from nl_rewrite.correlation import pearson

PROBE_EXPLANATIONS = (
    "words about money, taxes and debt",
    "years and dates, especially four-digit years",
    "words about war, soldiers and the military",
    "the word \"and\" and other words that join phrases",
)
PROBE_TEXTS = (
    "In 1861, the government raised taxes to pay for the war and its debts.",
    "Our soldiers and sailors served with honor in 1944 and after.",
)


@dataclass(frozen=True)
class Agreement:
    """How closely the candidate's numbers follow the reference's for one kind of request."""

    pearson: float
    max_abs_logprob_diff: float
    n: int
    unknown: int


def compare_backends(reference: LLMBackend, candidate: LLMBackend, tokenize) -> dict[str, dict]:
    """Agreement per request kind (``all_at_once``, ``paper``, ``detection``); ``tokenize(text)`` gives the
    token strings of a text for the simulator (the served model's tokenizer)."""
    items = [SimulationItem(e, tuple(tokenize(t))) for e in PROBE_EXPLANATIONS for t in PROBE_TEXTS[:1]]
    report = {mode: _simulator_agreement(reference, candidate, mode, items) for mode in ("all_at_once", "paper")}
    report["detection"] = _detection_agreement(reference, candidate)
    return {kind: asdict(a) for kind, a in report.items()}


def _simulator_agreement(reference: LLMBackend, candidate: LLMBackend, mode: str,
                         items: list[SimulationItem]) -> Agreement:
    requests = [r for item in items for r in Simulator(reference, mode).requests(item)]
    ref, cand = reference.score(requests), candidate.score(requests)
    return _agreement(ref, cand, _digits(ref), _digits(cand))


def _detection_agreement(reference: LLMBackend, candidate: LLMBackend) -> Agreement:
    from nl_rewrite.interp.score import ScoreConfig, detection_requests

    requests: list[ScoreRequest] = [r for e in PROBE_EXPLANATIONS
                                    for r in detection_requests(e, PROBE_TEXTS, ScoreConfig())]
    ref, cand = reference.score(requests), candidate.score(requests)
    return _agreement(ref, cand, _margins(ref), _margins(cand))


def _digits(answers: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([expected_digits(a) for a in answers])


def _margins(answers: list[torch.Tensor]) -> torch.Tensor:
    """Yes-minus-no log-prob per detection prompt."""
    return torch.stack([a[0, 0] - a[0, 1] for a in answers])


def _agreement(ref: list[torch.Tensor], cand: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> Agreement:
    both = torch.isfinite(x) & torch.isfinite(y)
    r = pearson(x[both], y[both]) if both.sum() > 2 else math.nan
    diffs = [(r - c).abs()[torch.isfinite(r) & torch.isfinite(c)] for r, c in zip(ref, cand)]
    max_diff = max((float(d.max()) for d in diffs if d.numel()), default=math.nan)
    unknown = sum(int((~usable_rows(c)).sum()) for c in cand)
    return Agreement(r, max_diff, int(both.sum()), unknown)
