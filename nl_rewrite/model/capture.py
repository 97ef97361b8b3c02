"""Activations at named hooks, computing no more of the model than they need.

TransformerLens's ``run_with_cache(stop_at_layer=L)`` stops at block L's input, so a site in the last block still runs
the final norm and the unembedding: the largest matmul of a small model (tiny-smollm2: 64 × 49,152 per token, most
of its forward), and a tenth of SmolLM2-135M's. :func:`capture` stops right after the last hook it needs fires, in
any block.
"""

from __future__ import annotations

from typing import Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from nl_rewrite.placement import module_device


class _AllCaptured(Exception):
    """Raised by the hook that completes a capture: nothing after it is computed."""


def capture(model, tokens: Int[Tensor, "batch pos"], hooks: Sequence[str]) -> dict[str, Tensor]:
    """The activations at ``hooks`` (bridge hook names, as :func:`nl_rewrite.model.sites.resolve` gives them) on
    ``tokens``, moved to the model's device, detached; the forward pass (without gradients) ends as soon as the last
    of them is computed."""
    wanted, found = set(hooks), {}

    def keeper(name: str):
        def keep(tensor: Tensor, hook) -> Tensor:
            found[name] = tensor.detach()
            if wanted <= found.keys():
                raise _AllCaptured
            return tensor
        return keep

    try:
        with torch.no_grad():
            model.run_with_hooks(tokens.to(module_device(model)),
                                 fwd_hooks=[(name, keeper(name)) for name in wanted])
    except _AllCaptured:
        pass
    missing = sorted(wanted - found.keys())
    if missing:
        raise RuntimeError(f"hooks {missing} never fired in the forward pass; name them as "
                           "nl_rewrite.model.sites.resolve does")
    return found
