"""Greedy continuations from the clean model and from rewritten ones, side by side.

Each step reruns the whole sequence (no KV cache): a replacement sees every token it patches, which is
what a live simulator needs, and the prompts are short.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from jaxtyping import Int
from torch import Tensor

from nl_rewrite.replacements.base import BatchInfo, Replacement


@torch.no_grad()
def greedy(model, prompt: Int[Tensor, " pos"], n_new: int, replacement: Replacement | None = None
           ) -> list[int]:
    """The ``n_new`` token ids the model (patched by ``replacement`` if given) picks greedily after ``prompt``."""
    tokens = prompt.reshape(1, -1).clone()
    for _ in range(n_new):
        if replacement is None:
            logits = model(tokens)
        else:
            with replacement.attached(model, BatchInfo(tokens=tokens, window_ids=torch.zeros(1, dtype=torch.long))):
                logits = model(tokens)
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens[0, prompt.numel():].tolist()


def side_by_side(model, prompts: list[Tensor], conditions: Mapping[str, Replacement | None], n_new: int,
                 decode: Callable[[list[int]], list[str]]) -> list[dict]:
    """Per prompt: its text and each condition's continuation (``None`` is the clean model)."""
    return [{"prompt": "".join(decode(p.tolist())),
             "continuations": {name: "".join(decode(greedy(model, p, n_new, rep))) for name, rep in conditions.items()}}
            for p in prompts]
