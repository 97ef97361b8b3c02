"""The trained simulator as a simulator like the others: ``identity``, ``stats``, ``simulate_many``.

One forward pass per (latent, window) reads every token of the window: the explanation's prefix is computed once
per latent and its KV cache repeated over a batch of that latent's windows (``reuse_prefix=False`` runs prefix and
window together instead: the equality check and the benchmark's baseline). ``simulate_windows`` reads every
latent of a dict of explanations on the same windows, like the lexical reader, with a progress bar.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from nl_rewrite.interp.simulate import SimulationItem, SimulatorStats
from nl_rewrite.llm.embedded import right_padded
from nl_rewrite.trained.net import InputEncoder, SimulatorNet, repeated_cache


@dataclass
class TrainedSimulator:
    net: SimulatorNet
    encoder: InputEncoder
    digest: str
    """Names the weights (the checkpoint's training key and step): part of ``identity``, which keys stored scores."""
    batch_size: int = 64
    """windows per forward pass"""
    reuse_prefix: bool = True
    progress: bool = False
    stats: SimulatorStats = field(default_factory=SimulatorStats)
    heldout: tuple[str, tuple[int, ...]] = ("", ())
    """(windows fingerprint of the explain cache it was trained on, the windows of its held-out documents there):
    windows it never trained on, for calibrating it on that cache."""

    @property
    def identity(self) -> str:
        return f"trained|{self.digest}"

    def simulate_many(self, items: Sequence[SimulationItem]) -> list[Float[Tensor, " pos"]]:
        out: list[Tensor | None] = [None] * len(items)
        by_explanation: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            by_explanation.setdefault(item.explanation, []).append(i)
        for explanation, indices in by_explanation.items():
            for i, scores in zip(indices, self.simulate_latent(explanation, [items[i].tokens for i in indices])):
                out[i] = scores
        return out  # type: ignore[return-value]

    def simulate_windows(self, explanations: Mapping[int, str], windows: Sequence[Sequence[str]]
                         ) -> dict[int, Float[Tensor, "n pos"]]:
        """Every latent on every window (equal lengths): latent → scores [window, pos]."""
        from tqdm import tqdm

        if len({len(w) for w in windows}) > 1:
            raise ValueError(f"windows of different lengths {sorted({len(w) for w in windows})}: read them in groups "
                             "of one length, or use simulate_many")

        return {latent: torch.stack(self.simulate_latent(text, windows))
                for latent, text in tqdm(explanations.items(), desc="trained simulator", unit="latent",
                                         disable=not self.progress)}

    @torch.inference_mode()
    def simulate_latent(self, explanation: str, windows: Sequence[Sequence[str]]) -> list[Float[Tensor, " pos"]]:
        """One latent's scores on each window (0–9 scale)."""
        self.net.eval()
        prefix = self.encoder.prefix(explanation)
        cache = self.net.prefix_cache(prefix) if self.reuse_prefix else None
        out = []
        for start in range(0, len(windows), self.batch_size):
            encoded = [self.encoder.window(w) for w in windows[start:start + self.batch_size]]
            out += self._batch(prefix, cache, encoded)
        self.stats.windows += len(windows)
        self.stats.predictions += sum(len(w) for w in windows)
        self.stats.requests += -(-len(windows) // self.batch_size)
        return out

    def _batch(self, prefix: list[int], cache: object, encoded: list[tuple[list[int], list[int]]]
               ) -> list[Float[Tensor, " pos"]]:
        shift = 0 if self.reuse_prefix else len(prefix)
        rows = [ids if self.reuse_prefix else prefix + ids for ids, _ in encoded]
        ids = right_padded(rows, self.encoder.fallback_id, self.net.device)
        past = repeated_cache(cache, len(rows)) if cache is not None else None
        scores = self.net.scores(self.net(ids, past)).cpu()
        return [scores[b, [shift + r for r in reads]] for b, (_, reads) in enumerate(encoded)]
