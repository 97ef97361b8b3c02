"""``nl-rewrite train-simulator``: fit the trained simulator, resumably, and load it back.

A checkpoint is a folder: ``cfg.json`` (the :class:`TrainSimulatorConfig`, the step reached, the digest),
``simulator.safetensors`` (the trained layers, final norm and head; the frozen embeddings come from the base model),
``optimizer.pt`` (to resume) and ``log.jsonl`` (train loss; validation loss and per-latent Pearson on held-out
latents × held-out documents). Weights are written before ``cfg.json``, so a complete cfg means complete weights.

Batches are drawn from a generator seeded by (seed, step), so a run interrupted at any step and resumed gives
the same weights as one that never stopped. Ctrl-C saves the last completed step (:class:`TrainingInterrupted`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from nl_rewrite import io
from nl_rewrite.errors import CheckpointError, NLRewriteError
from nl_rewrite.interp.lexical import EXPLAINER_VERSION
from nl_rewrite.latents.cache import LatentCache
from nl_rewrite.llm.embedded import right_padded
from nl_rewrite.trained.data import DataConfig, Item, SimulatorData, build_data, targets
from nl_rewrite.trained.net import InputEncoder, NetConfig, SimulatorNet
from nl_rewrite.trained.simulator import TrainedSimulator
from nl_rewrite.hashing import digest
from nl_rewrite.correlation import pearson

log = logging.getLogger(__name__)
CONFIG_FILE, WEIGHTS_FILE, OPTIMIZER_FILE, LOG_FILE = "cfg.json", "simulator.safetensors", "optimizer.pt", "log.jsonl"


@dataclass(frozen=True)
class TrainSimulatorConfig(NetConfig, DataConfig):
    """Options of nl-rewrite train-simulator: the network's (:class:`NetConfig`), the data's (:class:`DataConfig`)
    and the optimisation's (see docs/trained_simulator.md)."""

    steps: int = 800
    """optimizer steps"""
    batch_size: int = 16
    """(latent, window) items per step"""
    lr: float = 3e-4
    """AdamW learning rate"""
    eval_every: int = 100
    """steps between validations (and checkpoints)"""
    val_items: int = 512
    """held-out items scored at each validation (the first, in a fixed order)"""

    def __post_init__(self) -> None:
        NetConfig.__post_init__(self)
        DataConfig.__post_init__(self)
        for name in ("steps", "batch_size", "eval_every", "val_items"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")

    def key(self, data_fingerprint: str) -> str:
        """Hash of everything that changes the weights: the options and the data they are trained on."""
        return digest(json.dumps([asdict(self), data_fingerprint]), length=12)


class TrainingInterrupted(NLRewriteError):
    """Ctrl-C during training: the last completed step was saved; rerunning resumes from it."""


@dataclass(frozen=True)
class Validation:
    step: int
    loss: float
    pearson_median: float
    pearson_mean: float
    n_latents: int


class Trainer:
    """One training run: net, optimizer, data and the folder it checkpoints to."""

    def __init__(self, cfg: TrainSimulatorConfig, data: SimulatorData, cache: LatentCache, folder: Path,
                 digest_key: str, device: str = "cpu") -> None:
        torch.manual_seed(cfg.seed)
        self.cfg, self.data, self.cache, self.folder, self.key = cfg, data, cache, folder, digest_key
        net, tokenizer = SimulatorNet.from_base(cfg)
        self.net = net.to(device)
        self.encoder = InputEncoder(tokenizer)
        self.optimizer = torch.optim.AdamW([p for p in self.net.parameters() if p.requires_grad], lr=cfg.lr)
        self.step = 0
        folder.mkdir(parents=True, exist_ok=True)
        self._targets: dict[tuple[int, int], Tensor] = {}

    # ---- batches -------------------------------------------------------------------------------------------

    def batch_items(self, step: int) -> list[Item]:
        generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        picks = torch.randint(len(self.data.train_items), (self.cfg.batch_size,), generator=generator)
        return [self.data.train_items[i] for i in picks.tolist()]

    def target(self, item: Item, length: int) -> Float[Tensor, " pos"]:
        key = (item.latent, item.window)
        if key not in self._targets:
            self._targets[key] = targets(self.cache, item, self.data.scale[item.latent], length)
        return self._targets[key]

    def forward(self, items: list[Item]) -> tuple[Float[Tensor, "n out"], Float[Tensor, " n"], list[int]]:
        """Head outputs at every read point of ``items`` (prefix + window, one padded pass), their targets, and
        how many read points each item has."""
        rows, reads, truth = [], [], []
        for item in items:
            prefix = self.encoder.prefix(item.explanation)
            ids, item_reads = self.encoder.window(self.cache.token_strings(self.cache.window_tokens(item.window)))
            rows.append(prefix + ids)
            reads.append([len(prefix) + r for r in item_reads])
            truth.append(self.target(item, len(item_reads)))
        out = self.net(right_padded(rows, self.encoder.fallback_id, self.net.device))
        batch_index = torch.tensor([b for b, r in enumerate(reads) for _ in r])
        positions = torch.tensor([p for r in reads for p in r])
        return out[batch_index, positions], torch.cat(truth).to(self.net.device), [len(r) for r in reads]

    # ---- training ------------------------------------------------------------------------------------------

    def train_step(self) -> float:
        self.net.train()
        out, truth, _ = self.forward(self.batch_items(self.step))
        loss = self.net.loss(out, truth)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.step += 1
        return float(loss)

    def run(self, progress: bool = True, on_step: Callable[[int], None] | None = None) -> None:
        """Train up to ``cfg.steps``, validating and checkpointing every ``eval_every`` steps."""
        from tqdm import tqdm

        bar = tqdm(total=self.cfg.steps, initial=self.step, desc="train simulator", unit="step", disable=not progress)
        recent: list[float] = []
        try:
            while self.step < self.cfg.steps:
                recent = (recent + [self.train_step()])[-20:]
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(recent):.3f}")
                if self.step % self.cfg.eval_every == 0 or self.step == self.cfg.steps:
                    self.checkpoint(float(np.mean(recent)))
                if on_step is not None:
                    on_step(self.step)
        except KeyboardInterrupt:
            self.save()
            raise TrainingInterrupted(f"interrupted at step {self.step} of {self.cfg.steps}; saved to {self.folder}; "
                                      "run the same command again to resume") from None
        finally:
            bar.close()

    def checkpoint(self, train_loss: float) -> None:
        val = self.validate()
        log.info("step %d: train loss %.4f, validation loss %.4f, held-out Pearson median %.3f (%d latents)",
                 self.step, train_loss, val.loss, val.pearson_median, val.n_latents)
        with open(self.folder / LOG_FILE, "a") as fh:
            fh.write(json.dumps({"train_loss": train_loss, **asdict(val), "time": time.time()}) + "\n")
        self.save()

    @torch.no_grad()
    def validate(self) -> Validation:
        """Loss and per-latent Pearson of scores with true activations, on held-out latents × held-out documents."""
        self.net.eval()
        items = self.data.val_items[:self.cfg.val_items]
        losses, by_latent = [], {}
        for start in range(0, len(items), self.cfg.batch_size):
            chunk = items[start:start + self.cfg.batch_size]
            out, truth, counts = self.forward(chunk)
            losses.append(float(self.net.loss(out, truth)) * len(chunk))
            for item, scores, true in zip(chunk, self.net.scores(out).split(counts), truth.split(counts)):
                pairs = by_latent.setdefault(item.latent, ([], []))
                pairs[0].append(scores.cpu())
                pairs[1].append(true.cpu())
        rs = [pearson(torch.cat(s), torch.cat(t)) for s, t in by_latent.values()]
        rs = [r for r in rs if math.isfinite(r)]
        return Validation(self.step, sum(losses) / max(1, len(items)), float(np.median(rs)) if rs else math.nan,
                          float(np.mean(rs)) if rs else math.nan, len(rs))

    # ---- checkpoints ---------------------------------------------------------------------------------------

    def digest(self) -> str:
        return f"{self.key}-s{self.step}"

    def save(self) -> None:
        io.save_tensors(self.folder / WEIGHTS_FILE, self.net.trainable_state())
        io.torch_save(self.folder / OPTIMIZER_FILE, self.optimizer.state_dict())
        io.write_json(self.folder / CONFIG_FILE, {"config": asdict(self.cfg), "step": self.step, "digest": self.digest(),
                                                  "key": self.key, "val_latents": self.data.val_latents,
                                                  "heldout": self.heldout()})

    def resume(self) -> None:
        """Continue from the folder's checkpoint, if it has one."""
        if not (self.folder / CONFIG_FILE).is_file():
            return
        saved = read_checkpoint_config(self.folder)
        if saved["key"] != self.key:
            raise CheckpointError(f"{self.folder} holds a simulator trained with other options or data "
                                  f"(key {saved['key']} ≠ {self.key}); save to another folder (--save-to)")
        self.net.load_state_dict(read_weights(self.folder), strict=False)
        self.optimizer.load_state_dict(torch.load(self.folder / OPTIMIZER_FILE, weights_only=True,
                                                  map_location=self.net.device))
        self.step = int(saved["step"])
        log.info("resuming the simulator in %s from step %d", self.folder, self.step)

    def heldout(self) -> list:
        return [self.cache.meta.windows_fingerprint, self.data.val_windows]

    def simulator(self) -> TrainedSimulator:
        fingerprint, windows = self.heldout()
        return TrainedSimulator(self.net.eval(), self.encoder, self.digest(), heldout=(fingerprint, tuple(windows)))


def read_checkpoint_config(folder: Path) -> dict:
    return io.read_json_object(folder / CONFIG_FILE, CheckpointError, "trained simulator config",
                               "retrain it with nl-rewrite train-simulator (same --out resumes)")


def read_weights(folder: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(folder / WEIGHTS_FILE))
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"cannot read {folder / WEIGHTS_FILE} ({exc}); delete the folder and retrain, or "
                              "point at another checkpoint") from exc


def train_simulator(cfg: TrainSimulatorConfig, cache: LatentCache, doc_ids: list[str], folder: Path | str, *,
                    llm_explanations: dict[int, str] | None = None, device: str = "cpu", progress: bool = True,
                    on_step: Callable[[int], None] | None = None) -> TrainedSimulator:
    """Train (or resume, or reuse a finished run in ``folder``) on the explain split's ``cache``."""
    data = build_data(cache, doc_ids, cfg, llm_explanations)
    trainer = Trainer(cfg, data, cache, Path(folder), cfg.key(data_fingerprint(cache, doc_ids, llm_explanations)),
                      device)
    log.info("trained simulator: %d training items over %d latents, %d validation items over %d held-out latents",
             len(data.train_items), len(data.train_latents), len(data.val_items), len(data.val_latents))
    trainer.resume()
    trainer.run(progress, on_step)
    return trainer.simulator()


def data_fingerprint(cache: LatentCache, doc_ids: list[str], llm_explanations: dict[int, str] | None) -> str:
    # the lexical explainer's version: its texts are the training data
    payload = json.dumps([cache.meta.coder_fingerprint, cache.meta.windows_fingerprint, doc_ids,
                          sorted((llm_explanations or {}).items()), EXPLAINER_VERSION])
    return digest(payload)


def load_simulator(folder: Path | str, device: str = "cpu", batch_size: int = 64) -> TrainedSimulator:
    """A trained simulator from its checkpoint folder."""
    folder = Path(folder)
    saved = read_checkpoint_config(folder)
    try:
        cfg = TrainSimulatorConfig(**saved["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{folder / CONFIG_FILE} has an unusable config ({exc}); retrain the simulator") from exc
    net, tokenizer = SimulatorNet.from_base(cfg)
    missing, unexpected = net.load_state_dict(read_weights(folder), strict=False)
    if unexpected or any(not k.startswith("backbone.embed_tokens.") for k in missing):
        raise CheckpointError(f"{folder / WEIGHTS_FILE} does not match a {cfg.n_layers}-layer {cfg.head} simulator on "
                              f"{cfg.base_model} (missing {missing[:3]}, unexpected {unexpected[:3]}); retrain it")
    if int(saved["step"]) < cfg.steps:
        log.warning("%s was interrupted at step %s of %d: using those weights; run nl-rewrite train-simulator with the "
                    "same options to finish it", folder, saved["step"], cfg.steps)
    fingerprint, windows = saved.get("heldout", ["", []])
    return TrainedSimulator(net.to(device).eval(), InputEncoder(tokenizer), saved["digest"], batch_size=batch_size,
                            heldout=(fingerprint, tuple(windows)))


def heldout_latents(folder: Path | str) -> list[int]:
    """The latents a checkpoint held out for validation (for quality benchmarks on unseen latents)."""
    return list(read_checkpoint_config(Path(folder))["val_latents"])
