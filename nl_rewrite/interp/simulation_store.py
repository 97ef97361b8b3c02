"""Simulations on disk: computed once per (latent, window), reused across fractions and calibrations.

Layout: ``folder/<key>/identity.json`` names the simulator (backend, mode, prompt version and a digest
of its prompts); ``folder/<key>/latent_<id>.safetensors`` holds ``window_keys [n]`` and raw simulated
``scores [n, pos]`` (expected digits, NaN where the backend gave nothing), with the explanation's hash
in the file's metadata. A changed explanation makes that latent's file stale: it is recomputed, never
mixed.

**Simulations are keyed by window content**, never by a window's position in a sample: ``window_key`` hashes the
token strings the simulator read. A window id is only how a caller names a window in *its* sample; every method
takes the caller's ``windows`` (id → token strings) and answers in those ids. A rerun with a different sample
(``--eval-windows 32`` after 16) reuses exactly the windows whose text is the same, and simulates the rest.

Every write goes through :mod:`nl_rewrite.io` (temp file, fsync, rename), and ``simulate_into_store`` writes after
each chunk of windows, so a killed run resumes where it stopped.

Per-latent quality (Pearson/Spearman with the true activations, precision/recall of "fires" after
calibration) is stored as JSON beside the simulations and serves as a latent ranking.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from jaxtyping import Float
from safetensors import SafetensorError, safe_open
from torch import Tensor

from nl_rewrite import io
from nl_rewrite.errors import MissingSimulationError
from nl_rewrite.interp.simulate import SimulationItem, TokenSimulator
from nl_rewrite.parallel.runner import InProcess, ShardRunner
from nl_rewrite.hashing import digest
from nl_rewrite.correlation import pearson

log = logging.getLogger(__name__)


LAYOUT = "content-keyed-v3"
"""Part of the store's folder name: stores of the old position-keyed layout are never read."""

Windows = Mapping[int, Sequence[str]]
"""A caller's windows: its window id → the token strings of that window."""


def text_hash(text: str) -> str:
    return digest(text)


def window_key(tokens: Sequence[str]) -> int:
    """A window's content key: 63 bits of a hash of its token strings (fits an int64 tensor)."""
    return _content_key(tuple(tokens))


@functools.lru_cache(maxsize=1 << 16)
def _content_key(tokens: tuple[str, ...]) -> int:
    # cached: a run asks for the same few hundred windows' keys once per latent (millions of times)
    return int(digest(json.dumps(tokens)), 16) >> 1  # JSON: unambiguous, whatever the tokens hold


class SimulationStore:
    """Raw simulated scores of one simulator, one file per latent."""

    def __init__(self, folder: "str | Path", simulator_identity: str) -> None:
        self.identity = simulator_identity
        self.folder = Path(folder) / text_hash(f"{simulator_identity}|{LAYOUT}")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.corrupt_files = 0
        """Store files found unreadable (and re-simulated), for logs and reports."""
        marker = self.folder / "identity.json"
        if not marker.exists():
            io.write_json(marker, {"simulator": simulator_identity})

    def _path(self, latent: int) -> Path:
        return self.folder / f"latent_{int(latent)}.safetensors"

    def _stored(self, latent: int, explanation: str) -> dict[int, Float[Tensor, " pos"]]:
        """window key → scores for this latent, empty if none are stored for this explanation."""
        path = self._path(latent)
        if not path.exists():
            return {}
        try:
            with safe_open(str(path), framework="pt") as fh:
                if (fh.metadata() or {}).get("explanation_hash") != text_hash(explanation):
                    return {}
                keys, scores = fh.get_tensor("window_keys"), fh.get_tensor("scores")
        except (SafetensorError, OSError) as exc:  # written without fsync (see put): a power loss may truncate it
            self.corrupt_files += 1
            log.warning("%s is unreadable (%s); its windows will be simulated again", path, exc)
            return {}
        return {int(k): s for k, s in zip(keys.tolist(), scores)}

    def load(self, latent: int, explanation: str, windows: Windows) -> dict[int, Float[Tensor, " pos"]]:
        """The caller's window id → scores, for those of ``windows`` whose text has a stored simulation."""
        have = self._stored(latent, explanation)
        keys = {w: window_key(tokens) for w, tokens in windows.items()}
        return {int(w): have[k] for w, k in keys.items() if k in have}

    def missing(self, latent: int, explanation: str, windows: Windows) -> list[int]:
        have = self._stored(latent, explanation)
        todo: dict[int, int] = {}  # key → first id: windows with the same text are simulated once
        for w, tokens in windows.items():
            key = window_key(tokens)
            if key not in have:
                todo.setdefault(key, int(w))
        return list(todo.values())

    def put(self, latent: int, explanation: str, windows: Sequence[Sequence[str]],
            scores: Float[Tensor, "n pos"]) -> None:
        """Add (or replace) simulations of these windows (token strings, one per score row); stale windows of an
        older explanation are dropped."""
        if len(windows) != len(scores):
            raise ValueError(f"{len(windows)} windows for {len(scores)} score rows")
        merged = self._stored(latent, explanation)
        merged.update({window_key(t): s.to(torch.float32) for t, s in zip(windows, scores)})
        widths = {s.shape[-1] for s in merged.values()}
        if len(widths) > 1:
            raise ValueError(f"latent {latent}: windows of different lengths {sorted(widths)} in one store")
        order = sorted(merged)
        tensors = {"window_keys": torch.tensor(order, dtype=torch.int64),
                   "scores": torch.stack([merged[w] for w in order]).contiguous()}
        # No fsync: a run writes one file per latent and chunk (tens of thousands), and fsyncs cost minutes; the
        # rename stays atomic, and a file a power loss truncates is read as missing and simulated again.
        io.save_tensors(self._path(latent), tensors, sync=False,
                        metadata={"explanation_hash": text_hash(explanation), "latent": str(latent)})

    def get(self, latent: int, explanation: str, windows: Windows) -> Float[Tensor, "n pos"]:
        """Scores for exactly these windows, in their order, or a ``MissingSimulationError`` naming what is
        missing."""
        have = self.load(latent, explanation, windows)
        absent = [int(w) for w in windows if int(w) not in have]
        if absent:
            raise MissingSimulationError(
                f"latent {latent}: no stored simulation for {len(absent)} of {len(windows)} windows "
                f"(first ids: {absent[:5]}) with this explanation and simulator {self.identity!r}")
        return torch.stack([have[int(w)] for w in windows])

    # ---- quality ------------------------------------------------------------------------------

    def save_quality(self, name: str, records: Iterable["SimulationQuality"]) -> Path:
        path = self.folder / f"quality_{name}.json"
        io.write_json(path, [asdict(r) for r in records])
        return path

    def load_quality(self, name: str) -> dict[int, "SimulationQuality"]:
        path = self.folder / f"quality_{name}.json"
        if not path.exists():
            return {}
        return {r["latent"]: SimulationQuality(**r) for r in json.loads(path.read_text())}


@dataclass(frozen=True)
class SimulationRun:
    """What ``simulate_into_store`` did."""

    latents: int
    windows_simulated: int
    windows_reused: int
    nan_predictions: int


@dataclass(frozen=True)
class SimulationJob:
    """One chunk of one latent's windows: simulated together so the backend shares the explanation's prefix."""

    latent: int
    explanation: str
    window_ids: tuple[int, ...]


@dataclass(frozen=True)
class SimulationInputs:
    """What a worker simulates with: the simulator and every window's tokens (sent once, not with each job)."""

    simulator: TokenSimulator
    windows: Mapping[int, Sequence[str]]


def simulate_job(inputs: SimulationInputs, job: SimulationJob) -> Float[Tensor, "n pos"]:
    meta = [(("latent", str(job.latent)), ("window", str(w))) for w in job.window_ids]
    items = [SimulationItem(job.explanation, tuple(inputs.windows[w]), m) for w, m in zip(job.window_ids, meta)]
    return torch.stack(inputs.simulator.simulate_many(items))


def simulation_jobs(store: SimulationStore, explanations: Mapping[int, str], windows: Mapping[int, Sequence[str]],
                    chunk: int) -> list[SimulationJob]:
    """Every (latent, window) not yet in ``store``, in chunks of at most ``chunk`` windows of one latent."""
    jobs = []
    for latent, explanation in explanations.items():
        todo = store.missing(latent, explanation, windows)
        jobs += [SimulationJob(latent, explanation, tuple(todo[start:start + chunk]))
                 for start in range(0, len(todo), chunk)]
    return jobs


def simulate_into_store(simulator: TokenSimulator, store: SimulationStore, explanations: Mapping[int, str],
                        windows: Mapping[int, Sequence[str]], *, chunk: int = 16, progress: bool = True,
                        runner: ShardRunner | None = None) -> SimulationRun:
    """Simulate every (latent, window) not yet stored. ``windows``: window id → token strings.

    Writes after each chunk of one latent's windows (the backend shares that latent's prefix within it). ``runner``
    (default: this process) runs the chunks; on Ray each worker holds its own simulator and backend."""
    if simulator.identity != store.identity:
        raise ValueError(f"store is for simulator {store.identity!r}, not {simulator.identity!r}")
    jobs = simulation_jobs(store, explanations, windows, chunk)
    nan = [0]

    def keep(index: int, values: Tensor) -> None:
        job = jobs[index]
        store.put(job.latent, job.explanation, [windows[w] for w in job.window_ids], values)
        nan[0] += int(torch.isnan(values).sum())

    (runner or InProcess()).map(SimulationInputs(simulator, windows), simulate_job, jobs, keep, desc="simulate",
                                progress=progress)
    simulated = sum(len(job.window_ids) for job in jobs)
    return SimulationRun(len(explanations), simulated, len(explanations) * len(windows) - simulated, nan[0])


@dataclass(frozen=True)
class SimulationQuality:
    """How well one latent's simulation tracks its true activations (NaN where undefined)."""

    latent: int
    n: int
    n_nan: int
    pearson: float
    spearman: float | None
    """None when not asked for (:func:`simulation_quality`'s ``rank_correlation``)."""
    precision: float
    recall: float


def _spearman(s: np.ndarray, t: np.ndarray) -> float:
    from scipy.stats import rankdata

    return pearson(torch.from_numpy(rankdata(s)), torch.from_numpy(rankdata(t))) if s.size else math.nan


def simulation_quality(latent: int, scores: Float[Tensor, " n"], true_acts: Float[Tensor, " n"],
                       calibrated: Float[Tensor, " n"] | None = None, rank_correlation: bool = True
                       ) -> SimulationQuality:
    """Correlations of raw scores with true activations; precision/recall of ``calibrated > 0`` vs ``true > 0``.
    Without ``rank_correlation`` the Spearman r is left out (None): its ranks are half the cost, and the lexical
    arms, which score every latent, never report it."""
    s, t = scores.double().reshape(-1).numpy(), true_acts.double().reshape(-1).numpy()
    if s.shape != t.shape:
        raise ValueError(f"{s.size} scores for {t.size} true activations")
    keep = np.isfinite(s)
    s_k, t_k = s[keep], t[keep]
    precision = recall = math.nan
    if calibrated is not None:
        fires = np.nan_to_num(calibrated.double().reshape(-1).numpy()[keep]) > 0
        truly = t_k > 0
        precision = float((fires & truly).sum() / fires.sum()) if fires.any() else math.nan
        recall = float((fires & truly).sum() / truly.sum()) if truly.any() else math.nan
    return SimulationQuality(int(latent), int(s.size), int((~keep).sum()), pearson(torch.from_numpy(s_k), torch.from_numpy(t_k)),
                             _spearman(s_k, t_k) if rank_correlation else None, precision, recall)


def quality_ranking(quality: Mapping[int, SimulationQuality], metric: str = "pearson") -> dict[int, float]:
    """latent → score usable by ``choose_latents(order="simulation_score")``."""
    if metric not in ("pearson", "spearman", "precision", "recall"):
        raise ValueError(f"unknown quality metric {metric!r}")
    return {latent: getattr(q, metric) for latent, q in quality.items()}
