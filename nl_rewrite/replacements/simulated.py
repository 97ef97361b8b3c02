"""The NL-simulator replacement: a sparse coder whose chosen latents are predicted by an LLM from explanations.

For the chosen latents, the values come from stored simulations (looked up by window id and position)
mapped through each latent's calibrator; every other latent keeps its real encoder value; TopK is
re-applied over all latents, then decode + skip (``SparseCoder.forward(..., retopk=True)``, the paper's
protocol). The coder may be a transcoder or an SAE (the paper's second experiment): an SAE has no skip path, so
its decoded latents replace the site's activation. Calibration is applied once, at construction, so a forward pass is a table lookup.

A window that has no simulation for a chosen latent is a clear error, never a silent zero. A NaN
simulated value (the simulator got no usable logprobs there) becomes 0 — counted and logged.
"""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from nl_rewrite.interp.calibrate import Calibrator
from nl_rewrite.interp.window_rows import WindowRows
from nl_rewrite.errors import MissingSimulationError, ShapeMismatchError
from nl_rewrite.coders.sparse_coder import SparseCoder
from nl_rewrite.replacements.base import BatchInfo
from nl_rewrite.replacements.coders import CoderReplacement

log = logging.getLogger(__name__)


class NLSimulatorReplacement(CoderReplacement):
    """See the module docstring.

    ``simulations``: latent → window id → raw simulated scores ``[pos]`` (as ``SimulationStore.load`` gives).
    ``calibrators``: latent → fitted calibrator. ``latents``: the chosen latent ids (may be empty: then
    this is the plain coder)."""

    def __init__(self, transcoder: SparseCoder, simulations: Mapping[int, Mapping[int, Tensor]],
                 calibrators: Mapping[int, Calibrator], latents: Sequence[int], name: str = "nl_simulated"):
        super().__init__(transcoder, name)
        self.latents = [int(latent) for latent in latents]
        _check_inputs(self.latents, simulations, calibrators, transcoder.cfg.n_latents)
        self.register_buffer("overwrite_ids", torch.tensor(self.latents, dtype=torch.long), persistent=False)
        self.nan_values = 0
        self._table, self._incomplete = self._build_table(simulations, calibrators)

    def _build_table(self, simulations, calibrators) -> tuple[dict[int, Tensor], dict[int, list[int]]]:
        """window id → calibrated values ``[pos, m]`` for windows simulated for every chosen latent; the other windows
        → the chosen latents they lack."""
        per_latent = [self._calibrated(latent, simulations[latent], calibrators[latent]) for latent in self.latents]
        if self.nan_values:
            log.warning("%s: %d simulated values were NaN (no usable logprobs) and are set to 0",
                        self.name, self.nan_values)
        rows = [{w: i for i, w in enumerate(ids)} for ids, _ in per_latent]  # per latent: window id → row
        windows = sorted(set().union(*rows))
        incomplete = {w: missing for w in windows
                      if (missing := [lat for lat, r in zip(self.latents, rows) if w not in r])}
        complete = [w for w in windows if w not in incomplete]
        if not complete:
            return {}, incomplete
        # one gather per latent and one stack, not a stack per window. Each window's values are copied out: a view
        # would pickle the whole stack (for every window) when the condition travels to Ray
        stacked = torch.stack([values[[r[w] for w in complete]] for r, (_, values) in zip(rows, per_latent)], dim=-1)
        return {w: row.clone() for w, row in zip(complete, stacked)}, incomplete

    def _calibrated(self, latent: int, windows: Mapping[int, Tensor], calibrator: Calibrator
                    ) -> tuple[tuple[int, ...], Tensor]:
        """(window ids, calibrated values ``[windows, pos]``) of one latent: one calibrator call per latent, not per
        window."""
        if isinstance(windows, WindowRows):
            ids, scores = windows.ids, windows.rows
        else:
            ids = tuple(int(w) for w in windows)
            scores = torch.stack([windows[w] for w in ids]) if ids else torch.zeros(0, 0)
        # one dtype conversion per latent (a conversion per window was a quarter of the default run's time building
        # conditions)
        scores = scores.reshape(len(ids), -1).to(torch.float32)
        values = calibrator(scores.reshape(-1)).reshape(scores.shape) if ids else scores
        nan = torch.isnan(values)
        self.nan_values += int(nan.sum())
        return ids, torch.where(nan, torch.zeros_like(values), values)

    @property
    def window_ids(self) -> list[int]:
        """Windows this replacement can run on (all of them when no latent is chosen)."""
        return sorted(self._table)

    def values(self, window_ids: Tensor, n_pos: int) -> Float[Tensor, "batch pos m"]:
        """The calibrated values written for the chosen latents on these windows (as the forward pass uses them)."""
        return self._values_for(window_ids, n_pos)

    def _values_for(self, window_ids: Tensor, n_pos: int) -> Float[Tensor, "batch pos m"]:
        rows = []
        for w in window_ids.tolist():
            if w not in self._table:
                missing = self._incomplete.get(w, self.latents)
                raise MissingSimulationError(
                    f"{self.name}: window {w} has no simulation for {len(missing)} chosen latent(s) "
                    f"(first: {missing[:5]}); simulate it before evaluating")
            rows.append(self._table[w])
        values = torch.stack(rows)
        if values.shape[1] != n_pos:
            raise ShapeMismatchError(f"{self.name}: simulations cover {values.shape[1]} positions per window, "
                                     f"the model runs {n_pos} (simulated with or without BOS?)")
        return values

    @torch.no_grad()
    def forward(self, x: Float[Tensor, "batch pos d_in"], batch: BatchInfo) -> Float[Tensor, "batch pos d_out"]:
        x = self._input(x)
        if not self.latents:
            return self.coder(x)
        values = self._values_for(batch.window_ids, x.shape[1]).to(device=x.device, dtype=x.dtype)
        return self.coder(x, overwrite_ids=self.overwrite_ids, overwrite_values=values, retopk=True)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, latents={len(self.latents)}, windows={len(self._table)}"


def _check_inputs(latents: list[int], simulations, calibrators, n_latents: int) -> None:
    bad = [lat for lat in latents if not 0 <= lat < n_latents]
    if bad:
        raise ValueError(f"latent ids {bad[:5]} out of range for a transcoder with {n_latents} latents")
    if len(set(latents)) != len(latents):
        raise ValueError("chosen latents contain repeats")
    for what, table in (("simulations", simulations), ("calibrator", calibrators)):
        absent = [lat for lat in latents if lat not in table]
        if absent:
            raise MissingSimulationError(f"{len(absent)} chosen latent(s) have no {what} "
                                          f"(first: {absent[:5]}); simulate and calibrate them first")
