"""Training data of the trained simulator, from the ``explain`` split's latent cache only.

- **Documents**: the explain windows' documents are split (seeded) into *training* and *held-out* documents; a
  window belongs to its document's side. Lexical explanations are written from the training documents' windows
  only, so nothing a held-out window shows leaks into an explanation.
- **Latents**: latents whose lexical explanation names at least one token and that fire on a training window are
  split (seeded) into *training* and *held-out* latents. Training refuses a held-out latent (:class:`LeakError`).
- **Balance rule**: for each latent, up to ``windows_per_latent`` windows where it fires (drawn at random among
  that side's windows where it fires) and the *same number* of windows where it never fires (at random among the
  rest). Training items use training latents on training documents; validation items held-out latents on held-out
  documents.
- **Explanation kinds**: every item is marked ``lexical`` or ``llm``. LLM explanations (a JSONL from
  ``nl-rewrite explain`` or a run) add items for the training latents they cover.
- **Targets**: activation / the latent's maximum on the training documents, clamped to [0, 1].

The eval split is never read here.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from nl_rewrite.errors import NLRewriteError
from nl_rewrite.interp.lexical import DEFAULT_BUDGET, lexical_explanations, parse_explanation
from nl_rewrite.latents.cache import LatentCache

ExplanationKind = Literal["lexical", "llm"]


class LeakError(NLRewriteError, ValueError):
    """A held-out latent or document would be trained on."""


@dataclass(frozen=True)
class DataConfig:
    budget: int = DEFAULT_BUDGET
    """items per lexical explanation"""
    windows_per_latent: int = 4
    """windows where a latent fires per latent (and as many where it does not)"""
    heldout_latents: float = 0.1
    """fraction of explained latents held out for validation"""
    heldout_documents: float = 0.2
    """fraction of explain documents held out for validation"""
    seed: int = 0
    """seed of the splits and window draws (and, in training, of the head's start and the batch order)"""

    def __post_init__(self) -> None:
        if not (0 < self.heldout_latents < 1 and 0 < self.heldout_documents < 1):
            raise ValueError("heldout_latents and heldout_documents are fractions in (0, 1)")
        if self.budget < 1 or self.windows_per_latent < 1:
            raise ValueError("budget and windows_per_latent must be at least 1")


@dataclass(frozen=True)
class Item:
    """One (latent, window) with the explanation the simulator reads."""

    latent: int
    window: int
    kind: ExplanationKind
    explanation: str


@dataclass
class SimulatorData:
    train_items: list[Item]
    val_items: list[Item]
    train_latents: list[int]
    val_latents: list[int]
    train_windows: list[int]
    val_windows: list[int]
    scale: dict[int, float]
    """latent → its maximum activation on the training documents (targets are divided by it)."""
    lexical: dict[int, str]
    """Every latent's lexical explanation, written from the training documents."""

    def __post_init__(self) -> None:
        check_disjoint("latent", self.train_latents, self.val_latents)
        check_disjoint("window", self.train_windows, self.val_windows)
        trained_on = {i.latent for i in self.train_items}
        check_disjoint("latent", trained_on, self.val_latents)


def check_disjoint(what: str, train: Sequence[int] | set[int], heldout: Sequence[int]) -> None:
    leaked = sorted(set(train) & set(heldout))
    if leaked:
        raise LeakError(f"{len(leaked)} held-out {what}(s) would be trained on (first: {leaked[:5]}); held-out "
                        f"{what}s are for validation only: train on other {what}s or change the split's seed")


def split_documents(doc_ids: Sequence[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training window ids, held-out window ids): whole documents on each side."""
    docs = sorted(set(doc_ids))
    if len(docs) < 2:
        raise ValueError(f"the explain windows come from {len(docs)} document(s); a document split needs 2")
    random.Random(seed).shuffle(docs)
    heldout = set(docs[:max(1, round(fraction * len(docs)))])
    return ([w for w, d in enumerate(doc_ids) if d not in heldout], [w for w, d in enumerate(doc_ids) if d in heldout])


@dataclass(frozen=True)
class Firing:
    """Where one latent fires in the cache: its windows, and the value at each of its (window, position) rows."""

    windows: set[int]
    window_ids: Tensor
    values: Float[Tensor, " m"]

    @classmethod
    def of(cls, cache: LatentCache, latent: int) -> "Firing":
        window_ids, _, values = cache.activations(latent)
        return cls(set(window_ids.tolist()), window_ids, values)

    def max_on(self, windows: set[int]) -> float:
        keep = torch.tensor([w in windows for w in self.window_ids.tolist()], dtype=torch.bool)
        return float(self.values[keep].max()) if keep.any() else 0.0


def balanced_windows(fires: set[int], side: Sequence[int], n: int, rng: random.Random) -> list[int]:
    """Up to ``n`` of ``side``'s windows where the latent fires and as many where it does not (the balance rule)."""
    active = sorted(fires & set(side))
    chosen = rng.sample(active, min(n, len(active)))
    silent = [w for w in side if w not in fires]
    return chosen + rng.sample(silent, min(len(chosen), len(silent)))


def build_data(cache: LatentCache, doc_ids: Sequence[str], cfg: DataConfig,
               llm_explanations: dict[int, str] | None = None, train_latents: Sequence[int] | None = None
               ) -> SimulatorData:
    """Split, explain and sample (see the module docstring). ``train_latents`` restricts training to those."""
    if len(doc_ids) != len(cache):
        raise ValueError(f"{len(doc_ids)} document ids for a cache of {len(cache)} windows")
    train_windows, val_windows = split_documents(doc_ids, cfg.heldout_documents, cfg.seed)
    lexical = lexical_explanations(cache, train_windows, cfg.budget)
    rng = random.Random(cfg.seed)
    firing = {lat: Firing.of(cache, lat) for lat in range(cache.n_latents)}
    train_set = set(train_windows)
    explained = [lat for lat, text in lexical.items()
                 if not parse_explanation(text).empty]
    explained = [lat for lat in explained if firing[lat].windows & train_set]
    shuffled = rng.sample(explained, len(explained))
    n_val = max(1, round(cfg.heldout_latents * len(shuffled)))
    val_latents, default_train = sorted(shuffled[:n_val]), sorted(shuffled[n_val:])
    chosen = default_train if train_latents is None else sorted(train_latents)
    check_disjoint("latent", chosen, val_latents)
    unexplained = sorted(set(chosen) - set(explained))
    if unexplained:
        raise ValueError(f"{len(unexplained)} training latent(s) have no lexical explanation or never fire on a training "
                         f"document (first: {unexplained[:5]}); choose among latents that do")
    scale = {lat: firing[lat].max_on(train_set) for lat in explained}
    train_items = [Item(lat, w, "lexical", lexical[lat])
                   for lat in chosen for w in balanced_windows(firing[lat].windows, train_windows, cfg.windows_per_latent, rng)]
    for lat, text in sorted((llm_explanations or {}).items()):
        if lat in scale and lat not in val_latents and lat in chosen:
            train_items += [Item(lat, w, "llm", text)
                            for w in balanced_windows(firing[lat].windows, train_windows, cfg.windows_per_latent, rng)]
    if not train_items:
        raise ValueError(f"no training items: {len(explained)} latent(s) are explained and fire on the training "
                         "documents; cache more explain windows (--explain-windows) or use a wider coder")
    val_items = [Item(lat, w, "lexical", lexical[lat])
                 for lat in val_latents for w in balanced_windows(firing[lat].windows, val_windows, cfg.windows_per_latent, rng)]
    return SimulatorData(train_items, val_items, chosen, val_latents, train_windows, val_windows, scale, lexical)


def targets(cache: LatentCache, item: Item, scale: float, length: int) -> Float[Tensor, " pos"]:
    """The item's true activations / ``scale``, clamped to [0, 1]."""
    dense = cache.dense_window(item.window)[:, item.latent].float()[:length]
    return (dense / scale).clamp(0, 1) if scale > 0 else torch.zeros_like(dense)
