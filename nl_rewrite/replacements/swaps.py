"""Swaps: where a simulation of every latent loses the gap, in where it fires or in what it writes.

A simulation (after TopK) gets two things wrong: the latents it fires, and the values it writes. A swap keeps one of
them and takes the other from the coder's true (post-TopK) activations, then decodes and adds the skip path:

- ``simulated_firing``: the *true* values where the simulation fires, 0 elsewhere (0 at its false positives). What
  this loses is the true firings the simulation misses.
- ``true_firing``: the *simulated* values where the latent truly fires, 0 elsewhere (false positives removed). What
  this loses is the simulation's magnitudes, including the firings it misses (written at their low simulated value).

If the first recovers most of the gap and the second little, the explanations pick the right latents but cannot say
how strongly they fire; the other way round, they miss firings.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from nl_rewrite.replacements.base import BatchInfo
from nl_rewrite.replacements.coders import CoderReplacement
from nl_rewrite.replacements.simulated import NLSimulatorReplacement

Swap = Literal["simulated_firing", "true_firing"]
SWAPS: tuple[Swap, ...] = get_args(Swap)
SWAP_PREFIX = "swap_"
"""A swap's condition in a run is named ``swap_<part kept>``: ``swap_simulated_firing``, ``swap_true_firing``."""


def firing(values: Float[Tensor, "... n_latents"], k: int) -> Bool[Tensor, "... n_latents"]:
    """The latents TopK keeps with a positive value: the firing pattern a condition writing ``values`` produces."""
    top = values.topk(k, dim=-1)
    return torch.zeros_like(values, dtype=torch.bool).scatter_(-1, top.indices, top.values > 0)


def swapped(simulated: Float[Tensor, "... n_latents"], true: Float[Tensor, "... n_latents"], k: int, keep: Swap
            ) -> Float[Tensor, "... n_latents"]:
    """The values a swap writes (see the module docstring); ``true`` holds the coder's post-TopK activations."""
    if simulated.shape != true.shape:
        raise ValueError(f"simulated values {tuple(simulated.shape)} and true values {tuple(true.shape)} differ")
    fires = firing(simulated, k) if keep == "simulated_firing" else true > 0
    return torch.where(fires, true if keep == "simulated_firing" else simulated, true.new_zeros(()))


class SwapReplacement(CoderReplacement):
    """A swap (see the module docstring) of ``simulated``, a simulation of every latent of its coder."""

    def __init__(self, simulated: NLSimulatorReplacement, keep: Swap, name: str):
        super().__init__(simulated.coder, name)
        if keep not in SWAPS:
            raise ValueError(f"unknown swap {keep!r}; valid: {', '.join(SWAPS)}")
        if sorted(simulated.latents) != list(range(simulated.coder.cfg.n_latents)):
            raise ValueError(f"a swap needs a simulation of every latent; {simulated.name} simulates "
                             f"{len(simulated.latents)} of {simulated.coder.cfg.n_latents}")
        self.simulated, self.keep = simulated, keep

    @torch.no_grad()
    def forward(self, x: Float[Tensor, "batch pos d_in"], batch: BatchInfo) -> Float[Tensor, "batch pos d_out"]:
        x = self._input(x)
        true = self.coder.encode(x).dense(self.coder.cfg.n_latents)
        simulated = torch.zeros_like(true)
        simulated[..., self.simulated.overwrite_ids] = self.simulated.values(batch.window_ids, x.shape[1]).to(true)
        values = swapped(simulated, true, self.coder.cfg.k, self.keep)
        return self.coder.decode(self.coder.topk(values)) + self.coder.skip(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, keep={self.keep}, of={self.simulated.name}"
