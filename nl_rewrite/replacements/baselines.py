"""Reference replacements that need no learned coder: zero, mean and identity."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from nl_rewrite.data.windows import TokenWindows
from nl_rewrite.errors import ShapeMismatchError
from nl_rewrite.model.capture import capture
from nl_rewrite.model.sites import Site, resolve
from nl_rewrite.replacements.base import BatchInfo, Replacement


class ZeroReplacement(Replacement):
    """Zero ablation: the site's activation is set to 0."""

    name = "zero"

    def forward(self, x: Float[Tensor, "batch pos d"], batch: BatchInfo) -> Float[Tensor, "batch pos d"]:
        return torch.zeros_like(x)


class IdentityReplacement(Replacement):
    """Returns the activation unchanged: the hooks themselves must not move the output (a sanity check)."""

    name = "identity"

    def forward(self, x: Float[Tensor, "batch pos d"], batch: BatchInfo) -> Float[Tensor, "batch pos d"]:
        return x


class MeanReplacement(Replacement):
    """Mean ablation: every position gets the site's mean activation over a corpus sample."""

    name = "mean"

    def __init__(self, site: "str | Site", mean: Float[Tensor, " d"], name: str | None = None):
        super().__init__(site, name=name)
        if mean.ndim != 1:
            raise ShapeMismatchError(f"mean must be a vector [d], got shape {tuple(mean.shape)}")
        self.register_buffer("mean", mean.detach().float().clone())

    def forward(self, x: Float[Tensor, "batch pos d"], batch: BatchInfo) -> Float[Tensor, "batch pos d"]:
        if x.shape[-1] != self.mean.shape[0]:
            raise ShapeMismatchError(f"mean has width {self.mean.shape[0]} but site {self.write_site} has {x.shape[-1]}")
        return self.mean.to(device=x.device, dtype=x.dtype).expand_as(x)

    @classmethod
    @torch.no_grad()
    def fit(cls, model, windows: TokenWindows, site: "str | Site", batch_size: int = 8, name: str | None = None) -> "MeanReplacement":
        """Average the activation at ``site`` over ``windows``, running the model only up to that layer."""
        site = Site.parse(site)
        hook = resolve(model, site)
        total, count = None, 0
        for _, tokens in tqdm(windows.batches(batch_size), total=-(-len(windows) // batch_size), desc=f"mean of {site}"):
            act = capture(model, tokens, [hook])[hook].float()
            total = act.sum((0, 1)) if total is None else total + act.sum((0, 1))
            count += act.shape[0] * act.shape[1]
        return cls(site, total / count, name=name)
