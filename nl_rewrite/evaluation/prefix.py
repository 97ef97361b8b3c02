"""Reuse the clean pass's residual stream: a patched run starts at the first patched block.

A replacement at layer L cannot change anything the blocks before L compute, so once the clean pass has
stored the residual stream entering block L, every patched run can skip blocks 0..L-1. While
:func:`resumed_at` is active, each of those blocks returns the stored residual instead of running (the
last one's return value is what block L receives); embeddings, masks and rotary tables are still computed
by the model as usual, so block L sees exactly the inputs of a full run.

Works for any model whose blocks (``model.blocks``) take the residual as their first argument and return
it as a tensor, which is what TransformerBridge's BlockBridge does for Llama- and Gemma-style models.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from jaxtyping import Float, Int
from torch import Tensor

from nl_rewrite.errors import ShapeMismatchError
from nl_rewrite.model.surgery import forward_replaced
from nl_rewrite.placement import module_device


@contextmanager
def capture_block_inputs(model, layers: Iterable[int]) -> Iterator[dict[int, Tensor]]:
    """Inside the block, every forward pass stores the residual entering each block in ``layers``."""
    stored: dict[int, Tensor] = {}
    handles = []
    for layer in sorted(set(layers)):
        def pre_hook(module, args, kwargs, layer=layer):
            hidden = args[0] if args else kwargs.get("hidden_states")
            if hidden is not None:
                stored[layer] = hidden.detach()
        handles.append(model.blocks[layer].register_forward_pre_hook(pre_hook, with_kwargs=True))
    try:
        yield stored
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def resumed_at(model, layer: int, resid: Float[Tensor, "batch pos d_model"]) -> Iterator[None]:
    """Run ``model`` from block ``layer`` on, with ``resid`` (from the same tokens' clean pass) as its input."""
    skipped = list(model.blocks)[:layer]

    def stored_residual(hidden: Tensor, *args, **kwargs) -> Tensor:
        if hidden.shape != resid.shape:
            raise ShapeMismatchError(f"the stored residual for block {layer} has shape {tuple(resid.shape)}, "
                                     f"the run has {tuple(hidden.shape)}: resume only on the clean pass's tokens")
        return resid

    with forward_replaced(skipped, stored_residual):
        yield


def first_layer(sites: Iterable) -> int:
    """The earliest layer any of ``sites`` (objects with ``.layer``) touches: where a patched run must start."""
    return min(site.layer for site in sites)


@torch.no_grad()
def resume_reproduces(model, tokens: Int[Tensor, "batch pos"], layer: int, atol: float = 1e-4) -> bool:
    """Whether resuming at ``layer`` without any patch gives the clean logits on ``tokens``: a one-off check that
    this model's blocks follow the contract above (a model whose blocks return tuples would fail it)."""
    try:
        tokens = tokens.to(module_device(model))
        with capture_block_inputs(model, [layer]) as resid:
            clean = model(tokens)
        if layer not in resid:
            return False
        with resumed_at(model, layer, resid[layer]):
            resumed = model(tokens)
    except Exception:  # noqa: BLE001 - any failure only means "do not resume on this model"
        return False
    return isinstance(resumed, Tensor) and resumed.shape == clean.shape and bool(
        torch.allclose(resumed, clean, atol=atol, rtol=0))
