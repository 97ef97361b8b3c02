"""The trained simulator in a run: get it (train, reuse or load), read the headline lexical explanations of every
latent with it, calibrate on held-out explain windows, and rewrite 100% of latents on the first eval windows.

Its block of the evaluation (``eval_trained.json``) has its own references on the same windows: the coder, zero
ablation of its site, no active latents, the lexical reader and the oracles, so its recovery sits beside the ladder.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

from torch import Tensor

from nl_rewrite.data.windows import TokenWindows
from nl_rewrite.errors import CheckpointError
from nl_rewrite.interp.simulation_store import SimulationStore, simulate_into_store
from nl_rewrite.latents.cache import LatentCache
from nl_rewrite.paths import cache_dir
from nl_rewrite.pipeline.conditions import Planned, planned_baseline
from nl_rewrite.pipeline.config import RunConfig
from nl_rewrite.pipeline.ladder import LexicalArm, lexical_condition, mean_active, simulated_arm
from nl_rewrite.replacements.base import Replacement
from nl_rewrite.replacements.oracles import OracleReplacement
from nl_rewrite.coders.sparse_coder import SparseCoder
from nl_rewrite.trained.simulator import TrainedSimulator
from nl_rewrite.trained.training import CONFIG_FILE as SIMULATOR_CONFIG
from nl_rewrite.trained.training import TrainSimulatorConfig, data_fingerprint, load_simulator, train_simulator

TRAINED = "trained"
"""The condition: the trained simulator on every latent."""


def default_folder(cfg: TrainSimulatorConfig, cache: LatentCache, doc_ids: list[str],
                   llm_explanations: dict[int, str] | None = None) -> Path:
    """Where the default simulator of this explain cache is kept: the user cache, keyed by options and data."""
    key = cfg.key(data_fingerprint(cache, doc_ids, llm_explanations or None))
    return cache_dir() / "simulators" / f"{Path(cfg.base_model).stem}-L{cfg.n_layers}-{cfg.head}-{key}"


def check_trained_simulator(spec: str) -> None:
    """Fail before any stage runs when ``--trained-simulator`` names neither a mode nor a checkpoint folder."""
    if spec not in ("none", "default") and not (Path(spec) / SIMULATOR_CONFIG).is_file():
        raise CheckpointError(f"--trained-simulator {spec!r} is neither none, default nor a checkpoint folder (no "
                              f"{Path(spec) / SIMULATOR_CONFIG}); train one with nl-rewrite train-simulator --save-to {spec}")


def get_simulator(cfg: RunConfig, cache: LatentCache, doc_ids: list[str], progress: bool = True) -> TrainedSimulator:
    """``cfg.trained_simulator``: ``default`` trains (or resumes, or reuses) on ``cache``; else a checkpoint folder.
    Either way on the run's device."""
    device = str(cfg.torch_device)
    if cfg.trained_simulator == "default":
        folder = default_folder(cfg.trained, cache, doc_ids)
        return train_simulator(cfg.trained, cache, doc_ids, folder, device=device, progress=progress)
    return load_simulator(cfg.trained_simulator, device)


@dataclass
class StoredSimulator:
    """The trained simulator through a :class:`SimulationStore`: a rerun reads what an earlier one simulated."""

    simulator: TrainedSimulator
    store: SimulationStore

    def simulate_windows(self, explanations: Mapping[int, str], windows: Sequence[Sequence[str]]
                         ) -> dict[int, Tensor]:
        ids = dict(enumerate(windows))
        simulate_into_store(self.simulator, self.store, explanations, ids, chunk=max(1, len(ids)))
        return {lat: self.store.get(lat, text, ids) for lat, text in explanations.items()}


def trained_arm(simulator: TrainedSimulator, headline: LexicalArm, cache: LatentCache, calib_ids: list[int],
                eval_strings: dict[int, list[str]], folder: Path) -> LexicalArm:
    """The headline lexical explanations read by the trained simulator, for every latent that fired on the explain
    split; the others (explained as firing on no particular token) keep the lexical reader's silence."""
    alive = set(cache.stats.alive().tolist())
    texts = {lat: text for lat, text in headline.texts.items() if lat in alive}
    stored = StoredSimulator(simulator, SimulationStore(folder, simulator.identity))
    arm = simulated_arm(stored, texts, headline.budget, cache, calib_ids, eval_strings)
    silent = [lat for lat in headline.texts if lat not in alive]
    arm.texts.update({lat: headline.texts[lat] for lat in silent})
    arm.calibrators.update({lat: headline.calibrators[lat] for lat in silent})
    arm.eval_sims.update({lat: headline.eval_sims[lat] for lat in silent})
    return arm


@dataclass(frozen=True)
class TrainedMaterials:
    """What the trained simulator's block of conditions is built from."""

    model: object
    coder: SparseCoder
    cache: LatentCache
    arm: LexicalArm
    """The trained simulator reading the headline explanations."""
    headline: LexicalArm


def trained_planned(cfg: RunConfig, site: str, budget: int, share: float) -> list[Planned[TrainedMaterials]]:
    """The trained simulator's block, in order: its references, the lexical reader, the oracles, itself."""
    def base(how: str, fraction: float, label: str) -> Planned:
        return planned_baseline(how, cfg.layer, cfg.seed, site, fraction, label)

    return [base(cfg.coder, 1.0, cfg.coder), base("zero_latents", 0.0, "no active latents"),
            base("zero", 0.0, f"{site} zero-ablated"),
            Planned("lexical", "lexical", 1.0, f"lexical reader, ≤{budget} items",
                    lambda m, name: lexical_condition(m.coder, m.headline, range(m.cache.n_latents), name)),
            Planned("oracle", "oracle", 1.0, "true activations",
                    lambda m, name: OracleReplacement(m.coder, "true", None, name=name)),
            Planned("binary_oracle", "oracle", 1.0, "binary oracle",
                    lambda m, name: OracleReplacement(m.coder, "binary", None, mean_active=mean_active(m.cache),
                                                      name=name)),
            Planned(TRAINED, "trained", share, f"trained simulator on the lexical explanations (≤{budget} items)",
                    lambda m, name: lexical_condition(m.coder, m.arm, range(m.cache.n_latents), name))]


def trained_conditions(cfg: RunConfig, materials: TrainedMaterials, site: str
                       ) -> tuple[Callable[[], list[Replacement]], list[Planned[TrainedMaterials]]]:
    planned = trained_planned(cfg, site, materials.headline.budget,
                              len(materials.arm.texts) / materials.cache.n_latents)
    return functools.cache(lambda: [p.build(materials) for p in planned]), planned


def trained_windows(cfg: RunConfig, eval_windows: TokenWindows) -> TokenWindows:
    return eval_windows.subset(list(range(min(cfg.trained_eval_windows, len(eval_windows)))))
