"""From a server's top-K log-probs to the protocol's choice matrix, without guessing what the server left out.

A server returns only its K most likely tokens at a read point. A choice missing from them is less likely than
the K-th token, so its probability is bounded by ``exp(floor)``. When the bound on all missing choices together
is at most ``NEGLIGIBLE`` (a tenth) of the mass of the choices that did come back, the missing ones are ``-inf``:
they could then move an expected digit (0-9) by at most 0.9 in the worst case, and never flip a yes/no decision
(the listed choice keeps at least 10x the missing one's bound). Otherwise the row is NaN: unknown, counted by
the caller, never filled in.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

NEGLIGIBLE = 0.1


def choice_row(top: Mapping[str, float], choices: Sequence[str], floor: float) -> list[float]:
    """Log-probs of ``choices`` from one read point's top-K ``top`` (token → logprob), where every token left out
    is at most ``floor`` (see :func:`topk_floor`)."""
    row = [float(top[c]) if c in top else -math.inf for c in choices]
    missing = sum(1 for c in choices if c not in top)
    if not missing:
        return row
    present = sum(math.exp(v) for v in row if v > -math.inf)
    if present > 0 and missing * math.exp(floor) <= NEGLIGIBLE * present:
        return row
    return [math.nan] * len(choices)


def exact_row(values: Mapping[str, float | None], choices: Sequence[str]) -> list[float]:
    """Log-probs the server was asked for by id (SGLang): a choice it did not return, or returned as null, is
    unknown, so the row is NaN."""
    if any(values.get(c) is None for c in choices):
        return [math.nan] * len(choices)
    return [float(values[c]) for c in choices]  # type: ignore[arg-type]


def topk_floor(top: Mapping[str, float], k: int) -> float:
    """An upper bound on every token left out of a top-``k`` list: its ``k``-th logprob, or its smallest when
    fewer came back (OpenAI-style lists are keyed by token text, so tokens with the same text merge)."""
    values = sorted(top.values(), reverse=True)
    if not values:
        return 0.0  # nothing came back: nothing is bounded
    return float(values[k - 1]) if len(values) >= k else float(values[-1])


def choice_matrix(rows: list[list[float]], n_choices: int) -> Float[Tensor, "n_read n_choices"]:
    return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), n_choices)


def usable_rows(logprobs: Float[Tensor, "n_read n_choices"]) -> Tensor:
    """Rows that carry an answer: no NaN (unknown) and at least one finite log-prob."""
    return torch.isfinite(logprobs).any(dim=-1) & ~torch.isnan(logprobs).any(dim=-1)
