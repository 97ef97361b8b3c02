"""Configuration of ``nl-rewrite run``: presets plus explicit overrides, validated up front."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from nl_rewrite.interp.calibrate import CALIBRATIONS
from nl_rewrite.evaluation.evaluator import POSITION_MODES
from nl_rewrite.interp.selection import ORDERS

PAPER_FRACTIONS = (0.001, 0.01, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0)

PRESETS: dict[str, dict] = {
    # a few minutes on 2 CPU cores with a warm model cache: a small transcoder, a handful of latents.
    "smoke": dict(transcoder="small", train_tokens=40_000, width=1024, pool=2, explain_windows=96,
                  calib_windows=4, eval_windows=8, llm_eval_windows=4, lexical_calib_windows=16,
                  n_train_examples=6, n_heldout=3, n_negatives=3, explain_max_tokens=24, fractions=(1.0,),
                  position_modes=("all", "last")),
    # ≤ 15 minutes from a cold cache on 2 cores (docs/results.md has the measured stage times): the default
    # transcoder; lexical explanations and oracles for all 4096 latents on 128 eval windows; the embedded LLM
    # explains and simulates a pool of the 6 latents carrying the most output mass, on 24 of those windows.
    "default": dict(transcoder="default", train_tokens=0, width=4096, pool=6, explain_windows=768,
                    calib_windows=6, eval_windows=128, llm_eval_windows=24, lexical_calib_windows=128,
                    n_train_examples=10, n_heldout=4, n_negatives=4, explain_max_tokens=32, fractions=(0.5, 1.0),
                    position_modes=("all",)),
    # Paper scale, for a GPU server behind an OpenAI-compatible endpoint (--llm openai:<model>@<url>).
    "paper": dict(transcoder="default", train_tokens=0, width=4096, pool=0, explain_windows=20_000,
                  calib_windows=64, eval_windows=1000, llm_eval_windows=1000, lexical_calib_windows=1000,
                  n_train_examples=40, n_heldout=20, n_negatives=20, explain_max_tokens=120,
                  fractions=PAPER_FRACTIONS, position_modes=("all", "last")),
}
@dataclass
class RunConfig:
    preset: str = field(default="default", metadata={"help": "smoke (~2 min), default (≤15 min CPU) or paper (GPU server)"})
    model: str = field(default="smollm2-135m", metadata={"help": "subject model: embedded name, HF dir or .gguf"})
    layer: int = field(default=-1, metadata={"help": "MLP layer to rewrite (-1: the default transcoder's layer)"})
    out: str = field(default="runs/nl_rewrite", metadata={"help": "output directory (rerun the same to resume)"})
    llm: str = field(default="embedded", metadata={
        "help": "explainer/simulator backend: embedded[:<model>], openai[:<model>[@<base_url>]] or sglang:<model>@<root>"})
    simulator_mode: str = field(default="all_at_once", metadata={"help": "all_at_once or paper (one prompt per token)"})
    fractions: tuple[float, ...] = field(default=(), metadata={"help": "fractions of the LLM pool simulated (default: the preset's)"})
    calibrations: tuple[str, ...] = field(default=(), metadata={"help": f"calibrations (default all: {', '.join(CALIBRATIONS)})"})
    order: str = field(default="explanation_score", metadata={"help": f"latent order for fractions: {', '.join(ORDERS)}"})
    pool_selection: str = field(default="mass", metadata={
        "help": "LLM pool: mass (largest share of activation × decoder norm on explain), frequent, or random alive"})
    lexical_budget: int = field(default=12, metadata={"help": "items per lexical explanation in the headline condition"})
    lexical_budgets: tuple[int, ...] = field(default=(3, 6, 12, 24), metadata={
        "help": "explanation budgets evaluated at 100%% of latents (the length curve)"})
    noise_targets: tuple[float, ...] = field(default=(0.9, 0.7, 0.5, 0.3), metadata={
        "help": "target Pearson r of the noise-degraded oracles"})
    sweep_fractions: tuple[float, ...] = field(default=(0.001, 0.01, 0.1, 0.5), metadata={
        "help": "fractions of all latents (below 1) for the lexical and binary-oracle sweeps, best explained first"})
    window: int = field(default=32, metadata={"help": "tokens per window (paper: 32)"})
    seed: int = field(default=0, metadata={"help": "seed for splits, sampling, latent choice and bootstrap"})
    batch_size: int = field(default=8, metadata={"help": "windows per evaluation forward pass"})
    transcoder: str = field(default="", metadata={"help": "default (cached 4096×k32), small (quick), or a checkpoint path"})
    train_tokens: int = field(default=-1, metadata={"help": "training tokens for a 'small' transcoder"})
    width: int = field(default=-1, metadata={"help": "latents of a 'small' transcoder"})
    pool: int = field(default=-1, metadata={"help": "latents explained and simulated (0: all alive latents)"})
    explain_windows: int = field(default=-1, metadata={"help": "explain-split windows cached for examples and stats"})
    calib_windows: int = field(default=-1, metadata={"help": "explain-split windows simulated to fit calibrators"})
    eval_windows: int = field(default=-1, metadata={"help": "eval-split windows evaluated"})
    llm_eval_windows: int = field(default=-1, metadata={"help": "of those, the first N simulated by the LLM"})
    lexical_calib_windows: int = field(default=-1, metadata={
        "help": "explain-split windows held out from lexical statistics to calibrate and rank lexical explanations"})
    position_modes: tuple[str, ...] = field(default=(), metadata={"help": "all and/or last (the paper's protocol)"})
    n_train_examples: int = field(default=-1, metadata={"help": "examples shown to the explainer per latent"})
    n_heldout: int = field(default=-1, metadata={"help": "held-out activating examples per latent for detection"})
    n_negatives: int = field(default=-1, metadata={"help": "non-activating examples per latent for detection"})
    explain_max_tokens: int = field(default=-1, metadata={"help": "explanation length limit in tokens"})

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; valid: {', '.join(PRESETS)}")
        for name, value in PRESETS[self.preset].items():
            if getattr(self, name) in (-1, "", ()):
                setattr(self, name, value)
        self.fractions = tuple(float(f) for f in self.fractions)
        self.llm_eval_windows = min(self.llm_eval_windows, self.eval_windows)
        self.calibrations = tuple(self.calibrations or CALIBRATIONS)
        self._validate()

    def _validate(self) -> None:
        bad = [f for f in self.fractions if not 0.0 <= f <= 1.0] + [f for f in self.sweep_fractions if not 0.0 < f <= 1.0]
        if bad:
            raise ValueError(f"fractions must lie in [0, 1] (sweep_fractions in (0, 1]); got {bad}")
        unknown = [c for c in self.calibrations if c not in CALIBRATIONS]
        if unknown:
            raise ValueError(f"unknown calibration(s) {unknown}; valid: {', '.join(CALIBRATIONS)}")
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")
        if self.pool_selection not in ("mass", "frequent", "random"):
            raise ValueError(f"pool_selection must be mass, frequent or random, got {self.pool_selection!r}")
        if any(not 0 < r < 1 for r in self.noise_targets):
            raise ValueError(f"noise_targets are correlations in (0, 1); got {self.noise_targets}")
        if self.lexical_budget < 1 or any(b < 1 for b in self.lexical_budgets):
            raise ValueError("lexical budgets must be at least 1 item")
        if self.lexical_calib_windows >= self.explain_windows:
            raise ValueError(f"lexical_calib_windows ({self.lexical_calib_windows}) must be fewer than explain_windows "
                             f"({self.explain_windows}): the rest are the lexical explainer's statistics")
        if not self.position_modes or any(m not in POSITION_MODES for m in self.position_modes):
            raise ValueError(f"position_modes must be a non-empty subset of {POSITION_MODES}, got {self.position_modes}")
        if self.simulator_mode not in ("all_at_once", "paper"):
            raise ValueError(f"simulator_mode must be all_at_once or paper, got {self.simulator_mode!r}")
        for name in ("calib_windows", "eval_windows", "explain_windows", "n_train_examples", "window",
                     "lexical_calib_windows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def field_names() -> list[str]:
        return [f.name for f in fields(RunConfig)]
