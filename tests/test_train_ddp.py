"""``nl-rewrite train`` under ``torchrun --nproc_per_node 2`` (gloo, CPU): equivalent to one process, and resumable.

The model is a tiny random Llama saved as a HF folder and the corpus a folder of seeded pseudo-text, so the torchrun
workers load both by path exactly as a user's command would. Two processes do not reproduce one process bit for
bit (each rank normalises its FVU by its own half batch's variance, and shuffles its own share), so the two coders
are compared by FVU on held-out activations (the corpus eval split), within :data:`FVU_TOLERANCE`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import torch

from nl_rewrite.coders.checkpoint import load_coder
from nl_rewrite.coders.distributed import Ranks, backend_for, check_divisible
from nl_rewrite.coders.sparse_coder import SparseCoder
from nl_rewrite.coders.train import DONE_FILE, STATE_FILE, TrainConfig, site_activations, train

FVU_TOLERANCE = 0.02
"""Largest accepted |FVU(2 ranks) − FVU(1 process)| on held-out activations (absolute). Measured on this setup:
0.0890 (1 process) vs 0.0892 (2 ranks), see docs/scaling.md, "Distributed training"; 0.02 leaves room for other
CPUs' float rounding."""
TORCHRUN_TIMEOUT = 240  # seconds; a hung rendezvous fails the test instead of hanging the suite
WORDS = ("the", "state", "union", "people", "nation", "congress", "we", "will", "work", "future", "year", "law",
         "and", "of", "to", "a", "in", "for", "our", "is")


def write_corpus(folder: Path, n_docs: int = 10, words_per_doc: int = 500) -> Path:
    """Seeded pseudo-English documents: eight land in the train split, one each in explain and eval."""
    rng = random.Random(0)
    folder.mkdir()
    for i in range(n_docs):
        text = " ".join(rng.choice(WORDS) for _ in range(words_per_doc))
        (folder / f"doc{i:02d}.txt").write_text(text + ".\n")
    return folder


def write_tiny_model(folder: Path) -> Path:
    from nl_rewrite.model.loading import tiny_hf

    hf, tokenizer = tiny_hf(n_layers=2, d_model=32, d_mlp=64, seed=0)
    hf.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def ddp_cfg(model: Path, corpus: Path, out: Path, **changes) -> TrainConfig:
    """250 steps of 128 tokens on the tiny model's MLP 1 (a few seconds per process)."""
    base = dict(model=str(model), layer=1, width=64, k=4, tokens=128 * 250, window=16, batch_size=128,
                buffer_windows=64, lr_warmup=10, dead_tokens=2000, corpus=str(corpus), checkpoint_every=50,
                out=str(out))
    return TrainConfig(**{**base, **changes})


def cli_options(cfg: TrainConfig) -> list[str]:
    """The ``nl-rewrite train`` options that rebuild ``cfg``."""
    options = []
    for name, value in asdict(cfg).items():
        if isinstance(value, bool):
            options.append(f"--{name}" if value else f"--no-{name.replace('_', '-')}")
        else:
            options += [f"--{name}", str(value)]
    return options


def torchrun_train(cfg: TrainConfig, cache: Path) -> dict:
    """``torchrun --standalone --nproc_per_node 2 -m nl_rewrite.cli train …`` (the documented command); its summary."""
    env = {**os.environ, "NL_REWRITE_CACHE": str(cache), "OMP_NUM_THREADS": "1"}  # two workers, two cores
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "nl_rewrite.cli", "train", *cli_options(cfg), "--no-progress"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT)
    assert done.returncode == 0, f"torchrun failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return json.loads((Path(cfg.out) / DONE_FILE).read_text())


@dataclass(frozen=True)
class Setup:
    model: Path
    corpus: Path
    cache: Path
    root: Path


@dataclass(frozen=True)
class Trained:
    setup: Setup
    single: SparseCoder
    ddp: SparseCoder
    ddp_summary: dict


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    root = tmp_path_factory.mktemp("ddp")
    return Setup(write_tiny_model(root / "tiny-llama"), write_corpus(root / "corpus"), root / "cache", root)


@pytest.fixture(scope="module")
def trained(setup: Setup) -> Trained:
    """One in-process single-process run and one 2-rank torchrun run of the same config."""
    with pytest.MonkeyPatch.context() as patch:  # the module-scoped fixture cannot use the monkeypatch fixture
        patch.setenv("NL_REWRITE_CACHE", str(setup.cache))
        single = train(ddp_cfg(setup.model, setup.corpus, setup.root / "single"), progress=False)
    summary = torchrun_train(ddp_cfg(setup.model, setup.corpus, setup.root / "ddp"), setup.cache)
    return Trained(setup, single, load_coder(setup.root / "ddp"), summary)


@torch.no_grad()
def held_out_fvu(coder: SparseCoder, setup: Setup) -> float:
    """FVU on the tiny model's MLP 1 activations over the corpus eval split (never trained on)."""
    from nl_rewrite.data.windows import token_windows
    from nl_rewrite.model.loading import load_model

    model = load_model(str(setup.model))
    windows = token_windows(model, "eval", corpus=str(setup.corpus), window=16)
    x, y = site_activations(model, windows.tokens, "mlp_in.1", "mlp_out.1")
    return float((coder(x) - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


def test_two_ranks_train_a_coder_equivalent_to_one_process(trained: Trained):
    assert trained.ddp_summary["world_size"] == 2 and trained.ddp_summary["steps"] == 250
    assert trained.ddp_summary["tokens"] == 128 * 250  # the global batch stays batch_size tokens
    fvu_single, fvu_ddp = held_out_fvu(trained.single, trained.setup), held_out_fvu(trained.ddp, trained.setup)
    print(f"held-out FVU: one process {fvu_single:.4f}, two ranks {fvu_ddp:.4f}")
    assert fvu_single < 0.6, "the single-process coder did not learn; the comparison would mean nothing"
    assert abs(fvu_ddp - fvu_single) < FVU_TOLERANCE
    torch.testing.assert_close(trained.ddp.W_dec.norm(dim=-1), torch.ones(64))
    log = [json.loads(line) for line in (trained.setup.root / "ddp" / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == list(range(1, 251)), "rank 0 alone writes the log, once per step"


def test_two_rank_run_resumes_under_two_ranks_exactly_and_under_one(trained: Trained, monkeypatch):
    """Stopped after 100 steps (a smaller token budget) and continued with the full one under two ranks: the same
    coder as the uninterrupted 2-rank run, bit for bit. Continued by one process instead: it finishes, with an FVU
    as good (one process then reads the whole of each buffer, so the last 150 steps differ)."""
    setup, out = trained.setup, trained.setup.root / "ddp-resumed"
    first = torchrun_train(ddp_cfg(setup.model, setup.corpus, out, tokens=128 * 100), setup.cache)
    assert first["steps"] == 100 and torch.load(out / STATE_FILE, weights_only=True)["step"] == 100
    shutil.copytree(out, setup.root / "ddp-then-single")
    torchrun_train(ddp_cfg(setup.model, setup.corpus, out), setup.cache)
    resumed = load_coder(out)
    for name, tensor in trained.ddp.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name

    monkeypatch.setenv("NL_REWRITE_CACHE", str(setup.cache))
    single_after = train(ddp_cfg(setup.model, setup.corpus, setup.root / "ddp-then-single"), progress=False)
    assert json.loads((setup.root / "ddp-then-single" / DONE_FILE).read_text())["steps"] == 250
    assert abs(held_out_fvu(single_after, setup) - held_out_fvu(trained.single, setup)) < FVU_TOLERANCE


def test_division_over_ranks_is_checked():
    check_divisible(2, batch_size=128, buffer_windows=64)
    with pytest.raises(ValueError, match="batch_size=129 does not split over 2 processes"):
        check_divisible(2, batch_size=129)
    assert backend_for("cpu") == "gloo"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="NCCL"):
            backend_for("cuda:0")


def test_ranks_share_windows_and_one_process_keeps_everything():
    items = torch.arange(8)
    assert torch.equal(Ranks().share(items), items)
    assert Ranks(1, 2).share(items).tolist() == [1, 3, 5, 7]
    assert torch.cat([Ranks(r, 2).share(items) for r in range(2)]).sort().values.tolist() == list(range(8))
