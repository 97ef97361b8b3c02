"""The trained simulator on a tiny random base model: training, checkpoints, prefix reuse, the leak check."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import make_coder, make_windows

from nl_rewrite.errors import CheckpointError
from nl_rewrite.interp.simulate import SimulationItem
from nl_rewrite.latents.cache import LatentCache
from nl_rewrite.model.loading import TINY_HF
from nl_rewrite.trained.data import DataConfig, LeakError, build_data, split_documents
from nl_rewrite.trained.training import (TrainSimulatorConfig, Trainer, TrainingInterrupted, load_simulator,
                                         read_weights, train_simulator)
from nl_rewrite.trained.data import Item, SimulatorData

CFG = TrainSimulatorConfig(base_model=TINY_HF, n_layers=2, steps=6, batch_size=4, eval_every=3, val_items=16,
                           lr=3e-3, windows_per_latent=2)


@pytest.fixture(scope="module")
def explain_cache(tiny, tmp_path_factory):
    windows = make_windows(n=60, window=10)
    cache = LatentCache.build(tiny, make_coder(), windows, tmp_path_factory.mktemp("cache"), shard_windows=20,
                              progress=False)
    return cache, windows.doc_ids


def test_documents_split_whole_documents():
    doc_ids = [f"d{i // 3}" for i in range(30)]
    train, heldout = split_documents(doc_ids, 0.2, seed=0)
    assert sorted(train + heldout) == list(range(30)) and heldout
    assert not {doc_ids[w] for w in train} & {doc_ids[w] for w in heldout}


def test_data_is_balanced_and_disjoint(explain_cache):
    cache, doc_ids = explain_cache
    data = build_data(cache, doc_ids, DataConfig(windows_per_latent=2))
    assert data.train_items and data.val_items
    assert not set(data.train_latents) & set(data.val_latents)
    assert {i.window for i in data.train_items} <= set(data.train_windows)
    assert {i.window for i in data.val_items} <= set(data.val_windows)
    for latent in data.train_latents[:10]:
        windows = [i.window for i in data.train_items if i.latent == latent]
        firing = set(cache.activations(latent)[0].tolist())
        active = sum(w in firing for w in windows)
        assert active >= 1 and len(windows) - active <= active  # as many silent windows as firing ones, at most


def test_training_refuses_a_heldout_latent(explain_cache):
    cache, doc_ids = explain_cache
    data = build_data(cache, doc_ids, DataConfig())
    with pytest.raises(LeakError, match="held-out latent"):
        build_data(cache, doc_ids, DataConfig(), train_latents=data.train_latents[:2] + data.val_latents[:1])
    with pytest.raises(LeakError, match="held-out latent"):
        dataclasses.replace(data, train_items=data.train_items + [Item(data.val_latents[0], data.train_windows[0],
                                                                       "lexical", "x")])


def test_loss_goes_down(explain_cache, tmp_path):
    cache, doc_ids = explain_cache
    cfg = dataclasses.replace(CFG, steps=40, eval_every=40)
    trainer = Trainer(cfg, build_data(cache, doc_ids, cfg), cache, tmp_path, "k")
    items = trainer.batch_items(0) + trainer.batch_items(1)

    def loss() -> float:
        with torch.no_grad():
            out, truth, _ = trainer.forward(items)
            return float(trainer.net.loss(out, truth))

    before = loss()
    trainer.run(progress=False)
    assert loss() < 0.8 * before
    assert (tmp_path / "log.jsonl").read_text().count("\n") == 1


def test_save_load_round_trip(explain_cache, tmp_path):
    cache, doc_ids = explain_cache
    trained = train_simulator(CFG, cache, doc_ids, tmp_path, progress=False)
    loaded = load_simulator(tmp_path)
    windows = [cache.token_strings(cache.window_tokens(w)) for w in range(5)]
    assert loaded.identity == trained.identity
    a, b = trained.simulate_windows({3: "x", 7: 'Fires on "a" (9).'}, windows), loaded.simulate_windows(
        {3: "x", 7: 'Fires on "a" (9).'}, windows)
    assert all(torch.equal(a[k], b[k]) for k in a) and a[7].shape == (5, 10)


def test_prefix_reuse_equals_full_pass(explain_cache, tmp_path):
    cache, doc_ids = explain_cache
    cfg = dataclasses.replace(CFG, steps=3)
    sim = train_simulator(cfg, cache, doc_ids, tmp_path, progress=False)
    items = [SimulationItem('Fires on "e" (9), " t" (4).', tuple(cache.token_strings(cache.window_tokens(w))))
             for w in range(7)]
    reused = sim.simulate_many(items)
    sim.reuse_prefix = False
    full = sim.simulate_many(items)
    assert max(float((a - b).abs().max()) for a, b in zip(reused, full)) < 1e-4
    assert float(torch.stack(reused).std()) > 0  # the trained head varies by token: equality is not trivial


def test_resume_after_interrupt_gives_the_same_weights(explain_cache, tmp_path):
    cache, doc_ids = explain_cache
    train_simulator(CFG, cache, doc_ids, tmp_path / "straight", progress=False)

    def interrupt(step: int) -> None:
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted, match="step 4 of 6"):
        train_simulator(CFG, cache, doc_ids, tmp_path / "broken", progress=False, on_step=interrupt)
    train_simulator(CFG, cache, doc_ids, tmp_path / "broken", progress=False)
    straight, resumed = read_weights(tmp_path / "straight"), read_weights(tmp_path / "broken")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_corrupt_checkpoint_is_a_clear_error(explain_cache, tmp_path):
    cache, doc_ids = explain_cache
    train_simulator(dataclasses.replace(CFG, steps=1), cache, doc_ids, tmp_path, progress=False)
    (tmp_path / "simulator.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="retrain"):
        load_simulator(tmp_path)


def test_train_simulator_cli_refuses_cuda_without_a_gpu(capsys, monkeypatch):
    from nl_rewrite.cli.main import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["train-simulator", "--preset", "smoke", "--device", "cuda"]) != 0
    assert "sees no CUDA device; use --device cpu" in capsys.readouterr().err


def test_bad_training_requests_are_clear_errors(explain_cache, tmp_path):
    cache, doc_ids = explain_cache
    with pytest.raises(ValueError, match="no training items"):
        build_data(cache, doc_ids, DataConfig(), train_latents=[])
    data = build_data(cache, doc_ids, DataConfig())
    silent = sorted(set(range(cache.n_latents)) - set(data.train_latents) - set(data.val_latents))
    with pytest.raises(ValueError, match="no lexical explanation or never fire"):
        build_data(cache, doc_ids, DataConfig(), train_latents=data.train_latents[:1] + silent[:1])
    sim = train_simulator(dataclasses.replace(CFG, steps=1), cache, doc_ids, tmp_path, progress=False)
    with pytest.raises(ValueError, match="different lengths"):
        sim.simulate_windows({1: "x"}, [("a", "b"), ("a",)])


def test_calibration_uses_windows_the_simulator_never_trained_on(explain_cache, tmp_path):
    from nl_rewrite.pipeline.config import RunConfig
    from nl_rewrite.pipeline.experiment import trained_calibration_windows
    from nl_rewrite.pipeline.trained_arm import check_trained_simulator

    cache, doc_ids = explain_cache
    sim = train_simulator(dataclasses.replace(CFG, steps=1), cache, doc_ids, tmp_path, progress=False)
    data = build_data(cache, doc_ids, CFG)
    cfg = RunConfig(preset="smoke", trained_calib_windows=4, lexical_calib_windows=8).resolved()
    chosen = trained_calibration_windows(cfg, sim, cache)
    assert len(chosen) == 4 and set(chosen) <= set(data.val_windows)
    assert set(load_simulator(tmp_path).heldout[1]) == set(data.val_windows)
    check_trained_simulator(str(tmp_path))
    with pytest.raises(CheckpointError, match="neither none, default nor a checkpoint folder"):
        check_trained_simulator("Default")
