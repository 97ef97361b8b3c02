"""Per-token CE and KL(clean || patched) from the model's last hidden state, unembedded a vocabulary chunk at a time.

A condition's KL needs only two numbers per token from its logits ``z = h·Wᵀ + b``: their log-normaliser
``logsumexp z`` and, against the clean probabilities ``p``, the weighted sum ``Σ p·z``. The second is linear in
``h``: ``Σ p·z = h · (Σ p·W) + Σ p·b``, so with ``w̄ = Σ p·W`` computed once per clean batch,

    KL = Σ p·(z_c − z) + (logsumexp z − logsumexp z_c)·Σ p = (h_c − h)·w̄ + (logsumexp z − logsumexp z_c)·Σ p.

Each condition then costs the unembedding's matrix product and one log-normaliser per token, computed chunk by
chunk so that a batch's logits are never all in memory: no vocabulary-sized tensor is written or read per condition
(benchmarks/evaluate_throughput.py measures the gain). The difference ``h_c − h`` of two close states is exact, so
the KL keeps float32's precision where it is small, as the logit difference did before.

The Evaluator gets ``h`` by running the model with its unembedding deferred (:func:`unembedding_deferred`), once it
has checked on two windows that :class:`Unembedding` reproduces the model's logits; a model whose logits are not one
linear map of one hidden state (e.g. soft-capped) is scored from its logits, with :data:`LOGITS` as the readout.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from nl_rewrite.errors import ShapeMismatchError

CHUNK = 2048
"""Vocabulary entries unembedded at a time: on this project's 2-core CPU, chunks of 1-4k ran the 49k-entry
unembedding and its log-normaliser 1.6-1.7× faster than one product (scripts in docs/results.md)."""


@dataclass(frozen=True)
class Unembedding:
    """``logits = h · weightᵀ + bias``; ``weight`` None means ``h`` are the logits already (:data:`LOGITS`)."""

    weight: Float[Tensor, "vocab d"] | None
    bias: Float[Tensor, " vocab"] | None = None
    chunk: int = CHUNK

    @classmethod
    def of(cls, model) -> "Unembedding":
        """The model's unembedding (TransformerLens's ``W_U [d, vocab]`` and ``b_U``), without copying it."""
        return cls(model.W_U.T, getattr(model, "b_U", None))

    def _chunks(self, width: int) -> Iterator[slice]:
        vocab = width if self.weight is None else self.weight.shape[0]
        return (slice(start, min(start + self.chunk, vocab)) for start in range(0, vocab, self.chunk))

    def logits(self, hidden: Float[Tensor, "... d"], part: slice = slice(None)) -> Float[Tensor, "... part"]:
        """The logits of the vocabulary entries ``part``, in float32 (computed in the model's dtype, as its own)."""
        if self.weight is None:
            return hidden[..., part].float()
        bias = None if self.bias is None else self.bias[part]
        return F.linear(hidden.to(self.weight.dtype), self.weight[part], bias).float()

    def log_normaliser(self, hidden: Float[Tensor, "... d"]) -> Float[Tensor, "..."]:
        """``logsumexp`` of every logit, a chunk at a time, in float64: a running maximum and the sum of exponentials
        below it, added at the end. (Held in float32, a log-normaliser of 40 nats would round to 4e-6, the size of a
        small KL; a running ``logaddexp`` of the chunks' log-normalisers would round once per chunk.)"""
        top = hidden.new_full(hidden.shape[:-1], -torch.inf, dtype=torch.float32)
        total = torch.zeros_like(top)
        for part in self._chunks(hidden.shape[-1]):
            logits = self.logits(hidden, part)
            new_top = torch.maximum(top, logits.amax(-1))
            total = total * torch.exp(top - new_top) + torch.exp(logits - new_top[..., None]).sum(-1)
            top = new_top
        return top.double() + torch.log(total.double())

    def target_logits(self, hidden: Float[Tensor, "... d"], targets: Int[Tensor, "..."]) -> Float[Tensor, "..."]:
        """Each token's logit of its own target."""
        if self.weight is None:
            return hidden.float().gather(-1, targets[..., None]).squeeze(-1)
        logits = (hidden.float() * self.weight[targets].float()).sum(-1)
        return logits if self.bias is None else logits + self.bias[targets].float()

    def expected_row(self, hidden: Float[Tensor, "... d"], log_normaliser: Float[Tensor, "..."]
                     ) -> tuple[Float[Tensor, "... d"], Float[Tensor, "..."]]:
        """``(Σ p·W, Σ p)`` under the softmax ``p`` of ``hidden``'s logits: the direction whose dot product with a
        hidden state is its logits' ``p``-weighted sum (minus the bias term, which cancels in a KL)."""
        if self.weight is None:
            probs = torch.exp(hidden.double() - log_normaliser[..., None]).float()
            return probs, probs.sum(-1)
        row = hidden.new_zeros(hidden.shape, dtype=torch.float32)
        mass = hidden.new_zeros(hidden.shape[:-1], dtype=torch.float32)
        for part in self._chunks(hidden.shape[-1]):
            probs = torch.exp(self.logits(hidden, part).double() - log_normaliser[..., None]).float()
            row += probs @ self.weight[part].float()
            mass += probs.sum(-1)
        return row, mass


LOGITS = Unembedding(weight=None)
"""The readout of a model scored from its own logits."""


@dataclass(frozen=True)
class CleanPrediction:
    """What every condition's KL on one batch is measured against, from the clean pass's ``hidden`` states: the
    log-normaliser of their logits (float64), ``Σ p·W`` (``expected_row``) and ``Σ p`` (``mass``, 1 up to rounding, kept so
    that a condition equal to the clean one scores a KL of exactly 0)."""

    hidden: Float[Tensor, "batch pos d"]
    expected_row: Float[Tensor, "batch pos d"]
    mass: Float[Tensor, "batch pos"]
    log_normaliser: Float[Tensor, "batch pos"]
    unembedding: Unembedding

    @classmethod
    def of(cls, hidden: Float[Tensor, "batch pos d"], unembedding: Unembedding = LOGITS) -> "CleanPrediction":
        log_normaliser = unembedding.log_normaliser(hidden)
        row, mass = unembedding.expected_row(hidden, log_normaliser)
        return cls(hidden, row, mass, log_normaliser, unembedding)


def token_ce_and_kl(hidden: Float[Tensor, "batch pos d"], clean: CleanPrediction, targets: Int[Tensor, "batch pos"]
                    ) -> tuple[Float[Tensor, "batch pos"], Float[Tensor, "batch pos"]]:
    """Per-token cross-entropy of ``targets`` and KL(clean || patched) of the hidden states ``hidden`` (logits when
    the readout is :data:`LOGITS`), in float32 whatever their dtype (see the module docstring)."""
    if hidden.shape != clean.hidden.shape:
        raise ShapeMismatchError(f"patched states {tuple(hidden.shape)} and clean states {tuple(clean.hidden.shape)} "
                                 "differ: score a condition on the clean pass's own batch and positions")
    unembedding = clean.unembedding
    log_normaliser = unembedding.log_normaliser(hidden)
    ce = (log_normaliser - unembedding.target_logits(hidden, targets)).float()
    # the dot product of a difference: exact where the two states are close, where a KL is small
    kl = (clean.hidden.float() - hidden.float()).mul_(clean.expected_row).sum(-1)
    return ce, (kl + ((log_normaliser - clean.log_normaliser) * clean.mass).float()).clamp_min(0.0)


@contextmanager
def unembedding_deferred(model) -> Iterator[None]:
    """Inside the block, ``model(tokens)`` returns the hidden states its unembedding would read, not logits."""
    unembed = model.unembed
    before = unembed.__dict__.get("forward")  # e.g. a wrapper someone else installed
    # an instance attribute shadows the class's forward (set through __dict__, as prefix.resumed_at does, because the
    # bridge's components forward attribute writes to the module they wrap)
    unembed.__dict__["forward"] = lambda hidden, *args, **kwargs: hidden
    try:
        yield
    finally:
        if before is None:
            unembed.__dict__.pop("forward", None)
        else:
            unembed.__dict__["forward"] = before


@torch.no_grad()
def unembedding_reproduces(model, tokens: Int[Tensor, "batch pos"]) -> bool:
    """Whether :class:`Unembedding` of the deferred hidden states gives ``model``'s own logits on ``tokens`` (to its
    dtype's rounding): a one-off check that the model's logits are that one linear map, with nothing after it."""
    if getattr(getattr(model, "cfg", None), "output_logits_soft_cap", -1) > 0:
        return False
    try:
        logits = model(tokens)
        with unembedding_deferred(model):
            hidden = model(tokens)
        ours = Unembedding.of(model).logits(hidden)
    except Exception:  # noqa: BLE001 - any failure only means "score this model from its logits"
        return False
    tolerance = max(1e-5, 4 * torch.finfo(logits.dtype).eps)
    return ours.shape == logits.shape and bool(torch.allclose(ours, logits.float(), rtol=tolerance, atol=1e-4))
