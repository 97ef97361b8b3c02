"""Replacements built from a SparseCoder: the coder itself, and the paper's two latent baselines.

- ``TranscoderReplacement``: writes ``mlp_out.L`` computed from ``mlp_in.L``.
- ``SAEReplacement``: writes its site with the SAE's reconstruction.
- ``ZeroLatentsReplacement``: skip path + ``b_dec`` only, no active latents (the paper's "no active latents").
- ``RandomLatentsReplacement``: each token gets k random latent ids carrying its true top-k values in shuffled
  order (the paper's "random active latents"), plus the skip path. Seeded per window, so the result does not
  depend on how windows are batched.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from nl_rewrite.coders.sparse_coder import SparseCoder, SparseLatents
from nl_rewrite.replacements.base import BatchInfo, Replacement


class CoderReplacement(Replacement):
    """A replacement that reads the coder's read site and writes its write site."""

    required_kind: str | None = None
    """Coder kind (``cfg.kind``) this replacement needs; None accepts any."""

    def __init__(self, coder: SparseCoder, name: str):
        if self.required_kind is not None and coder.cfg.kind != self.required_kind:
            raise ValueError(f"{type(self).__name__} needs a coder of kind {self.required_kind!r}, "
                             f"got {coder.cfg.kind!r}")
        super().__init__(write_site=coder.cfg.write_site, read_site=coder.cfg.read_site, name=name)
        self.coder = coder

    def _input(self, x: Tensor) -> Tensor:
        return x.to(self.coder.W_dec.dtype)


class ReconstructionReplacement(CoderReplacement):
    """The coder's own output (latents decoded, plus the skip path) in place of the site it writes."""

    @torch.no_grad()
    def forward(self, x: Float[Tensor, "batch pos d_in"], batch: BatchInfo) -> Float[Tensor, "batch pos d_out"]:
        return self.coder(self._input(x))


class TranscoderReplacement(ReconstructionReplacement):
    required_kind = "transcoder"

    def __init__(self, coder: SparseCoder, name: str = "transcoder"):
        super().__init__(coder, name)


class SAEReplacement(ReconstructionReplacement):
    """An SAE reads and writes one site, so its ``d_in`` and ``d_out`` are the same."""

    required_kind = "sae"

    def __init__(self, coder: SparseCoder, name: str = "sae"):
        super().__init__(coder, name)


class ZeroLatentsReplacement(CoderReplacement):
    """Every latent inactive: what remains is the skip path and the decoder bias."""

    def __init__(self, coder: SparseCoder, name: str = "zero_latents"):
        super().__init__(coder, name)

    @torch.no_grad()
    def forward(self, x: Float[Tensor, "batch pos d_in"], batch: BatchInfo) -> Float[Tensor, "batch pos d_out"]:
        x = self._input(x)
        return self.coder.skip(x) + self.coder.b_dec


class RandomLatentsReplacement(CoderReplacement):
    """k distinct random latents per token, carrying that token's true top-k values in a random order."""

    def __init__(self, coder: SparseCoder, seed: int = 0, name: str = "random_latents"):
        super().__init__(coder, name)
        self.seed = seed

    def _window_generator(self, window_id: int) -> torch.Generator:
        # one stream per (seed, window): batching and batch order cannot change the draw
        return torch.Generator().manual_seed(self.seed * 1_000_003 + int(window_id))

    def random_latents(self, true: SparseLatents, window_ids: Tensor) -> SparseLatents:
        n_latents = self.coder.cfg.n_latents
        values, indices = torch.empty_like(true.values), torch.empty_like(true.indices)
        for row, window_id in enumerate(window_ids.tolist()):
            gen = self._window_generator(window_id)
            row_values = true.values[row]  # [pos, k]
            noise = torch.rand(*row_values.shape[:-1], n_latents, generator=gen)
            indices[row] = noise.topk(row_values.shape[-1], dim=-1).indices  # k distinct uniform ids
            order = torch.rand(row_values.shape, generator=gen).argsort(dim=-1)
            values[row] = row_values.gather(-1, order.to(row_values.device))
        return SparseLatents(values, indices)

    @torch.no_grad()
    def forward(self, x: Float[Tensor, "batch pos d_in"], batch: BatchInfo) -> Float[Tensor, "batch pos d_out"]:
        x = self._input(x)
        if x.ndim != 3 or x.shape[0] != batch.window_ids.shape[0]:
            raise ValueError(f"{self.name}: expected [batch, pos, d] input with one window id per row, got "
                             f"{tuple(x.shape)} and {tuple(batch.window_ids.shape)} window ids")
        latents = self.random_latents(self.coder.encode(x), batch.window_ids)
        return self.coder.decode(latents) + self.coder.skip(x)
