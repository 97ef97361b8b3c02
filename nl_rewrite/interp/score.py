"""Detection scoring: does an explanation tell a latent's activating windows from windows where it is silent?

For each held-out activating window (never shown to the explainer) and each random non-activating window,
the backend reads one prompt — a short generic few-shot, then the explanation, then the text — and gives the
log-probabilities of " Yes" and " No" as the next token (both single tokens for SmolLM2). The prediction is
"activating" when log P(Yes) > log P(No). Per latent we store the balanced accuracy (mean of the true-positive
and true-negative rates) and the AUROC of log P(Yes) − log P(No), a threshold-free number that a small,
biased model (always "Yes") cannot hide behind. The instructions, few-shot and explanation form the shared
prefix, so backends that reuse a prefix's KV cache compute it once per latent.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from scipy.stats import rankdata

from nl_rewrite.errors import LLMError, NLRewriteError
from nl_rewrite.interp.explain import Explanation, LatentStageInputs
from nl_rewrite.io import RecordStore
from nl_rewrite.parallel.runner import InProcess, ShardRunner
from nl_rewrite.latents.cache import LatentCache
from nl_rewrite.llm.base import LLMBackend, ScoreRequest
from nl_rewrite.latents.sampling import Example, SamplingConfig, sample_latent
from nl_rewrite.hashing import digest

log = logging.getLogger(__name__)

DETECTION_PREFIX = """Below is an explanation of a pattern in text. For each text, answer Yes if the pattern \
occurs in the text, otherwise No.

Explanation: mentions of animals
Text: The dog chased a cat across the yard.
Answer: Yes

Explanation: mentions of animals
Text: Interest rates rose for the third time this year.
Answer: No

Explanation: {explanation}"""


@dataclass(frozen=True)
class ScoreConfig:
    """How detection scoring asks the scorer whether a window matches an explanation."""

    yes: str = " Yes"
    """choice token meaning 'the text matches' (one token)"""
    no: str = " No"
    """choice token meaning 'no match' (one token)"""
    batch_size: int = 32
    """requests per backend call"""

    def __post_init__(self) -> None:
        if self.yes == self.no:
            raise ValueError("ScoreConfig.yes and .no must differ")
        if self.batch_size < 1:
            raise ValueError(f"ScoreConfig.batch_size must be >= 1, got {self.batch_size}")

    def settings_key(self, sampling: SamplingConfig, backend_id: str) -> str:
        blob = json.dumps([asdict(self), asdict(sampling), backend_id, DETECTION_PREFIX], sort_keys=True)
        return digest(blob)


@dataclass
class DetectionItem:
    window_id: int
    label: bool
    """True for an activating (held-out) window."""
    logp_yes: float
    logp_no: float


@dataclass
class DetectionScore:
    latent: int
    balanced_accuracy: float
    """NaN when there are no usable positives or no usable negatives (see ``error``)."""
    n: int
    """Usable examples (positives + negatives)."""
    auroc: float = float("nan")
    n_pos: int = 0
    n_neg: int = 0
    n_unusable: int = 0
    """Examples where the backend gave neither choice a finite log-prob (excluded, not scored as 0)."""
    explanation: str = ""
    items: list[DetectionItem] = field(default_factory=list)
    error: str | None = None
    settings: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DetectionScore":
        return cls(**{**d, "items": [DetectionItem(**i) for i in d["items"]]})


def detection_requests(explanation: str, texts: Sequence[str], cfg: ScoreConfig,
                       meta: Sequence[tuple[tuple[str, str], ...]] = ()) -> list[ScoreRequest]:
    prefix = DETECTION_PREFIX.format(explanation=explanation.strip())
    metas = list(meta) or [()] * len(texts)
    return [ScoreRequest(prefix, (f"\nText: {text}\nAnswer:",), (0,), (cfg.yes, cfg.no), m)
            for text, m in zip(texts, metas)]


def balanced_accuracy(labels: np.ndarray, margin: np.ndarray) -> float:
    """Mean of the hit rate on positives and the correct-rejection rate on negatives (prediction: margin > 0)."""
    pos, neg = labels, ~labels
    if not pos.any() or not neg.any():
        return float("nan")
    return float(((margin[pos] > 0).mean() + (margin[neg] <= 0).mean()) / 2)


def auroc(labels: np.ndarray, margin: np.ndarray) -> float:
    """Probability that a random positive outranks a random negative (ties count half): Mann–Whitney U / (P·N)."""
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(margin)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _text(cache: LatentCache, example: Example) -> str:
    return "".join(cache.token_strings(example.tokens)).replace("\n", " ").strip()


def _summarise(latent: int, explanation: str, items: list[DetectionItem], settings: str) -> DetectionScore:
    usable = [i for i in items if math.isfinite(i.logp_yes) or math.isfinite(i.logp_no)]
    labels = np.array([i.label for i in usable], dtype=bool)
    margin = np.array([np.nan_to_num(i.logp_yes, neginf=-1e9) - np.nan_to_num(i.logp_no, neginf=-1e9)
                       for i in usable])
    score = DetectionScore(latent, balanced_accuracy(labels, margin), len(usable), auroc(labels, margin),
                           int(labels.sum()), int((~labels).sum()), len(items) - len(usable), explanation, items,
                           None, settings)
    if not labels.any() or labels.all():
        score.error = f"need positives and negatives; have {score.n_pos} and {score.n_neg} usable"
    return score


def _examples_for(cache: LatentCache, record: Explanation, sampling: SamplingConfig) -> tuple[list[Example], list[Example]]:
    """Held-out positives and negatives, checked to be disjoint from the windows the explainer saw."""
    examples = sample_latent(cache, record.latent, sampling)
    shown = set(record.window_ids)
    leaked = shown & {e.window_id for e in examples.heldout + examples.negatives}
    if leaked:
        raise NLRewriteError(f"latent {record.latent}: held-out windows {sorted(leaked)[:5]} were shown to the "
                             "explainer; score with the sampling settings the explanations were made with")
    return examples.heldout, examples.negatives


def score_latent(backend: LLMBackend, cache: LatentCache, record: Explanation, cfg: ScoreConfig,
                 sampling: SamplingConfig, settings: str = "") -> DetectionScore:
    """Detection score of one ok explanation."""
    if not record.ok:
        raise ValueError(f"latent {record.latent} has no explanation (failed: {record.error}); it cannot be scored")
    positives, negatives = _examples_for(cache, record, sampling)
    examples = [(e, True) for e in positives] + [(e, False) for e in negatives]
    meta = [(("latent", str(record.latent)), ("window", str(e.window_id))) for e, _ in examples]
    requests = detection_requests(record.text, [_text(cache, e) for e, _ in examples], cfg, meta)
    logprobs: list[torch.Tensor] = []
    for start in range(0, len(requests), cfg.batch_size):
        logprobs += backend.score(requests[start:start + cfg.batch_size])
    bad = [tuple(lp.shape) for lp in logprobs if tuple(lp.shape) != (1, 2)]
    if bad or len(logprobs) != len(requests):
        raise LLMError(f"backend {backend.backend_id} answered {len(logprobs)} of {len(requests)} detection prompts "
                       f"with shapes {bad[:3] or 'ok'}; expected one [1, 2] tensor each")
    items = [DetectionItem(e.window_id, label, float(lp[0, 0]), float(lp[0, 1]))
             for (e, label), lp in zip(examples, logprobs)]
    score = _summarise(record.latent, record.text, items, settings)
    if items and score.n == 0:
        raise LLMError(f"backend {backend.backend_id} gave no finite log-prob for {cfg.yes!r} or {cfg.no!r} on any "
                       f"of {len(items)} detection prompts (latent {record.latent}); it cannot be used for scoring")
    return score


def score_record(inputs: "LatentStageInputs[ScoreConfig]", record: Explanation) -> DetectionScore:
    return score_latent(inputs.backend, inputs.cache, record, inputs.cfg, inputs.sampling, inputs.settings)


def score_explanations(backend: LLMBackend, cache: LatentCache, explanations: Sequence[Explanation],
                       cfg: ScoreConfig, sampling: SamplingConfig | None = None, path: "str | Path | None" = None,
                       progress: bool = True, runner: ShardRunner | None = None) -> list[DetectionScore]:
    """Scores of every ok explanation (failed ones are skipped and counted); resumes from ``path``. ``runner``
    (default: this process) scores the latents; on Ray each worker holds its own backend."""
    sampling = sampling or SamplingConfig()
    settings = cfg.settings_key(sampling, backend.backend_id)
    store = RecordStore(path, settings, DetectionScore.from_dict) if path is not None else None
    have = store.records if store else {}
    usable = [r for r in explanations if r.ok]
    todo = [r for r in usable if r.latent not in have or have[r.latent].explanation != r.text]  # new text, new score
    made: dict[int, DetectionScore] = {}

    def keep(_: int, score: DetectionScore) -> None:
        if store:
            store.add([score])
        made[score.latent] = score

    (runner or InProcess()).map(LatentStageInputs(backend, cache, cfg, sampling, settings), score_record, todo, keep,
                                desc="detection", progress=progress)
    out = [made.get(r.latent) or have[r.latent] for r in usable]
    log.info("detection: scored %d latents, skipped %d failed explanations", len(out), len(explanations) - len(usable))
    return out


def rank_latents(scores: Sequence[DetectionScore]) -> list[int]:
    """Latents from best to worst explained: by balanced accuracy, then AUROC; NaN scores last."""
    def key(s: DetectionScore) -> tuple[float, float]:
        return (-np.nan_to_num(s.balanced_accuracy, nan=-1.0), -np.nan_to_num(s.auroc, nan=-1.0))
    return [s.latent for s in sorted(scores, key=key)]


def load_scores(path: "str | Path") -> list[DetectionScore]:
    lines = Path(path).read_text().split("\n")[:-1]
    return [DetectionScore.from_dict(json.loads(line)) for line in lines if line.strip()]
