"""One latent's simulated scores on many windows, held as one tensor.

A simulator reads a latent on every eval window at once and gives ``[windows, pos]``. Consumers such as
:class:`~nl_rewrite.replacements.simulated.NLSimulatorReplacement` look scores up by window id, as in the
``SimulationStore.load`` mapping (window id → ``[pos]``). Splitting the tensor into one view per window made
4,096 latents × 128 windows × 4 arms of tensor objects in the default run, about a gigabyte of bookkeeping;
:class:`WindowRows` is the same mapping without them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Iterator, Sequence

from jaxtyping import Float
from torch import Tensor


class WindowRows(Mapping[int, Tensor]):
    """window id → ``rows[i]`` (``[pos]``), for the ``ids`` in row order. ``position`` (window id → row) may be
    shared by every latent read on the same windows; it is built from ``ids`` when not given."""

    def __init__(self, ids: Sequence[int], rows: Float[Tensor, "n pos"], position: Mapping[int, int] | None = None):
        if len(ids) != rows.shape[0]:
            raise ValueError(f"{len(ids)} window ids for {rows.shape[0]} rows of simulated scores")
        self.ids = tuple(int(w) for w in ids)
        self.rows = rows
        self.position = position if position is not None else {w: i for i, w in enumerate(self.ids)}

    def __getitem__(self, window: int) -> Float[Tensor, " pos"]:
        return self.rows[self.position[window]]

    def __iter__(self) -> Iterator[int]:
        return iter(self.ids)

    def __len__(self) -> int:
        return len(self.ids)
