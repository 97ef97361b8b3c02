"""Greedy continuations from the clean model and from rewritten ones, side by side.

Each step reruns the whole sequence (no KV cache): a replacement sees every token it patches, which is
what a live simulator needs, and the prompts are short. Prompts of one length are continued as one batch: a
step's cost on a short sequence is mostly per-call overhead, so three prompts take about half the time of three
calls (benchmarks/generation.py). A batched forward pass is not bit-identical to one row at a time on every
backend, so a near-tie between two tokens could in principle flip; none did in the tests or the benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import groupby
from typing import Callable, Mapping

import torch
from jaxtyping import Int
from torch import Tensor

from nl_rewrite.replacements.base import BatchInfo, Replacement
from nl_rewrite.placement import module_device


@torch.no_grad()
def greedy_batch(model, prompts: Int[Tensor, "batch pos"], n_new: int, replacement: Replacement | None = None
                 ) -> Int[Tensor, "batch n_new"]:
    """The ``n_new`` token ids the model (patched by ``replacement`` if given) picks greedily after each prompt."""
    tokens, window_ids = prompts.to(module_device(model)), torch.zeros(len(prompts), dtype=torch.long)
    for _ in range(n_new):
        if replacement is None:
            logits = model(tokens)
        else:
            with replacement.attached(model, BatchInfo(tokens=tokens, window_ids=window_ids)):
                logits = model(tokens)
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens[:, prompts.shape[1]:].cpu()


def greedy(model, prompt: Int[Tensor, " pos"], n_new: int, replacement: Replacement | None = None) -> list[int]:
    """The ``n_new`` token ids the model (patched by ``replacement`` if given) picks greedily after ``prompt``."""
    return greedy_batch(model, prompt.reshape(1, -1), n_new, replacement)[0].tolist()


def greedy_continuations(model, prompts: list[Tensor], n_new: int, replacement: Replacement | None) -> list[list[int]]:
    """Each prompt's greedy continuation, in the prompts' order; prompts of one length run as one batch."""
    out: dict[int, list[int]] = {}
    by_length = sorted(range(len(prompts)), key=lambda i: prompts[i].numel())
    for _, group in groupby(by_length, key=lambda i: prompts[i].numel()):
        rows = list(group)
        ids = greedy_batch(model, torch.stack([prompts[i].reshape(-1) for i in rows]), n_new, replacement)
        out.update(zip(rows, ids.tolist()))
    return [out[i] for i in range(len(prompts))]


@dataclass(frozen=True)
class Generation:
    """Greedy continuations of one prompt, per model (condition name → the continuation's text)."""

    prompt: str
    continuations: dict[str, str]


def side_by_side(model, prompts: list[Tensor], conditions: Mapping[str, Replacement | None], n_new: int,
                 decode: Callable[[list[int]], list[str]]) -> list[Generation]:
    """Per prompt: its text and each condition's continuation (``None`` is the clean model)."""
    per_condition = {name: greedy_continuations(model, prompts, n_new, rep) for name, rep in conditions.items()}
    return [Generation("".join(decode(p.tolist())),
                       {name: "".join(decode(ids[i])) for name, ids in per_condition.items()})
            for i, p in enumerate(prompts)]
