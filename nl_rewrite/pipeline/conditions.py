"""Build named baseline replacements ("zero", "mean", "transcoder", "sae", ...) for one layer's MLP or site.

Shared by ``nl-rewrite evaluate`` and ``nl-rewrite run`` so both spell conditions the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generic, Protocol, TypeVar

from nl_rewrite.data.windows import token_windows
from nl_rewrite.model.loading import model_name
from nl_rewrite.model.sites import Site
from nl_rewrite.replacements import IdentityReplacement, MeanReplacement, Replacement, ZeroReplacement
from nl_rewrite.replacements.plugin import is_plugin_spec, load_plugin
from nl_rewrite.coders.checkpoint import load_coder
from nl_rewrite.coders.sparse_coder import SparseCoder

CONDITIONS = ("zero", "mean", "identity", "transcoder", "zero_latents", "random_latents")
"""Names accepted by :func:`build_condition`; ``coder:PATH`` loads a checkpoint (transcoder or SAE) instead, and
``MODULE:FACTORY[:JSON]`` calls the user's factory (:mod:`nl_rewrite.replacements.plugin`). ``sae`` (an SAE's
reconstruction) is built too, for `nl-rewrite run --coder sae`, whose loader gives an SAE."""

MEAN_WINDOWS = 256
"""Train-split windows averaged for mean ablation (64 tokens each: ~16k tokens)."""


def build_condition(name: str, model, layer: int, coder: Callable[[], SparseCoder], seed: int = 0,
                    site: str | None = None) -> Replacement:
    """One replacement at ``site`` (default: MLP ``layer``'s output). ``coder`` is called only for coder-based
    conditions (it may train)."""
    from nl_rewrite.replacements.coders import (RandomLatentsReplacement, SAEReplacement, TranscoderReplacement,
                                                ZeroLatentsReplacement)

    site = site or f"mlp_out.{layer}"
    if name == "zero":
        return ZeroReplacement(site, name=ablation_name("zero", site))
    if name == "identity":
        return IdentityReplacement(site)
    if name == "mean":
        windows = token_windows(model, "train", max_windows=MEAN_WINDOWS, seed=seed)
        return MeanReplacement.fit(model, windows, site, name=ablation_name("mean", site))
    if name.startswith("coder:"):
        loaded = load_coder(name[len("coder:"):], model=model)
        return (SAEReplacement if loaded.cfg.kind == "sae" else TranscoderReplacement)(loaded, name=name)
    if is_plugin_spec(name):
        return load_plugin(name, model, layer)
    builders = {"transcoder": TranscoderReplacement, "sae": SAEReplacement, "zero_latents": ZeroLatentsReplacement,
                "random_latents": lambda c: RandomLatentsReplacement(c, seed=seed)}
    if name not in builders:
        raise ValueError(f"unknown condition {name!r}; valid: {', '.join(CONDITIONS)}, coder:PATH or "
                         "MODULE:FACTORY[:JSON]")
    return builders[name](coder())


M = TypeVar("M")
UNMEASURED = ("baseline", "diagnostic")
"""Families whose written values have no Pearson r of their own: baselines write none, and a swap writes true values
on part of its tokens."""


@dataclass(frozen=True)
class Planned(Generic[M]):
    """A condition of a run, declared once: its name, what it is (for tables, plots and the answer) and how to
    build it from the run's materials ``M``, which exist only once the conditions are evaluated. A plan counts
    conditions from the same declarations the run builds."""

    name: str
    family: str
    """baseline, oracle, lexical, llm, trained or diagnostic (a swap: part simulated, part true)."""
    fraction: float
    """The share of the coder's latents it simulates."""
    label: str
    make: Callable[[M, str], Replacement]
    """``make(materials, name)``: the condition, named ``name``."""

    def build(self, materials: M) -> Replacement:
        made = self.make(materials, self.name)
        if made.name != self.name:  # the one name a condition has: results, tables and plans all key on it
            raise ValueError(f"condition {self.name!r} was built named {made.name!r}")
        return made


class Subject(Protocol):
    """Materials that hold the subject model and the run's coder (what every baseline is built from)."""

    @property
    def model(self): ...

    @property
    def coder(self) -> SparseCoder: ...


def planned_baseline(how: str, layer: int, seed: int, site: str, fraction: float, label: str) -> Planned[Subject]:
    """A :func:`build_condition` condition (``how`` is one of :data:`CONDITIONS` or ``sae``), declared for a run."""
    name = ablation_name(how, site) if how in ("zero", "mean") else how
    return Planned(name, "baseline", fraction, label,
                   lambda m, _: build_condition(how, m.model, layer, lambda: m.coder, seed, site))


def ablation_name(how: str, site: str) -> str:
    """``zero_mlp`` / ``mean_mlp`` for an MLP's output (the names results have always used), else ``zero_<kind>``."""
    kind = Site.parse(site).kind
    return f"{how}_{'mlp' if kind == 'mlp_out' else kind}"


def default_coder_loader(model, layer: int) -> Callable[[], SparseCoder]:
    """A memoised loader of the cached default transcoder for ``model``'s MLP ``layer`` (trained on first use)."""
    cached: list[SparseCoder] = []

    def load() -> SparseCoder:
        if not cached:
            from nl_rewrite.coders.train import default_transcoder

            cached.append(default_transcoder(model_name(model), layer, model=model))
        return cached[0]

    return load


@dataclass(frozen=True)
class ConditionInfo:
    """What a condition is, for tables, plots and the answer: its family and how much it simulates."""

    family: str
    """baseline, oracle, lexical, llm, trained or diagnostic."""
    fraction_of_latents: float
    pearson: float
    """Mean per-latent Pearson r of the written values with the true activations on the evaluated windows (NaN for
    the families in :data:`UNMEASURED`)."""
    label: str = ""
