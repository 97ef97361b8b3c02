"""Train a TopK sparse coder (transcoder or SAE) on CPU, streaming activations from the model.

The stream: the corpus ``train`` split's windows in a seeded random order; each *buffer* of
``buffer_windows`` windows is run through the model up to the coder's sites (``model.capture``), its
tokens are shuffled (seeded by buffer index) and cut into steps of ``batch_size`` tokens. Because buffer
boundaries and shuffles depend only on the seed, a training state (weights, Adam, step, dead-latent
counters) is enough to resume exactly: the interrupted buffer is recomputed and its finished steps skipped.

Loss: FVU of the prediction plus ``auxk_alpha`` × AuxK (Gao et al. 2024: the top dead latents predict
the residual error), which revives latents that stopped firing. Decoder rows stay unit-norm: the gradient
component parallel to each row is removed before the step and rows are renormalised after it.

Output folder (``out``): ``cfg.json`` + ``sae.safetensors`` (sparsify layout, updated at each checkpoint),
``train_state.pt`` (resume), ``train_log.jsonl`` and, when finished, ``training.json``.

Under ``torchrun --nproc_per_node N`` (see :mod:`nl_rewrite.coders.distributed`) every buffer is the same set of
windows as in one process, but rank r runs the model on its interleaved 1/N share only and takes
``batch_size / N`` tokens of it per step; gradients are averaged over the ranks, so the global batch stays
``batch_size`` tokens. The ranks share the initialisation buffer, rank 0's initial weights and the dead-latent
counters, so all hold the same coder after every step; rank 0 alone writes the output folder.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from nl_rewrite import io
from nl_rewrite.coders.checkpoint import is_checkpoint, load_coder, save_coder
from nl_rewrite.coders.distributed import SINGLE_PROCESS, Ranks, check_divisible, rank_device, ranks_from_env
from nl_rewrite.errors import CheckpointError
from nl_rewrite.hashing import digest
from nl_rewrite.paths import cache_dir
from nl_rewrite.model.loading import check_layer_before_loading
from nl_rewrite.model.capture import capture
from nl_rewrite.model.sites import Site, SiteKind, resolve, site_width
from nl_rewrite.coders.sparse_coder import KINDS, CoderConfig, Kind, SparseCoder
from nl_rewrite.placement import Placement, module_device

log = logging.getLogger(__name__)

DEFAULT_LAYER = 10
"""SmolLM2's MLP chosen by ``nl-rewrite layers`` on the explain split (docs/history.md): nearest the middle among
layers whose zero ablation costs 0.15-1 nats (+0.36 [0.30, 0.43] on explain, +0.30 [0.23, 0.38] on eval)."""
DEFAULT_TOKENS = 400_000  # see benchmarks/train_throughput.py and docs/history.md for the measured minutes
DEFAULT_CODER_RECIPE = dict(width=4096, k=32, tokens=163_840, buffer_passes=3, lr_decay=0.3)
"""The default coder's training (issue 24, benchmarks/transcoder_quality.py, docs/results.md): the model forward to the
coded layer dominates training on CPU, so each activation buffer feeds three optimiser passes, and a learning rate
falling to 0 over the last 30% of steps makes up for the fewer model tokens. 163,840 tokens are 20 buffers of 128
windows × 64. On SmolLM2's MLP 10, side by side: 155.0 s against 197.4 s for 200k tokens (the recipe before), with
the same quality within the CIs (CE recovered 1.009 against 1.019 on eval, 0.867 against 0.867 on eval_ood; FVU 0.089
against 0.087; under 1% dead latents in both)."""
STATE_FILE, LOG_FILE, DONE_FILE = "train_state.pt", "train_log.jsonl", "training.json"
# fields that may differ between an interrupted run and its resumption without changing the result
_RESUMABLE_CHANGES = ("tokens", "checkpoint_every", "out")
# settings added after coders were first cached, at the value that reproduces those coders
_LEGACY_SETTINGS = {"lr_decay": 0.0}


def coder_sites(kind: Kind, layer: int, sae_site: SiteKind) -> tuple[str, str]:
    """(read site, write site) of a coder: a transcoder reads the MLP's input and writes its output; an SAE reads
    and writes ``sae_site``."""
    if kind == "transcoder":
        return f"mlp_in.{layer}", f"mlp_out.{layer}"
    return f"{sae_site}.{layer}", f"{sae_site}.{layer}"


def parse_tokens(text: "str | int") -> int:
    """``2M`` → 2_000_000, ``500k`` → 500_000, ``12345`` → 12345."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*", str(text))
    if not match:
        raise ValueError(f"cannot parse token count {text!r}; write e.g. 2M, 500k or 300000")
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[match.group(2).lower()]
    return int(float(match.group(1)) * scale)


@dataclass(frozen=True)
class TrainConfig:
    """A sparse coder's training run; everything but ``tokens``, ``checkpoint_every`` and ``out`` shapes the result."""

    model: str = "smollm2-135m"
    """model name (see nl_rewrite.model.loading)"""
    layer: int = DEFAULT_LAYER
    """layer whose MLP (transcoder) or site (SAE) is coded"""
    kind: Kind = "transcoder"
    """transcoder (mlp_in → mlp_out) or sae"""
    sae_site: SiteKind = "resid_post"
    """site kind an SAE reads and writes"""
    width: int = 4096
    """number of latents"""
    k: int = 32
    """active latents per token"""
    skip: Literal["auto", "yes", "no"] = "auto"
    """linear skip path: auto (transcoder yes, SAE no), yes, no"""
    tokens: int | str = DEFAULT_TOKENS
    """training tokens (accepts 2M, 500k; always an int after construction)"""
    window: int = 64
    """tokens per corpus window"""
    batch_size: int = 1024
    """tokens per optimiser step"""
    buffer_windows: int = 128
    """windows per shuffle buffer (one model pass)"""
    buffer_passes: int = 1
    """optimiser passes over each buffer (reuse activations)"""
    lr: float = 3e-3
    """Adam learning rate"""
    lr_warmup: int = 20
    """linear warm-up steps"""
    lr_decay: float = 0.0
    """share of the steps, at the end, over which the learning rate falls linearly to 0 (0: constant)"""
    auxk_alpha: float = 1 / 32
    """weight of the AuxK dead-latent loss"""
    dead_tokens: int = 50_000
    """a latent silent for this many tokens is dead"""
    linear_init: bool = True
    """initialise skip + bias by least squares on buffer 0 (--nolinear-init or --linear-init false: random init)"""
    seed: int = 0
    """seed for init, window order and shuffles"""
    corpus: str = "default"
    """corpus name or folder of .txt files"""
    checkpoint_every: int = 50
    """steps between checkpoints"""
    out: str = ""
    """output folder (empty: the user cache's coders/...)"""

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokens", parse_tokens(self.tokens))  # "2M" → 2_000_000, before validation
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.skip not in ("auto", "yes", "no"):
            raise ValueError(f"skip must be auto, yes or no, got {self.skip!r}")
        for name in ("width", "k", "tokens", "window", "batch_size", "buffer_windows", "buffer_passes",
                     "checkpoint_every", "dead_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.k > self.width:
            raise ValueError(f"k={self.k} exceeds width={self.width}")
        if self.lr <= 0 or self.auxk_alpha < 0 or self.lr_warmup < 0:
            raise ValueError("lr must be positive; auxk_alpha and lr_warmup non-negative")
        if not 0 <= self.lr_decay <= 1:
            raise ValueError(f"lr_decay is a share of the steps, in [0, 1], got {self.lr_decay}")
        if (self.buffer_windows * self.window) % self.batch_size:
            raise ValueError(f"a buffer ({self.buffer_windows} windows × {self.window} tokens) must split into whole "
                             f"batches of {self.batch_size} tokens")
        Site(self.sae_site, max(self.layer, 0))  # validates the site kind

    @property
    def sites(self) -> tuple[str, str]:
        return coder_sites(self.kind, self.layer, self.sae_site)

    @property
    def use_skip(self) -> bool:
        return self.skip == "yes" or (self.skip == "auto" and self.kind == "transcoder")

    @property
    def steps_per_buffer(self) -> int:
        return self.buffer_windows * self.window // self.batch_size * self.buffer_passes

    @property
    def total_steps(self) -> int:
        """Optimiser steps: every one of ``tokens`` model tokens is seen ``buffer_passes`` times."""
        return max(1, self.tokens // self.batch_size) * self.buffer_passes

    def lr_at(self, step: int) -> float:
        """The learning rate of 0-based optimiser step ``step``: warm-up, constant, then the linear decay."""
        warm = min(1.0, (step + 1) / max(1, self.lr_warmup))
        decay_steps = round(self.lr_decay * self.total_steps)
        decay = min(1.0, (self.total_steps - step) / decay_steps) if decay_steps else 1.0
        return self.lr * warm * decay

    def resumable_changes(self) -> tuple[str, ...]:
        """Fields that may differ between an interrupted run and its resumption without changing the result: a
        decaying learning rate ends at ``tokens``, so then the token count shapes every step after the decay starts."""
        return tuple(name for name in _RESUMABLE_CHANGES if not (name == "tokens" and self.lr_decay))

    def output_folder(self) -> Path:
        """``out``, else a cache folder of its own for every set of result-shaping settings (so a changed default
        trains a new coder beside the old one instead of refusing the old folder)."""
        if self.out:
            return Path(self.out)
        folder = coder_folder(self.model, self.sites[0], self.kind, self.width, self.k)
        return folder.with_name(f"{folder.name}-{self.settings_digest()}")

    def settings_digest(self) -> str:
        """A digest of the settings that shape the trained coder (not the resumable ones)."""
        shaping = {k: v for k, v in asdict(self).items() if k not in self.resumable_changes()}
        return digest(json.dumps(shaping, sort_keys=True), length=8)


def coder_folder(model: str, read_site: str, kind: str, width: int, k: int) -> Path:
    """Where trained coders are cached: ``cache_dir()/coders/<model>/<read_site>[-sae]-w<width>-k<k>``."""
    suffix = "" if kind == "transcoder" else f"-{kind}"
    return cache_dir() / "coders" / model / f"{read_site}{suffix}-w{width}-k{k}"


# ---- activation stream -------------------------------------------------------------------------------------
@torch.inference_mode()
def site_activations(model, tokens: Tensor, read_site: str, write_site: str, chunk: int = 32
                     ) -> tuple[Float[Tensor, "n d_in"], Float[Tensor, "n d_out"]]:
    """Activations at the read and write sites for every token, running the model only up to that layer."""
    read_hook, write_hook = resolve(model, read_site), resolve(model, write_site)
    xs, ys = [], []
    for start in range(0, tokens.shape[0], chunk):
        cache = capture(model, tokens[start:start + chunk], [read_hook, write_hook])
        xs.append(cache[read_hook].reshape(-1, cache[read_hook].shape[-1]).float())
        ys.append(cache[write_hook].reshape(-1, cache[write_hook].shape[-1]).float())
    return torch.cat(xs), torch.cat(ys)


class ActivationStream:
    """Deterministic buffers of shuffled (x, y) token activations; buffer b is a pure function of (seed, b).

    Under several ranks, each computes only its share of every buffer's windows (``ranks.share``)."""

    def __init__(self, model, tokens: Tensor, cfg: TrainConfig, ranks: Ranks = SINGLE_PROCESS):
        if tokens.shape[0] < cfg.buffer_windows:
            raise ValueError(f"only {tokens.shape[0]} training windows, fewer than one buffer of {cfg.buffer_windows}")
        self.model, self.tokens, self.cfg, self.ranks = model, tokens, cfg, ranks
        self._orders: dict[int, Tensor] = {}
        self._last: tuple[int, Tensor, Tensor] | None = None  # the initialisation reuses buffer 0 in the loop

    def _order(self, epoch: int) -> Tensor:
        if epoch not in self._orders:
            gen = torch.Generator().manual_seed(self.cfg.seed * 7919 + epoch)
            self._orders = {epoch: torch.randperm(self.tokens.shape[0], generator=gen)}
        return self._orders[epoch]

    def buffer(self, index: int) -> tuple[Tensor, Tensor]:
        if self._last is not None and self._last[0] == index:
            return self._last[1], self._last[2]
        per_epoch = self.tokens.shape[0] // self.cfg.buffer_windows  # drop the ragged tail of each epoch
        epoch, slot = divmod(index, per_epoch)
        ids = self._order(epoch)[slot * self.cfg.buffer_windows:(slot + 1) * self.cfg.buffer_windows]
        ids = self.ranks.share(ids)
        x, y = site_activations(self.model, self.tokens[ids], *self.cfg.sites)
        self._last = (index, x, y)
        return x, y

    def init_buffer(self) -> tuple[Tensor, Tensor]:
        """The last buffer of the first epoch: short runs never train on it, so the step losses that follow the
        least-squares initialisation are honest held-out numbers rather than in-sample fits."""
        return self.buffer(self.tokens.shape[0] // self.cfg.buffer_windows - 1)

    def step_order(self, index: int, n_tokens: int) -> Tensor:
        """Token order for all passes over this rank's share of buffer ``index``, concatenated."""
        # each rank its own order, so the ranks' batches do not draw the same window positions; one process: as ever
        seed = (self.cfg.seed * 104_729 + index) * self.ranks.world + self.ranks.rank
        gen = torch.Generator().manual_seed(seed)
        return torch.cat([torch.randperm(n_tokens, generator=gen) for _ in range(self.cfg.buffer_passes)])


# ---- the training state ------------------------------------------------------------------------------------
@dataclass
class TrainState:
    coder: SparseCoder
    optimizer: torch.optim.Adam
    step: int = 0
    since_fired: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    seconds: float = 0.0
    x_scale: float = 1.0
    y_scale: float = 1.0
    """The coder trains on x / x_scale → y / y_scale (unit-size coordinates, so Adam's step size means the
    same at every site and model); :meth:`exported` folds the scales back into the weights."""

    def to_dict(self, cfg: TrainConfig) -> dict:
        return {"cfg": asdict(cfg), "coder": self.coder.state_dict(), "optimizer": self.optimizer.state_dict(),
                "step": self.step, "since_fired": self.since_fired, "seconds": self.seconds,
                "x_scale": self.x_scale, "y_scale": self.y_scale}

    @torch.no_grad()
    def exported(self) -> SparseCoder:
        """A copy of the coder that maps raw activations to raw activations (TopK is scale-invariant)."""
        out = SparseCoder(self.coder.cfg).to(module_device(self.coder))
        out.load_state_dict(self.coder.state_dict())
        ratio = self.y_scale / self.x_scale
        out.encoder.weight.mul_(ratio)  # latent values absorb y_scale; decoder rows stay unit-norm
        out.encoder.bias.mul_(self.y_scale)
        out.b_dec.mul_(self.y_scale)
        if out.W_skip is not None:
            out.W_skip.mul_(ratio)
        return out


def new_state(cfg: TrainConfig, d_in: int, d_out: int, model_name: str, device: torch.device) -> TrainState:
    """A fresh coder on ``device`` (the model's: it trains on the activations where they are computed)."""
    read_site, write_site = cfg.sites
    coder_cfg = CoderConfig(d_in=d_in, d_out=d_out, n_latents=cfg.width, k=cfg.k, skip=cfg.use_skip, kind=cfg.kind,
                            read_site=read_site, write_site=write_site, model=model_name)
    coder = SparseCoder(coder_cfg, seed=cfg.seed).to(device)  # initialised on the CPU: the same weights anywhere
    optimizer = torch.optim.Adam(coder.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    return TrainState(coder, optimizer, since_fired=torch.zeros(cfg.width, dtype=torch.long, device=device))


def save_state(folder: Path, cfg: TrainConfig, state: TrainState) -> None:
    io.torch_save(folder / STATE_FILE, state.to_dict(cfg))
    save_coder(state.exported(), folder)


def load_state(folder: Path, cfg: TrainConfig, fresh: TrainState, saved: dict) -> TrainState:
    """Restore ``fresh`` from ``saved`` (``folder/train_state.pt``), refusing a state trained under another config."""
    _check_same_settings(folder, cfg, saved["cfg"], "a run")
    fresh.coder.load_state_dict(saved["coder"])
    fresh.optimizer.load_state_dict(saved["optimizer"])
    return TrainState(fresh.coder, fresh.optimizer, saved["step"], saved["since_fired"].to(fresh.since_fired.device),
                      saved["seconds"], saved["x_scale"], saved["y_scale"])


# ---- one optimiser step ------------------------------------------------------------------------------------
@dataclass
class StepMetrics:
    loss: float
    fvu: float
    auxk: float
    l0: float
    dead_fraction: float


def auxk_loss(coder: SparseCoder, raw: Tensor, error: Tensor, dead: Tensor, total_variance: Tensor) -> Tensor:
    """The top dead latents' reconstruction of the (detached) error, as in Gao et al. 2024 appendix B.1.

    It uses the encoder output *before* ReLU: a dead latent's ReLU output is zero on every token, so a loss on
    it would have no gradient and could never revive the latent.
    """
    n_dead = int(dead.sum())
    if n_dead == 0:
        return raw.new_zeros(())
    k_aux = min(coder.cfg.d_out // 2, n_dead)
    scale = min(n_dead / (coder.cfg.d_out // 2), 1.0)
    values, indices = torch.where(dead, raw, raw.new_tensor(-torch.inf)).topk(k_aux, dim=-1, sorted=False)
    error_hat = coder.decode_sparse(values, indices)
    return scale * (error_hat - error.detach()).pow(2).sum() / total_variance


def train_step(state: TrainState, cfg: TrainConfig, x: Tensor, y: Tensor,
               ranks: Ranks = SINGLE_PROCESS) -> StepMetrics:
    """One optimiser step on this rank's ``x → y`` tokens; under several ranks, on the mean of their gradients."""
    coder = state.coder
    raw = coder.encoder_out(x)
    top = coder.topk(torch.relu(raw))
    error = y - (coder.decode(top) + coder.skip(x))
    total_variance = (y - y.mean(0)).pow(2).sum().clamp_min(1e-12)
    fvu = error.pow(2).sum() / total_variance
    dead = state.since_fired >= cfg.dead_tokens
    aux = auxk_loss(coder, raw, error, dead, total_variance) if cfg.auxk_alpha > 0 else fvu.new_zeros(())
    loss = fvu + cfg.auxk_alpha * aux
    for group in state.optimizer.param_groups:
        group["lr"] = cfg.lr_at(state.step)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    # every exchange between ranks happens before the weights change: a rank that fails or is interrupted in one
    # leaves its state at the last finished step, which is what an interrupted run saves
    ranks.average_gradients(coder)
    fired = ranks.any_rank(_fired(state.since_fired, top.indices, top.values))
    metrics = _step_metrics(ranks, loss, fvu, aux, (top.values > 0).sum(-1).float().mean(), dead.float().mean())
    _remove_parallel_decoder_grad(coder)
    state.optimizer.step()
    coder.normalize_decoder()
    _update_firing(state, fired, x.shape[0] * ranks.world)
    return metrics


def _step_metrics(ranks: Ranks, *values: Tensor) -> StepMetrics:
    """Loss, FVU, AuxK, L0 and dead fraction, averaged over the ranks (one all-reduce for the five)."""
    return StepMetrics(*ranks.mean(torch.stack([v.detach() for v in values])).tolist())


@torch.no_grad()
def _remove_parallel_decoder_grad(coder: SparseCoder) -> None:
    """Keep the step tangent to the unit sphere of each decoder row (renormalising then corrects little)."""
    if coder.W_dec.grad is None:
        return
    parallel = (coder.W_dec.grad * coder.W_dec).sum(-1, keepdim=True)
    coder.W_dec.grad.sub_(parallel * coder.W_dec)


@torch.no_grad()
def _fired(since_fired: Tensor, indices: Tensor, values: Tensor) -> Tensor:
    """Which latents fired on at least one token of the batch."""
    fired = torch.zeros_like(since_fired, dtype=torch.bool)
    fired[indices[values > 0]] = True
    return fired


@torch.no_grad()
def _update_firing(state: TrainState, fired: Tensor, n_tokens: int) -> None:
    state.since_fired += n_tokens
    state.since_fired[fired] = 0


@torch.no_grad()
def linear_init(coder: SparseCoder, x: Tensor, y: Tensor, ridge: float = 0.1, latent_scale: float = 0.1) -> None:
    """Start from the best affine map and latents of the right size.

    b_dec (and W_skip) come from ridge least squares, so the latents only have to learn the rest. The
    encoder is then rescaled so the latents' initial output is ``latent_scale`` × the typical residual norm:
    a default-initialised encoder can be orders of magnitude off (random model: far too large; SmolLM2's
    small MLP inputs against large outputs: too small), which wastes the first hundreds of steps.
    """
    y_mean = y.mean(0)
    coder.b_dec.copy_(y_mean)
    prediction = y_mean.expand_as(y)
    if coder.W_skip is not None:
        xc, yc = (x - x.mean(0)).double(), (y - y_mean).double()
        gram = xc.T @ xc
        gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        w = torch.linalg.solve(gram, xc.T @ yc).float()  # [d_in, d_out]
        coder.W_skip.copy_(w.T)
        coder.b_dec.copy_(y_mean - x.mean(0) @ w)
        prediction = coder.skip(x) + coder.b_dec
    residual_norm = (y - prediction).norm(dim=-1).mean()
    latent_norm = coder.decode_sparse(*coder.encode(x)).norm(dim=-1).mean()
    if latent_norm > 0:
        factor = latent_scale * residual_norm / latent_norm
        coder.encoder.weight.mul_(factor)
        coder.encoder.bias.mul_(factor)


# ---- the loop ------------------------------------------------------------------------------------------------
def _training_tokens(model, cfg: TrainConfig, windows) -> Tensor:
    if windows is None:
        from nl_rewrite.data.windows import token_windows
        from nl_rewrite.model.loading import prepend_bos_for

        windows = token_windows(model, "train", corpus=cfg.corpus, window=cfg.window,
                                prepend_bos=prepend_bos_for(cfg.model))
    tokens = windows.tokens if hasattr(windows, "tokens") else windows
    if tokens.ndim != 2 or tokens.shape[1] != cfg.window:
        raise ValueError(f"training windows must be [n, {cfg.window}] token ids, got {tuple(tokens.shape)}")
    return tokens


def _start_state(model, cfg: TrainConfig, folder: Path) -> TrainState:
    read_site, write_site = cfg.sites
    d_in, d_out = site_width(model, read_site), site_width(model, write_site)
    from nl_rewrite.model.loading import model_name

    fresh = new_state(cfg, d_in, d_out, model_name(model), module_device(model))
    saved = io.read_cached(folder / STATE_FILE, _read_state, "training state")
    if saved is None:
        return fresh
    try:
        state = load_state(folder, cfg, fresh, saved)
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as exc:  # wrong shapes, a wrong layout
        log.warning("training state %s does not fit this coder (%s); training from step 0", folder / STATE_FILE, exc)
        # load_state may have changed ``fresh`` part-way
        return new_state(cfg, d_in, d_out, model_name(model), module_device(model))
    log.info("resuming %s at step %d", folder, state.step)
    return state


def _read_state(path: Path) -> dict:
    saved = torch.load(path, weights_only=True, map_location="cpu")  # saved on a GPU, resumed anywhere
    missing = {"cfg", "coder", "optimizer", "step", "since_fired", "seconds", "x_scale", "y_scale"} - set(saved)
    if missing:
        raise ValueError(f"no {', '.join(sorted(missing))}")
    return saved


def _append_log(folder: Path, rows: list[dict]) -> None:
    if rows:
        with open(folder / LOG_FILE, "a") as fh:
            fh.writelines(json.dumps(row) + "\n" for row in rows)


def _buffer_batches(stream: ActivationStream, cfg: TrainConfig, start_step: int) -> Iterator[tuple[int, Tensor, Tensor]]:
    """(step, x, y) from ``start_step`` on; a buffer interrupted midway is recomputed and its done steps skipped.

    Each rank's batch is its ``1 / world`` of the step's ``batch_size`` tokens."""
    spb, batch = cfg.steps_per_buffer, cfg.batch_size // stream.ranks.world
    for buffer_index in range(start_step // spb, (cfg.total_steps + spb - 1) // spb):
        x, y = stream.buffer(buffer_index)
        order = stream.step_order(buffer_index, x.shape[0])
        for j in range(spb):
            step = buffer_index * spb + j
            if step < start_step:
                continue
            if step >= cfg.total_steps:
                return
            rows = order[j * batch:(j + 1) * batch]
            yield step, x[rows], y[rows]


def train(cfg: TrainConfig, model=None, windows=None, on_step: Callable[[int, StepMetrics], None] | None = None,
          progress: bool = True, placement: Placement = Placement()) -> SparseCoder:
    """Train (or resume, or just load if finished) the coder ``cfg`` describes; returns it.

    ``windows``: a ``TokenWindows`` or a ``[n, window]`` token tensor (default: the corpus train split).
    ``on_step(step, metrics)`` is called after every step. On KeyboardInterrupt the last finished step is
    saved before the interrupt propagates, so rerunning resumes without losing work.

    Under ``torchrun`` every rank calls this with the same arguments (see the module docstring); each returns the
    same coder, and rank 0 writes the folder. The coder trains and is returned on ``model``'s device, or, without a
    model, on ``placement``'s (under torchrun, ``cuda`` is each rank's own GPU, and NCCL joins the ranks).
    """
    folder = cfg.output_folder()
    if model is None:
        check_layer_before_loading(cfg.model, cfg.layer)
        placement = Placement(str(rank_device(placement.torch_device)), placement.dtype)
    device = module_device(model) if model is not None else placement.torch_device
    if _finished(folder, cfg):
        coder = io.read_cached(folder, load_coder, "trained coder")
        if coder is not None:
            return coder.to(device)
        (folder / DONE_FILE).unlink(missing_ok=True)  # re-exported from the training state, or trained again
    with ranks_from_env(str(device)) as ranks:  # gloo on the CPU, NCCL on GPUs
        return _train_on_ranks(cfg, ranks, folder, model, placement, windows, on_step, progress)


def _train_on_ranks(cfg: TrainConfig, ranks: Ranks, folder: Path, model, placement: Placement, windows,
                    on_step: Callable[[int, StepMetrics], None] | None, progress: bool) -> SparseCoder:
    check_divisible(ranks.world, batch_size=cfg.batch_size, buffer_windows=cfg.buffer_windows)
    with ranks.main_first():  # rank 0 converts the model and tokenises the corpus into the cache; the rest read it
        model = _loaded(model, cfg, placement)
        tokens = _training_tokens(model, cfg, windows)
    folder.mkdir(parents=True, exist_ok=True)
    stream = ActivationStream(model, tokens, cfg, ranks)
    state = _start_state(model, cfg, folder)
    if state.step == 0:  # every rank initialises from the whole buffer, as one process would
        _initialise(state, cfg, *(ranks.gather_rows(part) for part in stream.init_buffer()))
    _agree_on_start(state, ranks)
    _run_steps(state, cfg, stream, folder, on_step, progress)
    if ranks.is_main:
        _finish(state, cfg, folder, ranks.world)
    ranks.barrier()  # no rank leaves before the folder is complete
    return state.exported()


def _loaded(model, cfg: TrainConfig, placement: Placement):
    """The model given, or ``cfg.model`` loaded where ``placement`` says."""
    if model is not None:
        return model
    from nl_rewrite.model.loading import load_model

    return load_model(cfg.model, placement)


def _agree_on_start(state: TrainState, ranks: Ranks) -> None:
    """Every rank starts from rank 0's weights and scales (they should already agree; this makes it certain)."""
    ranks.copy_from_main(state.coder)
    state.x_scale, state.y_scale = ranks.float_from_main(state.x_scale), ranks.float_from_main(state.y_scale)


def _initialise(state: TrainState, cfg: TrainConfig, x: Tensor, y: Tensor) -> None:
    """From the first buffer: activation scales (an SAE's input and output share one) and the linear init."""
    state.x_scale = float(x.norm(dim=-1).mean() / x.shape[-1] ** 0.5)
    state.y_scale = state.x_scale if cfg.kind == "sae" else float(y.norm(dim=-1).mean() / y.shape[-1] ** 0.5)
    if cfg.linear_init:
        linear_init(state.coder, x / state.x_scale, y / state.y_scale)


def _run_steps(state: TrainState, cfg: TrainConfig, stream: ActivationStream, folder: Path,
               on_step: Callable[[int, StepMetrics], None] | None, progress: bool) -> None:
    ranks = stream.ranks
    pending: list[dict] = []
    bar = tqdm(total=cfg.total_steps, initial=state.step, desc=f"train {cfg.kind} {cfg.sites[0]}",
               disable=not (progress and ranks.is_main), unit="step")
    started = time.perf_counter() - state.seconds
    try:
        for step, x, y in _buffer_batches(stream, cfg, state.step):
            metrics = train_step(state, cfg, x / state.x_scale, y / state.y_scale, ranks)
            state.step, state.seconds = step + 1, time.perf_counter() - started
            pending.append({"step": state.step, "tokens": state.step * cfg.batch_size // cfg.buffer_passes,
                            **asdict(metrics)})
            bar.update(1)
            bar.set_postfix(fvu=f"{metrics.fvu:.3f}", l0=f"{metrics.l0:.0f}", dead=f"{metrics.dead_fraction:.2f}",
                            refresh=False)
            if on_step is not None:
                on_step(state.step, metrics)
            if state.step % cfg.checkpoint_every == 0:
                pending = _checkpoint(folder, cfg, state, pending, ranks)
    except KeyboardInterrupt:
        _checkpoint(folder, cfg, state, pending, ranks)  # state.step counts only finished steps: resuming is exact
        raise
    finally:
        bar.close()
    _checkpoint(folder, cfg, state, pending, ranks)


def _checkpoint(folder: Path, cfg: TrainConfig, state: TrainState, pending: list[dict], ranks: Ranks) -> list[dict]:
    """Rank 0 saves the state and appends the pending log rows (the ranks hold the same state); returns no rows."""
    if ranks.is_main:
        save_state(folder, cfg, state)
        _append_log(folder, pending)
    return []


def _finished(folder: Path, cfg: TrainConfig) -> bool:
    """A finished run of this config with at least as many steps (a longer request resumes it)."""
    if not is_checkpoint(folder):
        return False
    done = io.read_cached(folder / DONE_FILE, _read_done, "training summary")
    if done is None:
        return False
    _check_same_settings(folder, cfg, done["config"], "a coder")
    return done["steps"] >= cfg.total_steps


def _check_same_settings(folder: Path, cfg: TrainConfig, saved: dict, what: str) -> None:
    """Refuse to resume or reuse ``folder`` when it was trained under settings that change the coder."""
    saved = {**_LEGACY_SETTINGS, **saved}
    differing = sorted(k for k, v in asdict(cfg).items() if k not in cfg.resumable_changes() and saved.get(k) != v)
    if differing:
        raise CheckpointError(f"{folder} holds {what} trained with different settings ({', '.join(differing)}); "
                              "pass another --out or delete the folder")


def _read_done(path: Path) -> dict:
    done = io.read_json(path)
    if not (isinstance(done, dict) and isinstance(done.get("config"), dict) and isinstance(done.get("steps"), int)):
        raise ValueError("no config and steps")
    return done


TAIL_METRICS = ("fvu", "l0", "dead_fraction")


def _log_tail(folder: Path, n: int = 20) -> list[dict]:
    """The training log's last ``n`` rows (none when the log cannot be read: it only feeds the summary)."""
    rows = io.read_cached(folder / LOG_FILE, lambda p: [json.loads(line) for line in p.read_text().splitlines()[-n:]],
                          "training log")
    return [r for r in rows or [] if isinstance(r, dict) and all(isinstance(r.get(k), float) for k in TAIL_METRICS)]


def _finish(state: TrainState, cfg: TrainConfig, folder: Path, world: int = 1) -> None:
    rows = _log_tail(folder)
    tail = {key: sum(r[key] for r in rows) / len(rows) for key in TAIL_METRICS} if rows else {}
    summary = {"complete": True, "steps": state.step, "tokens": state.step * cfg.batch_size // cfg.buffer_passes,
               "seconds": round(state.seconds, 1), "final_train_metrics_last20": tail, "config": asdict(cfg)}
    if world > 1:  # a single process's summary stays exactly as it always was
        summary["world_size"] = world
    io.write_json(folder / DONE_FILE, summary)


def default_transcoder(model_name: str = "smollm2-135m", layer: int = DEFAULT_LAYER, model=None) -> SparseCoder:
    """The cached default transcoder (width 4096, k 32) for ``model_name``'s MLP ``layer``; trains it if absent."""
    return default_coder(model_name, layer, model=model)


def default_coder(model_name: str = "smollm2-135m", layer: int = DEFAULT_LAYER, model=None, kind: Kind = "transcoder",
                  sae_site: SiteKind = "resid_post") -> SparseCoder:
    """The cached default coder (width 4096, k 32, the same training budget) of either kind; trains it if absent."""
    cfg = TrainConfig(model=model_name, layer=layer, kind=kind, sae_site=sae_site, **DEFAULT_CODER_RECIPE)
    return train(cfg, model=model)
