"""Run modules with their ``forward`` replaced for the duration of a block (a clean prefix, a deferred unembedding)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

from torch import nn


@contextmanager
def forward_replaced(modules: Iterable[nn.Module], forward: Callable) -> Iterator[None]:
    """Inside the block, calling any of ``modules`` runs ``forward`` instead (its hooks still run around it)."""
    modules = list(modules)
    previous = [module.__dict__.get("forward") for module in modules]  # e.g. a wrapper someone else installed
    for module in modules:
        # an instance attribute shadows the class's forward; set through __dict__ because TransformerLens's bridge
        # components forward attribute writes to the module they wrap
        module.__dict__["forward"] = forward
    try:
        yield
    finally:
        for module, before in zip(modules, previous):
            if before is None:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = before
