"""One Evaluator for every replacement: CE and KL against the clean model, with window-bootstrap CIs.

KL direction: ``KL(clean || patched) = Σ_v p_clean(v) · (log p_clean(v) − log p_patched(v))`` per token,
i.e. how badly the patched model's prediction explains the clean model's. (The paper's released code
computed the reverse, KL(patched || clean).)

Modes:
- ``positions="all"`` (default): every next-token prediction of every window is patched and scored.
- ``positions="last"``: only the second-to-last position of each window is patched, and its prediction
  of the window's last token is scored — the paper's one-token-per-window protocol, kept for comparison.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Sequence, get_args

import torch
from torch import Tensor
from tqdm.auto import tqdm

from nl_rewrite import io
from nl_rewrite.data.windows import TokenWindows
from nl_rewrite.evaluation.prefix import capture_block_inputs, first_layer, resume_reproduces, resumed_at
from nl_rewrite.evaluation.scoring import (CleanPrediction, LinearUnembedding, Logits, token_ce_and_kl,
                                          unembedding_deferred, unembedding_reproduces)
from nl_rewrite.parallel.runner import InProcess, ShardRunner
from nl_rewrite.replacements.base import BatchInfo, Replacement, attached_together, replacement_names
from nl_rewrite.evaluation.stats import CIBounds, RatioCI, bootstrap_indices, mean_ci, paired_wilcoxon, ratio_ci
from nl_rewrite.placement import module_device

log = logging.getLogger(__name__)
CLEAN = "clean"
PositionMode = Literal["all", "last"]
DEFAULT_STACK = 2
"""Conditions per forward pass from the patch point. On this project's 2-core CPU (benchmarks/evaluate_throughput.py,
24 conditions at MLP 10, 16 windows): stacking 2 ran 1.19× faster than one at a time for 137 MB more, 4 ran 1.16×,
8 ran 1.08× for 723 MB more. Raise it where wider batches pay (a GPU)."""
POSITION_MODES: tuple[str, ...] = get_args(PositionMode)


@dataclass
class ConditionSummary:
    """Means with 95% bootstrap CIs (over windows) for one condition."""

    mean_ce: float
    ce_ci: CIBounds
    ce_delta: float
    ce_delta_ci: CIBounds
    kl_mean: float
    kl_ci: CIBounds
    n_tokens: int
    n_windows: int


@dataclass
class EvalResults:
    """Per-window mean CE and KL for each condition (``clean`` included), plus summaries."""

    positions: str
    window_ids: list[int]
    ce: dict[str, list[float]]
    """condition → per-window mean CE (nats)."""
    kl: dict[str, list[float]]
    """condition → per-window mean KL(clean || patched) (nats)."""
    tokens_per_window: int
    n_bootstrap: int = 1000
    seed: int = 0
    summaries: dict[str, ConditionSummary] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.summaries:
            self.summaries = {name: self._summarise(name) for name in self.ce}

    @property
    def conditions(self) -> list[str]:
        return list(self.ce)

    def _tensor(self, table: dict[str, list[float]], name: str) -> Tensor:
        if name not in table:
            raise KeyError(f"no condition {name!r}; have {', '.join(table)}")
        return torch.tensor(table[name], dtype=torch.double)

    def _resamples(self) -> Tensor:
        return bootstrap_indices(len(self.window_ids), self.n_bootstrap, self.seed)

    def _summarise(self, name: str) -> ConditionSummary:
        ce, kl, clean = self._tensor(self.ce, name), self._tensor(self.kl, name), self._tensor(self.ce, CLEAN)
        resamples = self._resamples()
        return ConditionSummary(
            mean_ce=float(ce.mean()), ce_ci=mean_ci(ce, resamples),
            ce_delta=float((ce - clean).mean()), ce_delta_ci=mean_ci(ce - clean, resamples),
            kl_mean=float(kl.mean()), kl_ci=mean_ci(kl, resamples),
            n_tokens=len(self.window_ids) * self.tokens_per_window, n_windows=len(self.window_ids),
        )

    def wilcoxon(self, a: str, b: str) -> float:
        """Paired two-sided Wilcoxon p-value between two conditions' per-window CE."""
        return paired_wilcoxon(self._tensor(self.ce, a), self._tensor(self.ce, b))

    def difference(self, a: str, b: str, metric: Literal["ce", "kl"] = "ce") -> tuple[float, CIBounds]:
        """Mean per-window (a − b) of CE or KL, with its window-bootstrap CI: a paired comparison."""
        table = {"ce": self.ce, "kl": self.kl}[metric]
        per_window = self._tensor(table, a) - self._tensor(table, b)
        return float(per_window.mean()), mean_ci(per_window, self._resamples())

    def fraction_recovered(self, condition: str, worse: str, better: str = CLEAN) -> tuple[float, RatioCI]:
        """(CE_worse − CE_condition) / (CE_worse − CE_better) with a window-bootstrap CI.

        The CI unpacks as ``lo, hi``; its ``undefined`` counts resamples whose gap was not positive, and
        ``reliable`` is False when more than the CI's tail mass of them had no ratio (then do not quote it)."""
        worse_ce = self._tensor(self.ce, worse)
        numer = worse_ce - self._tensor(self.ce, condition)
        denom = worse_ce - self._tensor(self.ce, better)
        value = float(numer.mean() / denom.mean()) if float(denom.mean()) != 0 else math.nan
        return value, ratio_ci(numer, denom, self._resamples())

    def merge(self, other: "EvalResults") -> "EvalResults":
        """Combine conditions evaluated on the same windows in separate runs."""
        if other.window_ids != self.window_ids or other.positions != self.positions:
            raise ValueError("can only merge results over the same windows and position mode")
        return EvalResults(self.positions, self.window_ids, {**self.ce, **other.ce}, {**self.kl, **other.kl},
                           self.tokens_per_window, self.n_bootstrap, self.seed)

    def to_json(self, path: str | Path | None = None) -> dict:
        data = asdict(self)
        if path is not None:
            io.write_json(path, data)
        return data

    @classmethod
    def from_json(cls, source: str | Path | dict) -> "EvalResults":
        data = source if isinstance(source, dict) else json.loads(Path(source).read_text())
        data = dict(data)
        data["summaries"] = {k: ConditionSummary(**{f: tuple(v) if isinstance(v, list) else v for f, v in s.items()})
                             for k, s in data.get("summaries", {}).items()}
        return cls(**data)

    def summary_table(self) -> str:
        """The conditions' summaries as a plain-text table."""
        rows = [f"{'condition':<28}{'mean CE':>10}{'ΔCE':>10}{'ΔCE 95% CI':>22}{'KL(clean‖patched)':>20}"]
        for name, s in self.summaries.items():
            ci = f"[{s.ce_delta_ci[0]:+.4f}, {s.ce_delta_ci[1]:+.4f}]"
            rows.append(f"{name:<28}{s.mean_ce:>10.4f}{s.ce_delta:>+10.4f}{ci:>22}{s.kl_mean:>20.4f}")
        return "\n".join(rows)


class Evaluator:
    """Measures how far each replacement moves the model's next-token predictions on ``windows``."""

    def __init__(self, model, windows: TokenWindows, batch_size: int = 8, positions: str = "all",
                 n_bootstrap: int = 1000, seed: int = 0, progress: bool = True, reuse_prefix: bool = True,
                 stack: int = DEFAULT_STACK, chunked_unembedding: bool = True):
        if positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {POSITION_MODES}, got {positions!r}")
        if batch_size < 1 or stack < 1:
            raise ValueError(f"batch_size and stack must be positive, got {batch_size} and {stack}")
        self.model, self.windows, self.batch_size, self.stack = model, windows, batch_size, stack
        """``stack``: conditions sharing a patch site run in one forward pass, the batch repeated once per condition
        (``batch_size × stack`` rows from the patch point on); 1 runs them one at a time."""
        self.positions, self.n_bootstrap, self.seed, self.progress = positions, n_bootstrap, seed, progress
        self.reuse_prefix = reuse_prefix
        """Start each patched run at its first patched block from the clean pass's residual (same numbers, less work)."""
        self.broken_starts: frozenset[int] = frozenset()
        """Blocks where resuming was found not to reproduce the clean logits: :meth:`run` checks before any work (and
        the Evaluator travels to workers with it); conditions patching there are recomputed from the embedding."""
        self.chunked_unembedding = chunked_unembedding
        """Score from the model's last hidden state, unembedding a vocabulary chunk at a time and writing no logits
        (:mod:`nl_rewrite.evaluation.scoring`; the same numbers to float32's rounding, less work)."""
        self.defer_unembedding = False
        """Whether the model runs without its unembedding: :meth:`run` sets it when ``chunked_unembedding`` is asked
        for and reproduces this model's logits (a soft-capped model is scored from its logits)."""

    def _scored(self, tokens: Tensor) -> tuple[slice, Tensor | None]:
        """Which logits are scored, and which positions get patched (None: all)."""
        if self.positions == "all":
            return slice(0, tokens.shape[1] - 1), None
        last = tokens.shape[1] - 2
        return slice(last, last + 1), torch.tensor([last])

    def _check_prefix_reuse(self, replacements: Sequence[Replacement]) -> None:
        """Verify once per start layer, on two windows, that resuming reproduces the clean pass; a layer where it
        does not is evaluated with full recomputation (slower, same numbers)."""
        self.broken_starts = frozenset()
        starts = sorted({self._start_layer(rep) for rep in replacements} - {0})
        self.broken_starts = frozenset(layer for layer in starts
                                       if not resume_reproduces(self.model, self.windows.tokens[:2], layer))
        if self.broken_starts:
            log.warning("resuming at block(s) %s does not reproduce this model's clean logits; those conditions use "
                        "full recomputation instead (slower, same numbers)", sorted(self.broken_starts))

    def _start_layer(self, rep: Replacement) -> int:
        if not self.reuse_prefix:
            return 0
        layer = first_layer([rep.read_site, rep.write_site])
        return 0 if layer in self.broken_starts else layer

    @torch.no_grad()
    def _batch(self, ids: Tensor, tokens: Tensor, replacements: Sequence[Replacement]) -> dict[str, tuple[Tensor, Tensor]]:
        scored, patch_positions = self._scored(tokens)
        targets = tokens[:, 1:][:, scored]
        starts = {self._start_layer(rep) for rep in replacements} - {0}
        with self._unembedding_deferred():
            with capture_block_inputs(self.model, starts) as resid:
                clean_out = self.model(tokens)[:, scored]
            readout = LinearUnembedding.of(self.model) if self.defer_unembedding else Logits()
            clean = CleanPrediction.of(clean_out, readout)
            out = {CLEAN: token_ce_and_kl(clean_out, clean, targets)}
            batch = BatchInfo(tokens=tokens, window_ids=ids)
            for group in self._stacks(replacements):
                patched = self._patched_run(group, tokens, batch, patch_positions, resid)
                for rep, part in zip(group, patched.split(len(tokens))):
                    out[rep.name] = token_ce_and_kl(part[:, scored], clean, targets)
        return {name: out[name] for name in [CLEAN, *(rep.name for rep in replacements)]}

    def _unembedding_deferred(self) -> contextlib.AbstractContextManager:
        return unembedding_deferred(self.model) if self.defer_unembedding else contextlib.nullcontext()

    def _stacks(self, replacements: Sequence[Replacement]) -> list[list[Replacement]]:
        """Replacements that can share a forward pass (same start layer and sites), at most ``stack`` per pass."""
        groups: dict[tuple, list[Replacement]] = {}
        for rep in replacements:
            groups.setdefault((self._start_layer(rep), rep.read_site, rep.write_site), []).append(rep)
        return [group[i:i + self.stack] for group in groups.values() for i in range(0, len(group), self.stack)]

    def _patched_run(self, group: list[Replacement], tokens: Tensor, batch: BatchInfo, positions: Tensor | None,
                     resid: dict[int, Tensor]) -> Tensor:
        """The model's output (hidden states or logits) with every replacement in ``group`` on ``tokens``, stacked
        along the batch in group order."""
        start = self._start_layer(group[0])
        copies = len(group)  # one condition (the default) runs on the batch itself, not a copy of it
        stacked = tokens if copies == 1 else tokens.repeat(copies, 1)
        with attached_together(self.model, group, batch, positions):
            if start == 0:
                return self.model(stacked)
            with resumed_at(self.model, start, resid[start] if copies == 1 else resid[start].repeat(copies, 1, 1)):
                return self.model(stacked)

    def run(self, replacements: Sequence[Replacement] = (), runner: ShardRunner | None = None) -> EvalResults:
        """Evaluate the clean model and every replacement on all windows; returns per-window means and summaries.

        With a ``runner`` (e.g. Ray), spans of ``SHARD_BATCHES`` batches run on its workers, each holding a copy of
        the model and the replacements; batches are the same as in one process, so the numbers are too."""
        names = [CLEAN] + replacement_names(list(replacements))
        if CLEAN in names[1:]:
            raise ValueError(f"{CLEAN!r} is reserved for the unpatched model")
        self._check_prefix_reuse(replacements)
        self.defer_unembedding = self.chunked_unembedding and unembedding_reproduces(
            self.model, self.windows.tokens[:2].to(module_device(self.model)))
        runner = runner or InProcess()
        spans = self._spans(SHARD_BATCHES if runner.parallel else None)
        tables: dict[int, WindowTable] = {}
        # one bar: over spans when they run elsewhere, over batches when the one span runs here
        shard = EvalShard(self, list(replacements), batch_progress=self.progress and not runner.parallel)
        runner.map(shard, evaluate_span, spans, tables.__setitem__, desc=self.label(len(names)),
                   progress=self.progress and runner.parallel)
        ce = {n: [v for i in range(len(spans)) for v in tables[i].ce.get(n, [])] for n in names}
        kl = {n: [v for i in range(len(spans)) for v in tables[i].kl.get(n, [])] for n in names}
        per_window = 1 if self.positions == "last" else self.windows.window - 1
        return EvalResults(self.positions, list(range(len(self.windows))), ce, kl, per_window, self.n_bootstrap, self.seed)

    @staticmethod
    def label(n_conditions: int) -> str:
        return f"evaluate ({n_conditions} conditions)"

    def _spans(self, batches_per_span: int | None) -> list[tuple[int, int]]:
        """Window ranges that start on batch boundaries (one range for the whole set when not sharded)."""
        n = len(self.windows)
        step = n if batches_per_span is None else self.batch_size * batches_per_span
        return [(start, min(start + step, n)) for start in range(0, max(n, 1), max(step, 1))]

    def window_table(self, replacements: Sequence[Replacement], span: tuple[int, int], progress: bool
                     ) -> "WindowTable":
        """Per-window mean CE and KL of every condition on windows ``[start, stop)``, in batches of ``batch_size``."""
        out = WindowTable({}, {})
        starts = range(span[0], span[1], self.batch_size)
        for start in tqdm(starts, desc=self.label(len(replacements) + 1), disable=not progress):
            ids = torch.arange(start, min(start + self.batch_size, span[1]))
            tokens = self.windows.tokens[ids].to(module_device(self.model))
            for name, (tok_ce, tok_kl) in self._batch(ids, tokens, replacements).items():
                out.ce.setdefault(name, []).extend(tok_ce.mean(1).tolist())
                out.kl.setdefault(name, []).extend(tok_kl.mean(1).tolist())
        return out


SHARD_BATCHES = 4
"""Batches per sharded evaluation task: small enough to balance workers, large enough to amortise a call."""


@dataclass
class WindowTable:
    """Per-window mean CE and KL of each condition on one span of windows."""

    ce: dict[str, list[float]]
    kl: dict[str, list[float]]


@dataclass
class EvalShard:
    """What each worker evaluates with: the evaluator (model and windows) and the conditions."""

    evaluator: Evaluator
    replacements: list[Replacement]
    batch_progress: bool
    """Show a bar over each span's batches (in-process, where there is one span)."""


def evaluate_span(shard: EvalShard, span: tuple[int, int]) -> WindowTable:
    return shard.evaluator.window_table(shard.replacements, span, progress=shard.batch_progress)
