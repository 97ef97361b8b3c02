"""The Replacement API: a module that computes the activation at one hook site from the activation at another.

A replacement *writes* ``write_site`` and *reads* ``read_site`` (by default the same site). While
attached, a hook on ``read_site`` stores the activation and a hook on ``write_site`` returns
``replacement(stored, batch)`` in place of the model's own activation. ``batch`` tells the
replacement which windows it is looking at, so precomputed per-window data (e.g. LLM simulations)
can be looked up.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from einops import rearrange
from jaxtyping import Float, Int
from torch import Tensor, nn

from nl_rewrite.errors import ShapeMismatchError
from nl_rewrite.model.sites import Site, resolve


@dataclass(frozen=True)
class BatchInfo:
    """What is being run: the token ids and each row's index in its ``TokenWindows``."""

    tokens: Int[Tensor, "batch pos"]
    window_ids: Int[Tensor, " batch"]


class Replacement(nn.Module):
    """Base class. Subclasses set ``write_site`` (and optionally ``read_site``) and implement ``forward``."""

    name: str = "replacement"

    def __init__(self, write_site: "str | Site", read_site: "str | Site | None" = None, name: str | None = None):
        super().__init__()
        self.write_site = Site.parse(write_site)
        self.read_site = Site.parse(read_site) if read_site is not None else self.write_site
        if name is not None:
            self.name = name

    def forward(self, x: Float[Tensor, "batch pos d_read"], batch: BatchInfo) -> Float[Tensor, "batch pos d_write"]:
        raise NotImplementedError

    @staticmethod
    def from_fn(site: "str | Site", fn: Callable[[Tensor], Tensor], name: str,
                read_site: "str | Site | None" = None) -> "Replacement":
        """A one-off replacement from a function of the read site's activation, as a hook function is in
        TransformerLens: ``Replacement.from_fn("mlp_out.6", lambda x: 0.5 * x, "half_mlp")``. It writes ``site``
        and reads ``read_site`` (default: ``site``). Subclass instead when the values depend on the window
        (``forward`` gets a :class:`BatchInfo`)."""
        return FunctionReplacement(fn, site, read_site, name)

    @contextmanager
    def attached(self, model, batch: BatchInfo, positions: Tensor | None = None) -> Iterator[None]:
        """Patch ``model`` for the duration of the block; hooks are removed even if the block raises.

        ``positions`` (optional sequence positions) restricts the patch to those positions; elsewhere the
        model keeps its own activation. The paper patched only the last token of each window.
        """
        with attached_together(model, [self], batch, positions):
            yield

    def patch(self, source: Tensor, act: Tensor, batch: BatchInfo, positions: Tensor | None, hook: str) -> Tensor:
        """What this replacement writes in place of ``act`` (the write site's own activation at ``hook``), given
        ``source`` (the read site's), checked against ``act``'s shape and restricted to ``positions``."""
        out = self(source, batch)
        if not isinstance(out, Tensor) or out.shape != act.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ShapeMismatchError(f"replacement {self.name!r} returned shape {got} for site {self.write_site} "
                                     f"({hook}), which has shape {tuple(act.shape)}")
        out = out.to(device=act.device, dtype=act.dtype)
        if positions is not None:
            keep = torch.ones(act.shape[1], dtype=torch.bool, device=act.device)
            keep[positions] = False
            out = torch.where(rearrange(keep, "pos -> 1 pos 1"), act, out)  # same positions in every row
        return out

    def extra_repr(self) -> str:
        return f"name={self.name!r}, read={self.read_site}, write={self.write_site}"


class FunctionReplacement(Replacement):
    """What :meth:`Replacement.from_fn` builds: ``forward(x, batch)`` is ``fn(x)``."""

    def __init__(self, fn: Callable[[Tensor], Tensor], write_site: "str | Site", read_site: "str | Site | None" = None,
                 name: str | None = None):
        super().__init__(write_site, read_site, name)
        self.fn = fn

    def forward(self, x: Float[Tensor, "batch pos d_read"], batch: BatchInfo) -> Float[Tensor, "batch pos d_write"]:
        return self.fn(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fn={getattr(self.fn, '__name__', type(self.fn).__name__)}"


@contextmanager
def attached_together(model, replacements: "Sequence[Replacement]", batch: BatchInfo,
                      positions: Tensor | None = None) -> Iterator[None]:
    """Patch ``model`` with several replacements at once, stacked along the batch: the model runs on the batch's rows
    repeated once per replacement, and replacement ``i`` patches rows ``[i·b, (i+1)·b)`` (``b`` = the batch's rows),
    so one forward pass evaluates them all. They must share a read site and a write site. A single replacement
    patches whatever the model runs on: that is :meth:`Replacement.attached`."""
    first = replacements[0]
    if any(r.read_site != first.read_site or r.write_site != first.write_site for r in replacements):
        raise ValueError("replacements stacked in one forward pass must share their read and write sites; got "
                         + ", ".join(f"{r.name} ({r.read_site} → {r.write_site})" for r in replacements))
    read_hook, write_hook = resolve(model, first.read_site), resolve(model, first.write_site)
    rows = batch.tokens.shape[0]
    stored: dict[str, Tensor] = {}

    def read(act: Tensor, hook=None) -> Tensor:
        stored["x"] = act
        return act

    def write(act: Tensor, hook=None) -> Tensor:
        source = stored.pop("x") if read_hook != write_hook else act
        if len(replacements) == 1:  # nothing to slice: any input the model runs on, as Replacement.attached always took
            return first.patch(source, act, batch, positions, write_hook)
        if act.shape[0] != rows * len(replacements):
            raise ShapeMismatchError(f"{len(replacements)} stacked replacement(s) of a {rows}-row batch expect "
                                     f"{rows * len(replacements)} rows at {write_hook}, got {act.shape[0]}: run the "
                                     "model on the batch's tokens repeated once per replacement")
        return torch.cat([rep.patch(source[i * rows:(i + 1) * rows], act[i * rows:(i + 1) * rows], batch, positions,
                                    write_hook) for i, rep in enumerate(replacements)])

    hooks = [(write_hook, write)] if read_hook == write_hook else [(read_hook, read), (write_hook, write)]
    with model.hooks(fwd_hooks=hooks):
        yield


def replacement_names(replacements: "list[Replacement]") -> list[str]:
    """Condition names, checked to be unique (they key the results)."""
    names = [r.name for r in replacements]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"replacement names must be unique; repeated: {dupes}")
    return names

