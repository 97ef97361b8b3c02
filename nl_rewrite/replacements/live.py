"""The rewritten MLP on any text: chosen latents simulated on the fly from the tokens being run.

:class:`NLSimulatorReplacement` looks simulations up by window id, so it only runs on windows simulated in
advance. ``LiveSimulatorReplacement`` instead asks its simulator (the lexical reader, or the LLM simulator
whose backend caches every call on disk) for the tokens of each row it is given, calibrates per latent and
patches exactly as the stored version does: overwrite, TopK over all latents, decode, skip. Results are
memoised per (row tokens), so a repeated prompt costs nothing.
"""

from __future__ import annotations

import logging
from typing import Callable, Mapping, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from nl_rewrite.interp.calibrate import Calibrator
from nl_rewrite.interp.simulate import SimulationItem
from nl_rewrite.coders.sparse_coder import SparseCoder
from nl_rewrite.replacements.base import BatchInfo
from nl_rewrite.replacements.coders import CoderReplacement

log = logging.getLogger(__name__)


class LiveSimulatorReplacement(CoderReplacement):
    """See the module docstring. ``token_strings`` maps token ids to the strings the simulator reads."""

    def __init__(self, transcoder: SparseCoder, simulator, explanations: Mapping[int, str],
                 calibrators: Mapping[int, Calibrator], token_strings: Callable[[list[int]], list[str]],
                 name: str = "live_simulated"):
        super().__init__(transcoder, name)
        missing = [lat for lat in explanations if lat not in calibrators]
        if missing:
            raise ValueError(f"{name}: latents {missing[:5]} have an explanation but no calibrator")
        self.latents = sorted(int(lat) for lat in explanations)
        self.simulator, self.explanations, self.calibrators = simulator, dict(explanations), dict(calibrators)
        self.token_strings = token_strings
        self.register_buffer("overwrite_ids", torch.tensor(self.latents, dtype=torch.long), persistent=False)
        self.nan_values = 0
        self._memo: dict[tuple[int, ...], Tensor] = {}

    def row_values(self, tokens: Sequence[int]) -> Float[Tensor, "pos m"]:
        """Calibrated simulated values of every chosen latent on one row of tokens."""
        key = tuple(int(t) for t in tokens)
        if key not in self._memo:
            strings = tuple(self.token_strings(list(key)))
            items = [SimulationItem(self.explanations[lat], strings) for lat in self.latents]
            scores = self.simulator.simulate_many(items)
            cols = [self.calibrators[lat](s.to(torch.float32)) for lat, s in zip(self.latents, scores)]
            values = torch.stack(cols, dim=-1) if cols else torch.zeros(len(key), 0)
            nan = torch.isnan(values)
            if nan.any():
                self.nan_values += int(nan.sum())
                log.warning("%s: %d simulated values were NaN and are set to 0", self.name, int(nan.sum()))
            self._memo[key] = torch.where(nan, torch.zeros_like(values), values)
        return self._memo[key]

    @torch.no_grad()
    def forward(self, x: Float[Tensor, "batch pos d_in"], batch: BatchInfo) -> Float[Tensor, "batch pos d_out"]:
        x = self._input(x)
        tokens: Int[Tensor, "batch pos"] = batch.tokens
        values = torch.stack([self.row_values(row) for row in tokens.tolist()]).to(device=x.device, dtype=x.dtype)
        return self.coder(x, overwrite_ids=self.overwrite_ids, overwrite_values=values, retopk=True)
