import copy
import logging

import pytest
import torch

from nl_rewrite.interp.calibrate import LinearCalibrator, QuantileCalibrator
from nl_rewrite.interp.window_rows import WindowRows
from nl_rewrite.replacements.base import BatchInfo
from nl_rewrite.replacements.coders import TranscoderReplacement
from nl_rewrite.errors import MissingSimulationError
from nl_rewrite.replacements.simulated import NLSimulatorReplacement
from nl_rewrite.coders.sparse_coder import CoderConfig, SparseCoder

N_LATENTS, K, POS = 48, 4, 6


@pytest.fixture(scope="module")
def coder(tiny):
    cfg = CoderConfig(d_in=32, d_out=32, n_latents=N_LATENTS, k=K, read_site="mlp_in.1", write_site="mlp_out.1",
                      model="tiny")
    return SparseCoder(cfg, seed=0)


def identity_calibrator() -> LinearCalibrator:
    """Maps a score s in [0, 9] to s itself, so simulated scores can be set to exact activations."""
    return LinearCalibrator().fit_max(9.0)


def real_mlp_input(model, tokens):
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n == "blocks.1.mlp.hook_in")
    return cache["blocks.1.mlp.hook_in"]


def tokens_and_batch(n_windows=3, seed=0):
    tokens = torch.randint(1, 90, (n_windows, POS), generator=torch.Generator().manual_seed(seed))
    return tokens, BatchInfo(tokens=tokens, window_ids=torch.arange(10, 10 + n_windows))


def simulations_from(values_by_window: dict[int, torch.Tensor], latents) -> dict[int, dict[int, torch.Tensor]]:
    """latent → window → scores, from window → [pos, n_latents] dense tensors."""
    return {lat: {w: v[:, lat] for w, v in values_by_window.items()} for lat in latents}


def test_true_activations_as_simulations_reproduce_the_transcoder(tiny, coder):
    tokens, batch = tokens_and_batch()
    x = real_mlp_input(tiny, tokens)
    dense = coder.pre_acts(x).clamp(max=9.0).detach()
    chosen = [0, 5, 17, 40]
    assert dense[..., chosen].max() < 9.0, "the identity calibrator must not clip in this test"
    sims = simulations_from({int(w): dense[i] for i, w in enumerate(batch.window_ids)}, chosen)
    rep = NLSimulatorReplacement(coder, sims, {lat: identity_calibrator() for lat in chosen}, chosen)
    with torch.no_grad():
        with rep.attached(tiny, batch):
            patched = tiny(tokens)
        with TranscoderReplacement(coder).attached(tiny, batch):
            reference = tiny(tokens)
    torch.testing.assert_close(patched, reference)


def test_only_the_chosen_latents_are_overwritten_then_topk_again(tiny, coder, monkeypatch):
    tokens, batch = tokens_and_batch(seed=1)
    x = real_mlp_input(tiny, tokens)
    chosen = [3, 11]
    sims = {lat: {int(w): torch.full((POS,), 9.0) for w in batch.window_ids} for lat in chosen}
    big = LinearCalibrator().fit_max(1000.0)  # 9 → 1000: far above any real latent, so both must be kept
    rep = NLSimulatorReplacement(coder, sims, {lat: big for lat in chosen}, chosen)
    seen = {}
    original_topk = coder.topk

    def spy(dense):
        seen["dense"] = dense.clone()
        return original_topk(dense)

    monkeypatch.setattr(coder, "topk", spy)
    out = rep(x, batch)
    real = coder.pre_acts(x)
    others = [i for i in range(N_LATENTS) if i not in chosen]
    assert (seen["dense"][..., chosen] == 1000.0).all()
    torch.testing.assert_close(seen["dense"][..., others], real[..., others])
    top = original_topk(seen["dense"])
    assert top.indices.shape[-1] == K and set(chosen) <= set(top.indices[0, 0].tolist())
    assert out.shape == (3, POS, 32)


def test_no_chosen_latents_is_the_transcoder(tiny, coder):
    tokens, batch = tokens_and_batch()
    x = real_mlp_input(tiny, tokens)
    rep = NLSimulatorReplacement(coder, {}, {}, [])
    torch.testing.assert_close(rep(x, batch), coder(x))


def test_missing_simulations_are_clear_errors(tiny, coder):
    tokens, batch = tokens_and_batch()
    x = real_mlp_input(tiny, tokens)
    only_two = {7: {10: torch.zeros(POS), 11: torch.zeros(POS)}, 8: {10: torch.zeros(POS)}}
    rep = NLSimulatorReplacement(coder, only_two, {7: identity_calibrator(), 8: identity_calibrator()}, [7, 8])
    assert rep.window_ids == [10]
    with pytest.raises(MissingSimulationError, match="window 11 .*latent"):
        rep(x, batch)
    with pytest.raises(MissingSimulationError, match="no simulations"):
        NLSimulatorReplacement(coder, only_two, {9: identity_calibrator()}, [9])
    with pytest.raises(MissingSimulationError, match="no calibrator"):
        NLSimulatorReplacement(coder, only_two, {7: identity_calibrator()}, [7, 8])
    with pytest.raises(ValueError, match="out of range"):
        NLSimulatorReplacement(coder, only_two, {}, [N_LATENTS + 1])


def test_wrong_window_length_is_a_shape_error(tiny, coder):
    tokens, batch = tokens_and_batch(n_windows=1)
    x = real_mlp_input(tiny, tokens)
    rep = NLSimulatorReplacement(coder, {2: {10: torch.zeros(POS + 1)}}, {2: identity_calibrator()}, [2])
    with pytest.raises(Exception, match="positions per window"):
        rep(x, batch)


def test_nan_simulations_become_zero_counted_and_logged(tiny, coder, caplog):
    scores = torch.tensor([1.0, float("nan"), 2.0, float("nan"), 0.0, 0.0])
    with caplog.at_level(logging.WARNING, logger="nl_rewrite.replacements.simulated"):
        rep = NLSimulatorReplacement(coder, {2: {10: scores}}, {2: identity_calibrator()}, [2])
    assert rep.nan_values == 2 and "2 simulated values were NaN" in caplog.text
    assert torch.isfinite(rep._table[10]).all()


def test_quantile_calibrated_simulations_run_end_to_end(tiny, coder):
    tokens, batch = tokens_and_batch()
    gen = torch.Generator().manual_seed(0)
    sims = {lat: {int(w): torch.rand(POS, generator=gen) * 9 for w in batch.window_ids} for lat in (1, 2)}
    cal = QuantileCalibrator().fit_distribution(torch.rand(500, generator=gen) * 9, torch.rand(50) + 0.5, 0.2)
    coder = copy.deepcopy(coder)
    with torch.no_grad():  # a nonzero skip path, so the expected output below must include it
        coder.W_skip.copy_(0.1 * torch.randn(coder.W_skip.shape, generator=gen))
    rep = NLSimulatorReplacement(coder, sims, {1: cal, 2: cal}, [1, 2])
    with torch.no_grad(), rep.attached(tiny, batch):
        logits = tiny(tokens)

    # by hand: calibrate the scores, overwrite latents 1 and 2, TopK over all latents, decode, add b_dec and skip
    with torch.no_grad():
        x = real_mlp_input(tiny, tokens)
        dense = coder.pre_acts(x).clone()
        for latent in (1, 2):
            dense[..., latent] = torch.stack([cal(sims[latent][int(w)]) for w in batch.window_ids])
        values, indices = dense.topk(K, dim=-1)
        out = (values[..., None] * coder.W_dec[indices]).sum(-2) + coder.b_dec + x @ coder.W_skip.T
        expected = tiny.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_mlp_out", lambda act, hook: out)])
        transcoder = TranscoderReplacement(coder)
        with transcoder.attached(tiny, batch):
            plain = tiny(tokens)
    assert ((indices == 1) | (indices == 2)).any(), "some simulated value must reach the TopK for this test to bite"
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits, plain, atol=1e-6, rtol=0), "the simulations must change the output"


def test_an_sae_on_the_residual_is_rewritten_the_same_way(tiny):
    """The paper's second experiment: an SAE on resid_post.0. True activations as simulations reproduce the SAE's
    reconstruction; the true oracle equals it; zero latents leave only b_dec in the residual stream."""
    from nl_rewrite.replacements.coders import SAEReplacement, ZeroLatentsReplacement
    from nl_rewrite.replacements.oracles import OracleReplacement

    sae = SparseCoder(CoderConfig(d_in=32, d_out=32, n_latents=N_LATENTS, k=K, skip=False, kind="sae",
                                  read_site="resid_post.0", write_site="resid_post.0", model="tiny"), seed=3)
    tokens, batch = tokens_and_batch()
    _, cache = tiny.run_with_cache(tokens, names_filter=lambda n: n == "blocks.0.hook_resid_post")
    dense = sae.pre_acts(cache["blocks.0.hook_resid_post"]).clamp(max=9.0).detach()
    chosen = [1, 7, 30]
    sims = simulations_from({int(w): dense[i] for i, w in enumerate(batch.window_ids)}, chosen)
    replacements = {"simulated": NLSimulatorReplacement(sae, sims, {lat: identity_calibrator() for lat in chosen},
                                                        chosen),
                    "oracle": OracleReplacement(sae, "true"), "sae": SAEReplacement(sae),
                    "zero_latents": ZeroLatentsReplacement(sae)}
    logits = {}
    for name, rep in replacements.items():
        with torch.no_grad(), rep.attached(tiny, batch):
            logits[name] = tiny(tokens)
    with torch.no_grad():
        only_bias = tiny.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_post",
                                                            lambda act, hook: sae.b_dec.expand_as(act).clone())])
    torch.testing.assert_close(logits["simulated"], logits["sae"])
    torch.testing.assert_close(logits["oracle"], logits["sae"])
    torch.testing.assert_close(logits["zero_latents"], only_bias)
    assert not torch.allclose(logits["zero_latents"], logits["sae"])


def test_window_rows_give_the_same_patch_as_one_tensor_per_window(tiny, coder):
    """The lexical arms hand in each latent's windows as one tensor (WindowRows): the same calibrated table, and the
    same patched forward, as a dict of one tensor per window; windows missing for one latent stay incomplete."""
    tokens, batch = tokens_and_batch(n_windows=4)
    scores = torch.rand(4, POS, N_LATENTS, generator=torch.Generator().manual_seed(3)) * 9
    ids = [int(w) for w in batch.window_ids]
    chosen = [1, 7, 30]
    calibrators = {lat: identity_calibrator() for lat in chosen}
    per_window = NLSimulatorReplacement(coder, simulations_from(dict(zip(ids, scores)), chosen), calibrators, chosen)
    position = {w: i for i, w in enumerate(ids)}
    rows = NLSimulatorReplacement(coder, {lat: WindowRows(ids, scores[..., lat], position) for lat in chosen},
                                  calibrators, chosen)
    assert rows.window_ids == per_window.window_ids == sorted(ids)
    with torch.no_grad():
        with per_window.attached(tiny, batch):
            expected = tiny(tokens)
        with rows.attached(tiny, batch):
            got = tiny(tokens)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)

    short = {lat: WindowRows(ids, scores[..., lat]) for lat in chosen}
    short[7] = WindowRows(ids[1:], scores[1:, :, 7])
    partial = NLSimulatorReplacement(coder, short, calibrators, chosen)
    assert partial.window_ids == sorted(ids[1:])
    with pytest.raises(ValueError, match="3 window ids for 4 rows"):
        WindowRows(ids[1:], scores[..., 7])


def test_a_simulated_condition_pickles_in_proportion_to_its_windows(coder):
    """Conditions travel to Ray workers pickled: each window's values must not drag the other windows' along."""
    import pickle

    n_windows, chosen = 16, list(range(N_LATENTS))
    ids = list(range(n_windows))
    scores = torch.rand(n_windows, POS, N_LATENTS, generator=torch.Generator().manual_seed(4)) * 9
    rep = NLSimulatorReplacement(coder, {lat: WindowRows(ids, scores[..., lat]) for lat in chosen},
                                 {lat: identity_calibrator() for lat in chosen}, chosen)
    values_bytes = scores.numel() * 4
    assert len(pickle.dumps(rep)) < 2 * values_bytes + len(pickle.dumps(coder)) + 100_000
