"""The trained simulator's network: the first layers of a small causal LM, read at every window token by a head.

Input (Transluce's format, after TransluceAI/observatory's ``FinetunedSimulator``)::

    ## Description: <explanation>\n\n## Input:<token 1><token 2>...

The explanation and separator form a *prefix* whose KV cache is computed once per latent and shared by all that
latent's windows. Each window token string is encoded on its own (so a token's prediction is read exactly at its last
piece, whatever tokenizer the subject model used). The head maps the hidden state there to

- ``bins``: logits over 10 activation bins (0–9 of the latent's maximum); the score is the expected bin, or
- ``regression``: the score directly (trained towards 9 × activation / maximum).

Either way scores live on the prompted simulators' 0–9 scale, and are calibrated per latent the same way.

Truncation, not LoRA over the whole stack: the cost of simulating is one pass per (latent, window), so the
number of layers sets the throughput (measured on this CPU, 64 windows × 32 tokens after a 40-token prefix:
2 layers 9.8k predictions/s, 4 layers 5.5k/s, 8 layers 2.8k/s, all 30 layers 0.66k/s). The kept layers, the
final norm and the head are trained; the token embeddings stay frozen (tied to the LM head, and most of the
parameters).
"""

# no `from __future__ import annotations`: TrainSimulatorConfig inherits NetConfig, and simple_parsing resolves the
# inherited `head: HeadKind` annotation outside this module, so it must be the Literal itself, not a string

import copy
import inspect
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from nl_rewrite.llm.embedded import returned_cache

HeadKind = Literal["bins", "regression"]
N_BINS = 10
PROMPT = "## Description: {explanation}\n\n## Input:"
MAX_EXPLANATION_CHARS = 1000
"""Longer explanations are cut: the prefix should stay short next to the 32-token windows it is shared by."""


@dataclass(frozen=True)
class NetConfig:
    base_model: str = "smollm2-135m"
    """model whose first layers the simulator keeps (embedded name, HF dir or .gguf)"""
    n_layers: int = 4
    """transformer layers kept (fewer: faster, more: reads explanations better)"""
    head: HeadKind = "bins"
    """bins: 10-way distribution, score = expected bin; regression: the score directly"""

    def __post_init__(self) -> None:
        if self.n_layers < 1:
            raise ValueError(f"n_layers must be at least 1, got {self.n_layers}")
        if self.head not in ("bins", "regression"):
            raise ValueError(f"head must be bins or regression, got {self.head!r}")


class InputEncoder:
    """Token ids of prompts and windows, with each window token's read position."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.fallback_id = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else tokenizer.eos_token_id or 0
        self._pieces: dict[str, list[int]] = {}

    def prefix(self, explanation: str) -> list[int]:
        text = PROMPT.format(explanation=explanation[:MAX_EXPLANATION_CHARS])
        return list(self.tokenizer(text, add_special_tokens=True).input_ids)

    def pieces(self, token: str) -> list[int]:
        """The ids of one window token (a token that encodes to nothing reads as the unknown token)."""
        if token not in self._pieces:
            ids = list(self.tokenizer(token, add_special_tokens=False).input_ids)
            self._pieces[token] = ids or [self.fallback_id]
        return self._pieces[token]

    def window(self, tokens: Sequence[str]) -> tuple[list[int], list[int]]:
        """(ids, reads): the window's ids and, per token, the index of its last piece."""
        ids: list[int] = []
        reads = []
        for token in tokens:
            ids += self.pieces(token)
            reads.append(len(ids) - 1)
        return ids, reads


class SimulatorNet(nn.Module):
    """Truncated LM backbone + head (see the module docstring)."""

    def __init__(self, backbone: nn.Module, cfg: NetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        self.head = nn.Linear(hidden, N_BINS if cfg.head == "bins" else 1)
        nn.init.zeros_(self.head.weight)  # start from a constant prediction: training moves it where it helps
        nn.init.zeros_(self.head.bias)
        self.backbone.embed_tokens.requires_grad_(False)
        params = inspect.signature(backbone.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"  # transformers 5 renamed it

    @classmethod
    def from_base(cls, cfg: NetConfig) -> tuple["SimulatorNet", object]:
        """A new net on ``cfg.base_model``'s first ``n_layers`` layers, and the base's tokenizer."""
        from nl_rewrite.model.loading import load_hf

        hf, tokenizer = load_hf(cfg.base_model)
        return cls(truncated(hf, cfg.n_layers), cfg), tokenizer

    def trainable_state(self) -> dict[str, Tensor]:
        """What training changes (and a checkpoint stores): everything but the frozen embeddings."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.embed_tokens.")}

    def forward(self, ids: Int[Tensor, "b pos"], prefix_cache: object = None) -> Float[Tensor, "b pos out"]:
        extra = {self._cache_arg: prefix_cache, "use_cache": True} if prefix_cache is not None else {"use_cache": False}
        return self.head(self.backbone(input_ids=ids, **extra).last_hidden_state)

    def prefix_cache(self, ids: list[int]) -> object:
        """The KV cache of one prefix, to continue from (copy it per use: a forward pass extends it)."""
        return returned_cache(self.backbone(input_ids=torch.tensor([ids], device=self.device), use_cache=True))

    def scores(self, out: Float[Tensor, "... out"]) -> Float[Tensor, "..."]:
        """Head outputs → scores on the 0–9 scale."""
        if self.cfg.head == "regression":
            return out[..., 0]
        return out.float().softmax(-1) @ torch.arange(N_BINS, dtype=torch.float32, device=out.device)

    def loss(self, out: Float[Tensor, "n out"], target: Float[Tensor, " n"]) -> Float[Tensor, ""]:
        """``target``: activation / the latent's maximum, in [0, 1]."""
        if self.cfg.head == "regression":
            return nn.functional.mse_loss(out[:, 0], (N_BINS - 1) * target)
        bins = ((N_BINS - 1) * target).round().clamp(0, N_BINS - 1).long()
        return nn.functional.cross_entropy(out, bins)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device


def truncated(hf, n_layers: int) -> nn.Module:
    """The decoder of a HF causal LM with only its first ``n_layers`` layers (its final norm kept)."""
    backbone = hf.model
    total = len(backbone.layers)
    if n_layers > total:
        raise ValueError(f"n_layers={n_layers} but the base model has only {total} layers")
    backbone.layers = backbone.layers[:n_layers]
    backbone.config.num_hidden_layers = n_layers
    if getattr(backbone.config, "layer_types", None):
        backbone.config.layer_types = backbone.config.layer_types[:n_layers]
    return backbone


def repeated_cache(cache: object, n: int) -> object:
    """A copy of a one-row prefix cache repeated ``n`` times along the batch."""
    out = copy.deepcopy(cache)
    if n > 1:
        out.batch_repeat_interleave(n)  # type: ignore[attr-defined]
    return out
