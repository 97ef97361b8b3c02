"""The oracle ladder: references for how good a simulator would have to be, not explanations.

Each oracle overwrites its chosen latents with a function of their *true* activations (the transcoder's
post-TopK values), then re-applies TopK, decodes and adds the skip path, exactly like a simulator condition:

- ``true``: the true activations themselves. Equals the transcoder (a check of the patching path).
- ``binary``: the true firing pattern, at the latent's mean active value (from explain-split statistics).
- ``noisy``: ``relu(true + σ_j·ε)`` with ε standard normal, drawn per (window, position, latent) from a
  generator seeded by the window id, so batching cannot change the draw. ``σ_j = c · sd_j`` where ``sd_j`` is
  the latent's activation standard deviation and ``c`` is set by :func:`noise_multiplier` to reach a target
  Pearson correlation with the true activations.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor

from nl_rewrite.coders.sparse_coder import SparseCoder
from nl_rewrite.replacements.base import BatchInfo
from nl_rewrite.replacements.coders import CoderReplacement
from nl_rewrite.correlation import ColumnPearson

ORACLE_MODES = ("true", "binary", "noisy")


class OracleReplacement(CoderReplacement):
    """See the module docstring. ``latents``: the overwritten latent ids (None: all of them)."""

    def __init__(self, coder: SparseCoder, mode: str, latents: list[int] | None = None,
                 mean_active: Float[Tensor, " n_latents"] | None = None,
                 noise_sd: Float[Tensor, " n_latents"] | None = None, seed: int = 0, name: str = "oracle"):
        super().__init__(coder, name)
        if mode not in ORACLE_MODES:
            raise ValueError(f"unknown oracle mode {mode!r}; valid: {', '.join(ORACLE_MODES)}")
        needs = {"binary": ("mean_active", mean_active), "noisy": ("noise_sd", noise_sd)}.get(mode)
        if needs is not None and needs[1] is None:
            raise ValueError(f"a {mode} oracle needs {needs[0]} (one value per latent)")
        self.mode, self.seed = mode, seed
        ids = torch.arange(coder.cfg.n_latents) if latents is None else torch.tensor(sorted(latents), dtype=torch.long)
        self.register_buffer("ids", ids, persistent=False)
        n = coder.cfg.n_latents
        self.register_buffer("mean_active", _per_latent(mean_active, n, "mean_active"), persistent=False)
        self.register_buffer("noise_sd", _per_latent(noise_sd, n, "noise_sd"), persistent=False)

    def true_values(self, x: Float[Tensor, "batch pos d_in"]) -> Float[Tensor, "batch pos m"]:
        """The transcoder's post-TopK activations of the chosen latents (0 where not in the top k)."""
        return self.coder.encode(x).dense(self.coder.cfg.n_latents)[..., self.ids]

    def degrade(self, true: Float[Tensor, "batch pos m"], window_ids: Tensor) -> Float[Tensor, "batch pos m"]:
        """What this oracle reports, given the true values of the chosen latents on windows ``window_ids``."""
        if self.mode == "true":
            return true
        if self.mode == "binary":
            return (true > 0).to(true.dtype) * self.mean_active[self.ids].to(true.device)
        noise = torch.stack([torch.randn(true.shape[1:], generator=self._generator(int(w))) for w in window_ids])
        return torch.relu(true + noise.to(true) * self.noise_sd[self.ids].to(true.device))

    def _generator(self, window_id: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + window_id)

    @torch.no_grad()
    def forward(self, x: Float[Tensor, "batch pos d_in"], batch: BatchInfo) -> Float[Tensor, "batch pos d_out"]:
        x = self._input(x)
        values = self.degrade(self.true_values(x), batch.window_ids)
        return self.coder(x, overwrite_ids=self.ids, overwrite_values=values, retopk=True)


def _per_latent(values: Tensor | None, n: int, what: str) -> Tensor:
    if values is None:
        return torch.zeros(n)
    values = torch.as_tensor(values, dtype=torch.float32)
    if values.shape != (n,):
        raise ValueError(f"{what} must have one value per latent ({n}), got shape {tuple(values.shape)}")
    return torch.nan_to_num(values, nan=0.0)


MIN_FIRES = 5
"""Latents firing fewer times than this in a sample have too noisy a correlation to average."""


def mean_pearson(pred: Float[Tensor, "n m"], true: Float[Tensor, "n m"], min_fires: int = MIN_FIRES) -> float:
    """Mean over columns (latents firing at least ``min_fires`` times) of the Pearson r of pred and true."""
    return PearsonTarget(true, min_fires).mean_r(pred)


class PearsonTarget:
    """The true side of :func:`mean_pearson`, its columns (latents firing often enough) chosen and centred once, for
    scoring many predictions against one truth (the noise bisection scores 18 per target)."""

    def __init__(self, true: Float[Tensor, "n m"], min_fires: int = MIN_FIRES) -> None:
        self.keep = (true > 0).sum(0) >= min_fires
        self.pearson = ColumnPearson(true[:, self.keep])

    def mean_r(self, pred: Float[Tensor, "n m"]) -> float:
        r = self.pearson(pred[:, self.keep])
        r = r[torch.isfinite(r)]
        return float(r.mean()) if r.numel() else math.nan


def noisy(true: Float[Tensor, "n m"], sd: Float[Tensor, " m"], multiplier: float, seed: int) -> Tensor:
    return with_noise(true, sd, multiplier, standard_noise(true.shape, seed))


def standard_noise(shape: torch.Size, seed: int) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def with_noise(true: Float[Tensor, "n m"], sd: Float[Tensor, " m"], multiplier: float, noise: Float[Tensor, "n m"]
               ) -> Tensor:
    return torch.relu(true + multiplier * sd * noise)


def noise_multiplier(true: Float[Tensor, "n m"], target_r: float, seed: int = 0, iters: int = 18) -> float:
    """The ``c`` for which ``relu(true + c·sd·ε)`` has mean per-latent Pearson ``target_r`` with ``true``
    (bisection on a log scale; r falls monotonically as c grows)."""
    if not 0 < target_r < 1:
        raise ValueError(f"target correlation must lie in (0, 1), got {target_r}")
    true = true[:, (true > 0).sum(0) >= MIN_FIRES]  # the latents mean_pearson scores; the rest only cost time
    sd = true.std(0)
    seed = seed * 1_000_003 + 977  # a stream of its own: never the one that drew ``true`` in a synthetic test
    noise = standard_noise(true.shape, seed)  # the same draw at every step (as noisy() would make it), drawn once
    target = PearsonTarget(true)
    lo, hi = 1e-2, 1e2
    for _ in range(iters):
        mid = math.sqrt(lo * hi)
        if target.mean_r(with_noise(true, sd, mid, noise)) > target_r:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)
