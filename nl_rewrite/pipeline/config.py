"""Configuration of ``nl-rewrite run``: a preset plus explicit options, frozen and validated when built.

An option left ``None`` takes the preset's value (``PRESETS``; ``layer``: the default transcoder's).
``cfg.resolved()`` is a new config with every value filled in: what a run uses, writes to ``<out>/config.toml``
and records in ``manifest.json``; ``RunConfig.from_toml`` of that file resolves to the same config. Nested
tables hold the stages' own configs, nested as they are: ``sampling`` (:class:`SamplingConfig`; None: the preset's,
seeded with the run's ``seed``), ``explain`` (:class:`ExplainConfig`; None: the preset's), ``score``
(:class:`ScoreConfig`), ``simulator`` (:class:`SimulatorConfig`). The command line starts from the resolved
preset instead (:mod:`nl_rewrite.cli.run`), so there every option has a value. See docs/configuration.md.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

from nl_rewrite.placement import Placement
from nl_rewrite.coders.sparse_coder import Kind
from nl_rewrite.coders.train import DEFAULT_LAYER
from nl_rewrite.model.sites import SiteKind
from nl_rewrite.evaluation.evaluator import PositionMode
from nl_rewrite.interp.calibrate import Calibration
from nl_rewrite.config_io import read_toml, to_toml
from nl_rewrite.typed_json import adapter
from nl_rewrite.interp.explain import ExplainConfig
from nl_rewrite.interp.lexical import DEFAULT_BUDGET
from nl_rewrite.interp.score import ScoreConfig
from nl_rewrite.interp.selection import Order
from nl_rewrite.interp.simulate import SimulatorConfig
from nl_rewrite.latents.sampling import SamplingConfig
from nl_rewrite.trained.training import TrainSimulatorConfig

Preset = Literal["smoke", "default", "paper"]
PoolSelection = Literal["mass", "frequent", "random"]

PAPER_FRACTIONS = (0.001, 0.01, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0)

PRESETS: dict[str, dict[str, Any]] = {
    # a few minutes on 2 CPU cores with a warm model cache: a small transcoder, a handful of latents.
    "smoke": dict(coder_checkpoint="small", train_tokens=16_000, width=1024, pool=2, explain_windows=96,
                  calib_windows=4, eval_windows=8, llm_eval_windows=4, lexical_calib_windows=16,
                  fractions=(1.0,), position_modes=("all", "last"),
                  sampling=dict(n_train=6, n_heldout=3, n_negatives=3), explain=dict(max_tokens=24)),
    # ≤ 15 minutes from a cold cache on 2 cores (docs/results.md has the measured stage times): the default
    # transcoder; lexical explanations and oracles for all 4096 latents on 128 eval windows; the embedded LLM
    # explains and simulates a pool of the 6 latents carrying the most output mass, on 24 of those windows.
    "default": dict(coder_checkpoint="default", train_tokens=0, width=4096, pool=6, explain_windows=768,
                    calib_windows=6, eval_windows=128, llm_eval_windows=24, lexical_calib_windows=128,
                    fractions=(0.5, 1.0), position_modes=("all",),
                    sampling=dict(n_train=10, n_heldout=4, n_negatives=4), explain=dict(max_tokens=32)),
    # Paper scale, for a GPU server behind an OpenAI-compatible endpoint (--llm openai:<model>@<url>).
    "paper": dict(coder_checkpoint="default", train_tokens=0, width=4096, pool=0, explain_windows=20_000,
                  calib_windows=64, eval_windows=1000, llm_eval_windows=1000, lexical_calib_windows=1000,
                  fractions=PAPER_FRACTIONS, position_modes=("all", "last"),
                  sampling=dict(n_train=40, n_heldout=20, n_negatives=20), explain=dict(max_tokens=120)),
}
STAGE_PRESETS = ("sampling", "explain")
"""The stage configs a preset sets (a run's ``sampling`` and ``explain`` left None); the rest keep their defaults."""
@dataclass(frozen=True)
class RunConfig(Placement):
    """Options of nl-rewrite run (with --device and --dtype). On the command line the preset's values are the
    defaults; in Python an option left at None takes the preset's value, and resolved() fills them in."""

    RENAMED: ClassVar[dict[str, str]] = {"transcoder": "coder_checkpoint"}
    """Options of earlier versions, by their new names: a config.toml that still uses one is told the new name."""

    preset: Preset = "default"
    """smoke (~2 min), default (≤15 min CPU) or paper (GPU server)"""
    model: str = "smollm2-135m"
    """subject model: embedded name, HF dir or .gguf"""
    layer: int | None = None
    """layer to rewrite: its MLP (transcoder) or its --sae-site (SAE) (default: the default transcoder's layer)"""
    coder: Kind = "transcoder"
    """transcoder (the MLP's input → output, the paper's first experiment) or sae (an SAE on --sae-site of
    --layer, the paper's second experiment)"""
    sae_site: SiteKind = "resid_post"
    """site kind an SAE reads and writes (with --coder sae)"""
    out: str = "runs/nl_rewrite"
    """output directory (rerun the same to resume)"""
    llm: str = "embedded"
    """explainer/simulator backend: embedded[:<model>], openai[:<model>[@<base_url>]] or sglang:<model>@<root>"""
    # Optional[tuple[...]], not `tuple[...] | None`: simple_parsing 0.1 cannot read the latter.
    fractions: Optional[tuple[float, ...]] = None
    """fractions of the LLM pool simulated"""
    calibrations: tuple[Calibration, ...] = ("linear", "quantile", "isotonic")
    """calibrations of the simulator's predictions"""
    order: Order = "explanation_score"
    """latent order for fractions"""
    pool_selection: PoolSelection = "mass"
    """LLM pool: mass (largest share of activation × decoder norm on explain), frequent, or random alive"""
    lexical_budget: int = DEFAULT_BUDGET
    """items per lexical explanation in the headline condition"""
    lexical_budgets: tuple[int, ...] = (3, 6, 12, 24)
    """explanation budgets evaluated at 100%% of latents (the length curve)"""
    noise_targets: tuple[float, ...] = (0.9, 0.7, 0.5, 0.3)
    """target Pearson r of the noise-degraded oracles"""
    sweep_fractions: tuple[float, ...] = (0.01, 0.1, 0.5)
    """fractions of all latents (below 1) for the lexical and binary-oracle sweeps, best explained first"""
    window: int = 32
    """tokens per window (paper: 32)"""
    seed: int = 0
    """seed for splits, sampling, latent choice and bootstrap"""
    batch_size: int = 8
    """windows per evaluation forward pass"""
    coder_checkpoint: str | None = None
    """the sparse coder (transcoder or SAE, per --coder): default (cached 4096×k32), small (quick), a checkpoint
    path, or hf:ORG/REPO[/SUBFOLDER] (a sparsify or SAELens folder on the hub)"""
    train_tokens: int | None = None
    """model tokens a 'small' coder trains on (by the default coder's recipe: several passes over each)"""
    width: int | None = None
    """latents of a 'small' coder"""
    pool: int | None = None
    """latents explained and simulated (0: all alive latents)"""
    explain_windows: int | None = None
    """explain-split windows cached for examples and stats"""
    calib_windows: int | None = None
    """explain-split windows simulated to fit calibrators"""
    eval_windows: int | None = None
    """eval-split windows evaluated"""
    llm_eval_windows: int | None = None
    """of those, the first N simulated by the LLM (at most eval_windows)"""
    lexical_calib_windows: int | None = None
    """explain-split windows held out from lexical statistics to calibrate and rank lexical explanations"""
    position_modes: Optional[tuple[PositionMode, ...]] = None
    """all and/or last (the paper's protocol)"""
    sampling: Optional[SamplingConfig] = None
    """which windows the explainer sees and detection scoring uses (None: the preset's, seeded with --seed)"""
    explain: Optional[ExplainConfig] = None
    """the LLM explainer (None: the preset's)"""
    score: ScoreConfig = field(default_factory=ScoreConfig)
    """detection scoring of the explanations"""
    simulator: SimulatorConfig = field(default_factory=SimulatorConfig)
    """the LLM simulator"""
    trained_simulator: str = "none"
    """the trained single-pass simulator: none, default (trained with --trained.* on this run's explain split, or
    reused from the user cache) or a checkpoint folder (nl-rewrite train-simulator); rewrites 100%% of latents on the
    first --trained-eval-windows eval windows"""
    trained_eval_windows: int = 8
    """eval windows (the first ones) the trained simulator rewrites at 100%% of latents"""
    trained_calib_windows: int = 16
    """held-out explain windows (of the lexical calibration windows) the trained simulator is calibrated on"""
    trained: TrainSimulatorConfig = field(default_factory=TrainSimulatorConfig)
    """training of the default trained simulator"""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; valid: {', '.join(PRESETS)}")
        _validate(self.filled())

    def filled(self) -> dict[str, Any]:
        """Every option's value, the preset's (and the default ``layer``) where this config leaves None."""
        preset = PRESETS[self.preset]
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values.update({name: preset[name] for name in preset
                       if name not in STAGE_PRESETS and values[name] is None})
        values["layer"] = DEFAULT_LAYER if self.layer is None else self.layer
        values["llm_eval_windows"] = min(values["llm_eval_windows"], values["eval_windows"])
        values["sampling"] = self.sampling or SamplingConfig(**preset["sampling"], seed=self.seed)
        values["explain"] = self.explain or ExplainConfig(**preset["explain"])
        return values

    def resolved(self) -> RunConfig:
        """A new config with every option filled in (the preset's values, the layer): what a run uses."""
        return dataclasses.replace(self, **self.filled())

    @property
    def is_resolved(self) -> bool:
        return self == self.resolved()

    def sampling_config(self) -> SamplingConfig:
        return self.resolved().sampling

    def explain_config(self) -> ExplainConfig:
        return self.resolved().explain

    def to_dict(self) -> dict:
        """The options as JSON values (tuples as lists): results.json's and the manifest's ``config``."""
        return adapter(RunConfig).dump_python(self, mode="json")

    def to_toml(self) -> str:
        return to_toml(self, header="nl-rewrite run --config <this file> uses these options again; flags override "
                                    "them.\nSee docs/configuration.md.")

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> RunConfig:
        """The config in a TOML file, with ``overrides`` (e.g. the command line's ``preset``) replacing its keys.

        A ``[sampling]`` or ``[explain]`` table sets those keys of the preset's stage config (as the command line's
        ``--sampling.n_train`` does), not of the class defaults. Unknown keys and wrong types are ValueErrors naming
        the key."""
        return cls(**cls.toml_values(path, **overrides))

    @classmethod
    def toml_values(cls, path: str | Path, **overrides: Any) -> dict[str, Any]:
        """:meth:`from_toml`'s keyword arguments, each checked, before the config is built and validated as a whole
        (the command line may still change them)."""
        return read_toml(cls, path, lambda data: _on_preset({**data, **overrides}))


def _on_preset(data: dict[str, Any]) -> dict[str, Any]:
    """A TOML table of a run with its stage tables completed from its preset's (the sampling seed: its seed)."""
    preset = PRESETS.get(data.get("preset", "default"))
    if preset is None:
        return data  # an unknown preset is refused when the table is checked
    completed = dict(data)
    for name in STAGE_PRESETS:
        if isinstance(data.get(name), dict):
            base = {**preset[name], **({"seed": data.get("seed", 0)} if name == "sampling" else {})}
            completed[name] = {**base, **data[name]}
    return completed


def _validate(v: dict[str, Any]) -> None:
    """Raise ValueError for the first option of a filled-in config that cannot work."""
    bad = [f for f in v["fractions"] if not 0.0 <= f <= 1.0] + [f for f in v["sweep_fractions"] if not 0.0 < f <= 1.0]
    if bad:
        raise ValueError(f"fractions must lie in [0, 1] (sweep_fractions in (0, 1]); got {bad}")
    for name in ("fractions", "calibrations", "position_modes", "lexical_budgets"):
        if not v[name]:
            raise ValueError(f"{name} must not be empty")
    for name, kind in (("calibrations", Calibration), ("position_modes", PositionMode), ("order", Order),
                       ("pool_selection", PoolSelection), ("coder", Kind), ("sae_site", SiteKind)):
        allowed = typing.get_args(kind)
        given = v[name] if isinstance(v[name], tuple) else (v[name],)
        if any(x not in allowed for x in given):
            raise ValueError(f"{name} must be {'among' if isinstance(v[name], tuple) else 'one of'} "
                             f"{', '.join(allowed)}; got {v[name]!r}")
    if "all" not in v["position_modes"]:
        raise ValueError(f"position_modes must include 'all' (the answer and recovery fractions are measured on all "
                         f"positions; add 'last' for the paper's protocol); got {v['position_modes']}")
    if any(not 0 < r < 1 for r in v["noise_targets"]):
        raise ValueError(f"noise_targets are correlations in (0, 1); got {v['noise_targets']}")
    if v["lexical_budget"] < 1 or any(b < 1 for b in v["lexical_budgets"]):
        raise ValueError("lexical budgets must be at least 1 item")
    for name in ("calib_windows", "eval_windows", "explain_windows", "window", "lexical_calib_windows", "batch_size",
                 "trained_eval_windows", "trained_calib_windows"):
        if v[name] < 1:
            raise ValueError(f"{name} must be at least 1, got {v[name]}")
    if v["lexical_calib_windows"] >= v["explain_windows"]:
        raise ValueError(f"lexical_calib_windows ({v['lexical_calib_windows']}) must be fewer than explain_windows "
                         f"({v['explain_windows']}): the rest are the lexical explainer's statistics")
    for name in ("train_tokens", "width", "pool", "layer"):
        if v[name] < 0:
            raise ValueError(f"{name} must be >= 0, got {v[name]}")
    if v["coder_checkpoint"] == "small" and (v["train_tokens"] < 1 or v["width"] < 1):
        raise ValueError(f"coder_checkpoint 'small' trains a coder of width {v['width']} on {v['train_tokens']} tokens; "
                         "give --train-tokens and --width of at least 1")
