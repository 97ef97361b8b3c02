"""nl_rewrite.pipeline.conditions: condition names → replacements of one MLP layer, on the tiny model."""

from __future__ import annotations

import pytest
import torch

from nl_rewrite.coders.checkpoint import CheckpointError, CheckpointShapeError, save_coder
from nl_rewrite.coders.sparse_coder import CoderConfig, SparseCoder
from nl_rewrite.data.windows import TokenWindows
from nl_rewrite.errors import SiteError
from nl_rewrite.evaluation.evaluator import Evaluator
from nl_rewrite.pipeline import conditions
from nl_rewrite.pipeline.conditions import CONDITIONS, build_condition
from nl_rewrite.replacements import BatchInfo, IdentityReplacement, MeanReplacement, ZeroReplacement
from nl_rewrite.replacements.coders import RandomLatentsReplacement, TranscoderReplacement, ZeroLatentsReplacement

from helpers import make_coder, make_windows


class CountingLoader:
    """A coder loader that counts its calls (the real one may train a transcoder)."""

    def __init__(self, coder: SparseCoder | None = None) -> None:
        self.coder, self.calls = coder or make_coder(), 0

    def __call__(self) -> SparseCoder:
        self.calls += 1
        return self.coder


@pytest.fixture
def small_train_split(monkeypatch):
    """Mean ablation averages train windows; a few synthetic ones stand in for the tokenised corpus."""
    windows = make_windows(n=6, window=10, seed=5)
    asked = []

    def fake_token_windows(model, split, **kwargs):
        asked.append((split, kwargs))
        return TokenWindows(windows.tokens, windows.doc_ids, split)

    monkeypatch.setattr(conditions, "token_windows", fake_token_windows)
    return windows, asked


def batch_of(x: torch.Tensor) -> BatchInfo:
    tokens = torch.ones(x.shape[:2], dtype=torch.long)
    return BatchInfo(tokens=tokens, window_ids=torch.arange(x.shape[0]))


def test_zero_and_identity_write_the_layers_mlp_output_without_loading_a_coder(tiny):
    loader = CountingLoader()
    zero, identity = (build_condition(name, tiny, 1, loader) for name in ("zero", "identity"))
    assert isinstance(zero, ZeroReplacement) and isinstance(identity, IdentityReplacement)
    assert (zero.name, identity.name) == ("zero_mlp", "identity")
    assert str(zero.write_site) == str(zero.read_site) == "mlp_out.1"
    assert str(build_condition("zero", tiny, 0, loader).write_site) == "mlp_out.0"
    x = torch.randn(2, 5, 32)
    assert torch.equal(zero(x, batch_of(x)), torch.zeros_like(x)) and torch.equal(identity(x, batch_of(x)), x)
    assert loader.calls == 0


def test_mean_is_the_sites_mean_over_seeded_train_windows(tiny, small_train_split):
    windows, asked = small_train_split
    rep = build_condition("mean", tiny, 0, CountingLoader(), seed=3)
    assert isinstance(rep, MeanReplacement) and rep.name == "mean_mlp" and str(rep.write_site) == "mlp_out.0"
    assert asked == [("train", {"max_windows": conditions.MEAN_WINDOWS, "seed": 3})]
    with torch.no_grad():
        _, cache = tiny.run_with_cache(windows.tokens, names_filter="blocks.0.hook_mlp_out")
    torch.testing.assert_close(rep.mean, cache["blocks.0.hook_mlp_out"].mean((0, 1)), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name, cls", [("transcoder", TranscoderReplacement), ("zero_latents", ZeroLatentsReplacement),
                                       ("random_latents", RandomLatentsReplacement)])
def test_coder_conditions_use_the_loaded_coder(tiny, name, cls):
    loader = CountingLoader()
    rep = build_condition(name, tiny, 1, loader, seed=7)
    assert type(rep) is cls and rep.name == name and rep.coder is loader.coder and loader.calls == 1
    assert (str(rep.read_site), str(rep.write_site)) == ("mlp_in.1", "mlp_out.1")
    if name == "random_latents":
        assert rep.seed == 7


def test_an_sae_run_builds_its_conditions_at_the_saes_site(tiny, small_train_split):
    from nl_rewrite.replacements.coders import SAEReplacement

    sae = SparseCoder(CoderConfig(d_in=32, d_out=32, n_latents=16, k=2, skip=False, kind="sae",
                                  read_site="resid_post.1", write_site="resid_post.1"), seed=0)
    reps = {name: build_condition(name, tiny, 1, CountingLoader(sae), site="resid_post.1")
            for name in ("sae", "zero_latents", "zero", "mean")}
    assert type(reps["sae"]) is SAEReplacement and reps["sae"].name == "sae"
    assert [(r.name, str(r.write_site)) for r in reps.values()] == [
        ("sae", "resid_post.1"), ("zero_latents", "resid_post.1"), ("zero_resid_post", "resid_post.1"),
        ("mean_resid_post", "resid_post.1")]
    with pytest.raises(ValueError, match="SAEReplacement needs a coder of kind 'sae'"):
        build_condition("sae", tiny, 1, CountingLoader())  # a transcoder loader


def test_every_listed_condition_builds_and_runs(tiny, small_train_split):
    windows = make_windows(n=4, window=8)
    reps = [build_condition(name, tiny, 1, CountingLoader()) for name in CONDITIONS]
    res = Evaluator(tiny, windows, progress=False).run(reps)
    assert res.conditions == ["clean", "zero_mlp", "mean_mlp", "identity", "transcoder", "zero_latents",
                              "random_latents"]
    assert res.summaries["identity"].kl_mean < 1e-9 < res.summaries["zero_mlp"].kl_mean


def test_coder_path_loads_a_saved_checkpoint(tiny, tmp_path):
    saved = make_coder(seed=4)
    folder = save_coder(saved, tmp_path / "my coder")
    loader = CountingLoader()
    rep = build_condition(f"coder:{folder}", tiny, 1, loader)
    assert isinstance(rep, TranscoderReplacement) and rep.name == f"coder:{folder}" and loader.calls == 0
    for key, value in saved.state_dict().items():
        assert torch.equal(rep.coder.state_dict()[key], value), key


def test_coder_path_errors_name_the_problem(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint folder not found: .*missing"):
        build_condition(f"coder:{tmp_path / 'missing'}", tiny, 1, CountingLoader())
    narrow = SparseCoder(CoderConfig(d_in=16, d_out=16, n_latents=8, k=2, read_site="mlp_in.1",
                                     write_site="mlp_out.1"), seed=0)
    folder = save_coder(narrow, tmp_path / "narrow")
    with pytest.raises(CheckpointShapeError, match="does not fit the model: .*width 16"):
        build_condition(f"coder:{folder}", tiny, 1, CountingLoader())


@pytest.mark.parametrize("name", ["Zero", "zeros", "transcoder ", "", "coder", "mean_mlp"])
def test_unknown_names_are_refused_before_any_coder_is_loaded(tiny, name):
    loader = CountingLoader()
    with pytest.raises(ValueError, match=f"unknown condition {name!r}; valid: zero, mean, identity, transcoder, "
                                         r"zero_latents, random_latents, coder:PATH or MODULE:FACTORY\[:JSON\]"):
        build_condition(name, tiny, 1, loader)
    assert loader.calls == 0


def test_a_layer_the_model_lacks_is_named_when_the_condition_is_used(tiny):
    rep = build_condition("zero", tiny, 5, CountingLoader())
    with pytest.raises(SiteError, match="layer 5 out of range for a model with 2 layers"):
        Evaluator(tiny, make_windows(n=2, window=6), progress=False).run([rep])
