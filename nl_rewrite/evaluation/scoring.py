"""Per-token CE and KL(clean || patched) from the model's last hidden state, unembedded a vocabulary chunk at a time.

With ``Δz = z − z_c`` the change of every logit, ``p`` the clean probabilities, any shift ``μ`` (the KL is blind to
it; the code takes ``Σ p·Δz``, so that no two large terms cancel where a KL is small) and
``A = Σ p·expm1(Δz − μ)``,

    KL = Σ p·(log p − log q) = log1p A − Σ p·(Δz − μ),    CE = logsumexp z_c + μ + log1p A − z_target,

and the logits are linear in the hidden state ``h``, so ``Δz = (h − h_c)·Wᵀ``: a product of a *difference* of two
close states, which stays exact where a KL is small, where logits of 20-40 nats held in float32 would round it away
(``μ = (h − h_c)·Σ p·W`` needs no pass over the vocabulary). Each condition then costs the unembedding's product
and a few passes over one vocabulary chunk at a time: no vocabulary-sized tensor is written per condition
(benchmarks/evaluate_throughput.py measures the gain). Only the clean pass keeps one per batch, its probabilities.

The Evaluator gets ``h`` by running the model with its unembedding deferred (:func:`unembedding_deferred`), once it
has checked on two windows that :class:`LinearUnembedding` reproduces the model's logits; a model whose logits are
not one linear map of one hidden state (e.g. soft-capped) is scored by the same formulas from its logits
(:class:`Logits`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from nl_rewrite.errors import ShapeMismatchError
from nl_rewrite.model.surgery import forward_replaced

CHUNK = 2048
"""Vocabulary entries scored at a time (see benchmarks/evaluate_throughput.py's chunk sizes)."""


@runtime_checkable
class Readout(Protocol):
    """How a model's output becomes logits, a vocabulary chunk at a time; all results are float32."""

    def vocab(self, output: Tensor) -> int: ...

    def logits(self, output: Tensor, part: slice) -> Tensor:
        """The logits of the vocabulary entries ``part``."""

    def change(self, difference: Tensor, part: slice) -> Tensor:
        """The change of those logits when the output changes by ``difference``."""

    def target_logits(self, output: Tensor, targets: Tensor) -> Tensor:
        """Each position's logit of its own target."""

    def expected_row(self, probs: Tensor, chunk: int) -> Tensor:
        """The row whose dot product with an output's ``difference`` is ``Σ probs·change`` (bias aside)."""


@dataclass(frozen=True)
class LinearUnembedding:
    """``logits = h · weightᵀ + bias``, computed in float32 whatever the model's dtype (a bf16 model's hidden states
    are scored exactly, chunk by chunk, without a float32 copy of its whole unembedding)."""

    weight: Float[Tensor, "vocab d"]
    bias: Float[Tensor, " vocab"]

    @classmethod
    def of(cls, model) -> "LinearUnembedding":
        """The model's unembedding (TransformerLens's ``W_U [d, vocab]`` and ``b_U``), without copying it."""
        return cls(model.W_U.T, model.b_U)

    def vocab(self, output: Tensor) -> int:
        return self.weight.shape[0]

    def logits(self, output: Float[Tensor, "... d"], part: slice) -> Float[Tensor, "... part"]:
        return F.linear(output.float(), self.weight[part].float(), self.bias[part].float())

    def change(self, difference: Float[Tensor, "... d"], part: slice) -> Float[Tensor, "... part"]:
        return F.linear(difference, self.weight[part].float())  # the bias cancels

    def target_logits(self, output: Float[Tensor, "... d"], targets: Int[Tensor, "..."]) -> Float[Tensor, "..."]:
        return (output.float() * self.weight[targets].float()).sum(-1) + self.bias[targets].float()

    def expected_row(self, probs: Float[Tensor, "... vocab"], chunk: int) -> Float[Tensor, "... d"]:
        return sum(probs[..., part] @ self.weight[part].float() for part in chunks(self.weight.shape[0], chunk))


@dataclass(frozen=True)
class Logits:
    """The model's output is its logits."""

    def vocab(self, output: Tensor) -> int:
        return output.shape[-1]

    def logits(self, output: Float[Tensor, "... vocab"], part: slice) -> Float[Tensor, "... part"]:
        return output[..., part].float()

    def change(self, difference: Float[Tensor, "... vocab"], part: slice) -> Float[Tensor, "... part"]:
        return difference[..., part]

    def target_logits(self, output: Float[Tensor, "... vocab"], targets: Int[Tensor, "..."]) -> Float[Tensor, "..."]:
        return output.gather(-1, targets[..., None]).squeeze(-1).float()

    def expected_row(self, probs: Float[Tensor, "... vocab"], chunk: int) -> Float[Tensor, "... vocab"]:
        return probs


def chunks(vocab: int, size: int = CHUNK) -> Iterator[slice]:
    return (slice(start, min(start + size, vocab)) for start in range(0, vocab, size))


def all_logits(readout: Readout, output: Tensor, chunk: int = CHUNK) -> Tensor:
    """Every logit, in float32, by chunks: a bf16 model's unembedding is cast a chunk at a time, never whole."""
    return torch.cat([readout.logits(output, part) for part in chunks(readout.vocab(output), chunk)], dim=-1)


@dataclass(frozen=True)
class CleanPrediction:
    """What every condition on one batch is measured against, from the clean pass's ``output`` (hidden states or
    logits, as ``readout`` says): its probabilities and its logits' log-normaliser."""

    output: Float[Tensor, "batch pos width"]
    probs: Float[Tensor, "batch pos vocab"]
    expected_row: Float[Tensor, "batch pos width"]
    log_normaliser: Float[Tensor, "batch pos"]
    readout: Readout

    @classmethod
    def of(cls, output: Float[Tensor, "batch pos width"], readout: Readout = Logits(), chunk: int = CHUNK
           ) -> "CleanPrediction":
        logits = all_logits(readout, output, chunk)
        probs = torch.softmax(logits, dim=-1)
        return cls(output, probs, readout.expected_row(probs, chunk), torch.logsumexp(logits, dim=-1).double(), readout)


def token_ce_and_kl(output: Float[Tensor, "batch pos width"], clean: CleanPrediction,
                    targets: Int[Tensor, "batch pos"], chunk: int = CHUNK
                    ) -> tuple[Float[Tensor, "batch pos"], Float[Tensor, "batch pos"]]:
    """Per-token cross-entropy of ``targets`` and KL(clean || patched) of a patched ``output`` (see the module
    docstring), in float32 whatever the output's dtype; a condition equal to the clean one scores a KL of exactly 0."""
    if output.shape != clean.output.shape:
        raise ShapeMismatchError(f"patched outputs {tuple(output.shape)} and clean outputs {tuple(clean.output.shape)} "
                                 "differ: score a condition on the clean pass's own batch and positions")
    difference = output.float() - clean.output.float()
    # every logit's change less their p-weighted mean μ, which the KL does not see (a softmax ignores a shift): a
    # condition that shifts all logits alike would otherwise cancel two large terms
    mean = (difference * clean.expected_row).sum(-1, keepdim=True)
    excess, centred = _sums(difference, mean, clean, chunk, torch.float32)
    if not bool(torch.isfinite(excess).all()):  # rare: a logit gained over ~88 nats, past float32's exponential
        excess, centred = _sums(difference, mean, clean, chunk, torch.float64)
    log_normaliser = clean.log_normaliser + mean.squeeze(-1).double() + torch.log1p(excess)
    ce = log_normaliser - clean.readout.target_logits(output, targets)
    return ce.float(), (torch.log1p(excess) - centred).float().clamp_min(0.0)


def _sums(difference: Tensor, mean: Tensor, clean: CleanPrediction, chunk: int, dtype: torch.dtype
          ) -> tuple[Tensor, Tensor]:
    """``A = Σ p·expm1(Δz − μ)`` and ``Σ p·(Δz − μ)`` (0 but for rounding, which it carries into the KL exactly), each
    chunk in ``dtype``, summed in float64."""
    excess = torch.zeros(difference.shape[:-1], dtype=torch.float64, device=difference.device)
    centred = torch.zeros_like(excess)
    for part in chunks(clean.readout.vocab(difference), chunk):
        change = (clean.readout.change(difference, part) - mean).to(dtype)
        probs = clean.probs[..., part].to(dtype)
        excess += (probs * torch.expm1(change)).sum(-1)
        centred += (probs * change).sum(-1)
    return excess, centred


def unembedding_deferred(model):
    """Inside the block, ``model(tokens)`` returns the hidden states its unembedding would read, not logits."""
    return forward_replaced([model.unembed], lambda hidden, *args, **kwargs: hidden)


@torch.no_grad()
def unembedding_reproduces(model, tokens: Int[Tensor, "batch pos"]) -> bool:
    """Whether :class:`LinearUnembedding` of the deferred hidden states gives ``model``'s own logits on ``tokens``
    (to its dtype's rounding): a one-off check that the logits are that one linear map, with nothing after it."""
    try:
        logits = model(tokens)
        with unembedding_deferred(model):
            hidden = model(tokens)
        ours = all_logits(LinearUnembedding.of(model), hidden)
    except Exception:  # noqa: BLE001 - any failure only means "score this model from its logits"
        return False
    tolerance = max(1e-5, 4 * torch.finfo(logits.dtype).eps)
    return ours.shape == logits.shape and bool(torch.allclose(ours, logits.float(), rtol=tolerance, atol=1e-4))
