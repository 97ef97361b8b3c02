import json
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch

from nl_rewrite.data.windows import TokenWindows, token_windows
from nl_rewrite.errors import ShapeMismatchError
from nl_rewrite.evaluation.evaluator import EvalResults, Evaluator
from nl_rewrite.evaluation.scoring import (CleanPrediction, LinearUnembedding, token_ce_and_kl,
                                          unembedding_reproduces)
from nl_rewrite.evaluation.stats import bootstrap_indices
from nl_rewrite.replacements import IdentityReplacement, MeanReplacement, Replacement, ZeroReplacement


@pytest.fixture(scope="module")
def windows():
    gen = torch.Generator().manual_seed(0)
    return TokenWindows(torch.randint(1, 90, (10, 12), generator=gen), [f"d{i // 3}" for i in range(10)], "eval")


def test_ce_and_kl_equal_their_definitions_in_float64():
    """The KL is computed without a log-softmax of the patched logits; it must still be KL(clean || patched) to
    float32's precision when it is small, and exactly 0 for the clean logits themselves."""
    gen = torch.Generator().manual_seed(0)
    vocab = 49152  # SmolLM2's: a sum over this many entries is where rounding shows
    clean_logits = 4 * torch.randn(2, 5, vocab, generator=gen) + 2
    targets = torch.randint(0, vocab, (2, 5), generator=gen)
    clean = CleanPrediction.of(clean_logits)
    logp = clean_logits.double().log_softmax(-1)
    nudges = {"noise": lambda z: z + 0.3 * torch.randn(z.shape, generator=gen),
              "shift and scale": lambda z: 0.98 * z + 2, "large": lambda z: z + 3 * torch.randn(z.shape, generator=gen)}
    for name, nudge in nudges.items():  # a replacement moves logits by nats, not only by noise
        patched = nudge(clean_logits)
        ce, kl = token_ce_and_kl(patched, clean, targets)
        logq = patched.double().log_softmax(-1)
        expected_kl = (logp.exp() * (logp - logq)).sum(-1)
        torch.testing.assert_close(kl.double(), expected_kl, rtol=1e-4, atol=2e-6, msg=name)
        torch.testing.assert_close(ce.double(), -logq.gather(-1, targets[..., None]).squeeze(-1), rtol=1e-6, atol=1e-5)
    assert token_ce_and_kl(clean_logits, clean, targets)[1].eq(0).all()
    with pytest.raises(ShapeMismatchError, match="clean pass's own batch"):
        token_ce_and_kl(clean_logits[:, 1:], clean, targets[:, 1:])

def _exact_ce_and_kl(unembedding: LinearUnembedding, clean_hidden, hidden, targets):
    weight, bias = unembedding.weight.double(), unembedding.bias.double()
    logp = (clean_hidden.double() @ weight.T + bias).log_softmax(-1)
    logq = (hidden.double() @ weight.T + bias).log_softmax(-1)
    return -logq.gather(-1, targets[..., None]).squeeze(-1), (logp.exp() * (logp - logq)).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_chunked_unembedding_scores_like_its_logits_in_float64(dtype):
    """From hidden states, a condition is scored through the logit change (h − h_c)·Wᵀ a chunk at a time, never
    writing logits: CE and KL must equal their definitions on the logits h·Wᵀ + b, with logits of a real model's size
    (tens of nats), KLs from 1e-7 to nats, chunk boundaries included, and in bf16 too; the clean states score 0."""
    gen = torch.Generator().manual_seed(1)
    vocab, d = 5000, 24  # several chunks, the last one ragged
    weight = torch.randn(vocab, d, generator=gen).to(dtype)
    unembedding = LinearUnembedding(weight, torch.randn(vocab, generator=gen).to(dtype))
    clean_hidden = (3 * torch.randn(2, 5, d, generator=gen)).to(dtype)  # logits of ±15-40 nats
    targets = torch.randint(0, vocab, (2, 5), generator=gen)
    clean = CleanPrediction.of(clean_hidden, unembedding, chunk=1024)
    for scale in (1e-4, 1e-2, 0.3):
        hidden = (clean_hidden.float() + scale * torch.randn(clean_hidden.shape, generator=gen)).to(dtype)
        ce, kl = token_ce_and_kl(hidden, clean, targets, chunk=1024)
        exact_ce, exact_kl = _exact_ce_and_kl(unembedding, clean_hidden, hidden, targets)
        assert exact_kl.min() < 1e-5 or scale > 1e-4  # the smallest scale does reach the small KLs
        torch.testing.assert_close(kl.double(), exact_kl, rtol=1e-4, atol=1e-8, msg=f"KL at {scale}")
        torch.testing.assert_close(ce.double(), exact_ce, rtol=1e-6, atol=2e-5, msg=f"CE at {scale}")
    assert token_ce_and_kl(clean_hidden, clean, targets)[1].eq(0).all()


def test_a_logit_change_beyond_float32s_exponential_is_scored_in_float64():
    unembedding = LinearUnembedding(torch.eye(4), torch.zeros(4))
    clean_hidden = torch.tensor([[[0.0, 0.0, 0.0, -30.0]]])
    hidden = torch.tensor([[[0.0, 0.0, 0.0, 100.0]]])  # a token of p ≈ 1e-13 gains 130 nats
    targets = torch.tensor([[0]])
    ce, kl = token_ce_and_kl(hidden, CleanPrediction.of(clean_hidden, unembedding), targets)
    exact_ce, exact_kl = _exact_ce_and_kl(unembedding, clean_hidden, hidden, targets)
    assert torch.isfinite(kl).all()
    torch.testing.assert_close(kl.double(), exact_kl, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ce.double(), exact_ce, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("positions", ["all", "last"])
def test_the_evaluator_unembeds_in_chunks_only_where_that_reproduces_the_logits(tiny, windows, positions):
    reps = [ZeroReplacement("mlp_out.1"), IdentityReplacement("mlp_out.1")]

    def both() -> tuple[Evaluator, EvalResults, EvalResults]:
        chunked = Evaluator(tiny, windows, batch_size=4, positions=positions, progress=False)
        from_logits = Evaluator(tiny, windows, batch_size=4, positions=positions, progress=False,
                                chunked_unembedding=False)
        a, b = chunked.run(reps), from_logits.run(reps)
        assert not from_logits.defer_unembedding
        for name in a.conditions:
            np.testing.assert_allclose(a.ce[name], b.ce[name], rtol=0, atol=1e-5)
            np.testing.assert_allclose(a.kl[name], b.kl[name], rtol=1e-4, atol=1e-9)
        return chunked, a, b

    chunked, *_ = both()
    assert chunked.defer_unembedding
    # logits changed after the unembedding (as a soft cap would) are not one linear map of the hidden state: the
    # check finds it, and the cap is scored, as from the logits, not bypassed
    handle = tiny.unembed.register_forward_hook(lambda module, args, out: 5 * torch.tanh(out / 5))
    try:
        assert not unembedding_reproduces(tiny, windows.tokens[:2])
        capped, *_ = both()
        assert not capped.defer_unembedding
    finally:
        handle.remove()


def test_identity_is_exact_and_zero_moves_the_output(tiny, windows):
    res = Evaluator(tiny, windows, batch_size=4, progress=False).run(
        [IdentityReplacement("mlp_out.1"), ZeroReplacement("mlp_out.1")])
    assert abs(res.summaries["identity"].ce_delta) < 1e-5
    assert res.summaries["identity"].kl_mean < 1e-9
    assert res.summaries["zero"].kl_mean > 1e-7  # random init: small MLP outputs
    assert res.summaries["clean"].kl_mean == 0.0
    # the CI is the 2.5/97.5 percentiles of the window-bootstrap means of the per-window CE differences
    deltas = torch.tensor(res.ce["zero"], dtype=torch.double) - torch.tensor(res.ce["clean"], dtype=torch.double)
    means = deltas[bootstrap_indices(len(windows), res.n_bootstrap, res.seed)].mean(1).numpy()
    lo, hi = res.summaries["zero"].ce_delta_ci
    assert (lo, hi) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])), rel=1e-9, abs=1e-12)
    assert lo < res.summaries["zero"].ce_delta < hi


def test_last_position_mode_scores_one_token_per_window(tiny, windows):
    res = Evaluator(tiny, windows, positions="last", progress=False).run([ZeroReplacement("mlp_out.1")])
    assert res.tokens_per_window == 1 and len(res.ce["zero"]) == len(windows)
    # Patching only the second-to-last position must give the same CE as a full forward pass of that patch.
    tokens = windows.tokens
    with torch.no_grad():
        def zero_last(act, hook):
            act = act.clone()
            act[:, -2] = 0
            return act
        logits = tiny.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_mlp_out", zero_last)])
    expected = torch.nn.functional.cross_entropy(logits[:, -2], tokens[:, -1], reduction="none")
    assert torch.allclose(torch.tensor(res.ce["zero"]), expected, atol=1e-5)


class WrongWidth(Replacement):
    def forward(self, x, batch):
        return x[..., :3]


def test_shape_mismatch_is_named_and_hooks_are_removed(tiny, windows):
    with pytest.raises(ShapeMismatchError, match="returned shape"):
        Evaluator(tiny, windows, progress=False).run([WrongWidth("mlp_out.1", name="bad")])
    # hooks detached despite the exception: the model is clean again
    res = Evaluator(tiny, windows, progress=False).run([IdentityReplacement("mlp_out.0")])
    assert abs(res.summaries["identity"].ce_delta) < 1e-6


class CopyRead(Replacement):
    """Writes whatever it read: the identity when it reads its write site, a different model when not."""

    def forward(self, x, batch):
        return x.clone()


def test_reading_another_site(tiny, windows):
    res = Evaluator(tiny, windows, progress=False).run([CopyRead("mlp_out.1", read_site="mlp_in.1", name="from_input"),
                                                        CopyRead("mlp_out.1", name="from_output")])
    assert res.summaries["from_output"].kl_mean < 1e-9  # read its own site: nothing changes
    # the same patch by hand: MLP 1's output replaced by MLP 1's input (both are 32 wide)
    stored = {}

    def read(act, hook):
        stored["x"] = act
        return act

    with torch.no_grad():
        clean = torch.log_softmax(tiny(windows.tokens).double(), -1)[:, :-1]
        hooks = [("blocks.1.mlp.hook_in", read), ("blocks.1.hook_mlp_out", lambda act, hook: stored["x"])]
        patched = tiny.run_with_hooks(windows.tokens, fwd_hooks=hooks)
    patched = torch.log_softmax(patched.double(), -1)[:, :-1]
    expected = (clean.exp() * (clean - patched)).sum(-1).mean(1)
    # a random tiny model's logits are small, so KLs are too: about 1e-5 here, against < 1e-9 reading its own site
    assert expected.min() > 1e-6, "the hand-made patch must move the output for this test to mean anything"
    torch.testing.assert_close(torch.tensor(res.kl["from_input"], dtype=torch.double), expected, atol=1e-9, rtol=2e-2)


def test_mean_replacement_fits_site_mean(tiny, windows):
    rep = MeanReplacement.fit(tiny, windows, "mlp_out.0")
    _, cache = tiny.run_with_cache(windows.tokens, names_filter=lambda n: n == "blocks.0.hook_mlp_out")
    assert torch.allclose(rep.mean, cache["blocks.0.hook_mlp_out"].mean((0, 1)), atol=1e-5)


def test_results_json_round_trip_and_stats(tiny, windows, tmp_path):
    res = Evaluator(tiny, windows, progress=False).run([ZeroReplacement("mlp_out.0"), IdentityReplacement("mlp_out.0")])
    path = tmp_path / "results.json"
    res.to_json(path)
    back = EvalResults.from_json(path)
    assert back.summaries == res.summaries
    assert json.loads(path.read_text())["positions"] == "all"
    frac, (lo, hi) = res.fraction_recovered("identity", worse="zero")
    assert frac == pytest.approx(1.0, abs=1e-4)
    assert res.wilcoxon("identity", "clean") == 1.0
    assert res.wilcoxon("zero", "clean") == pytest.approx(
        scipy.stats.wilcoxon(res.ce["zero"], res.ce["clean"]).pvalue, rel=1e-9)


def test_wilcoxon_is_small_when_every_window_gets_worse():
    gen = torch.Generator().manual_seed(0)
    clean = (4 + torch.rand(20, generator=gen)).tolist()
    worse = [c + 0.01 + 0.1 * float(torch.rand(1, generator=gen)) for c in clean]
    res = EvalResults("all", list(range(20)), {"clean": clean, "worse": worse},
                      {"clean": [0.0] * 20, "worse": [0.1] * 20}, tokens_per_window=5)
    # 20 windows all worse: the exact two-sided signed-rank p-value is 2 / 2**20, whichever way round
    assert res.wilcoxon("worse", "clean") == pytest.approx(2 / 2 ** 20)
    assert res.wilcoxon("clean", "worse") == pytest.approx(2 / 2 ** 20)
    assert res.summaries["worse"].ce_delta_ci[0] > 0.01


def test_duplicate_condition_names_rejected(tiny, windows):
    with pytest.raises(ValueError, match="unique"):
        Evaluator(tiny, windows, progress=False).run([ZeroReplacement("mlp_out.0"), ZeroReplacement("mlp_out.1")])


@pytest.mark.acceptance
def test_real_model_zero_mean_identity(smol, tmp_cache):
    layer = 6
    windows = token_windows(smol, "eval", window=32, max_windows=16)
    mean = MeanReplacement.fit(smol, token_windows(smol, "train", window=32, max_windows=16), f"mlp_out.{layer}")
    res = Evaluator(smol, windows, batch_size=8, progress=False).run(
        [ZeroReplacement(f"mlp_out.{layer}"), mean, IdentityReplacement(f"mlp_out.{layer}")])
    s = res.summaries
    print(res.summary_table())
    assert abs(s["identity"].ce_delta) < 1e-5
    assert s["zero"].ce_delta > 0.02
    assert s["clean"].mean_ce < s["mean"].mean_ce < s["zero"].mean_ce


def test_evaluate_cli_writes_results_and_split_manifest(tmp_cache, tmp_path):
    from nl_rewrite.cli.main import main

    out = tmp_path / "ev"
    assert main(["evaluate", "--model", "tiny-smollm2", "--layer", "1", "--replacement", "zero", "--max-windows", "4",
                 "--window", "16", "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["blocks"]["eval/all"]["summaries"]["zero_mlp"]["kl_mean"] > 0
    assert data["references"] == {"zero_mlp": "zero_mlp"} and data["fingerprint_parts"]["suite"]["name"] == "custom"
    splits = json.loads((out / "splits.json").read_text())["splits"]
    assert not set(splits["eval"]) & set(splits["explain"])


def test_an_evaluation_cut_short_leaves_no_summary_and_compare_says_so(tmp_cache, tmp_path, monkeypatch, capsys):
    """results.json is written last: a full disk on the split manifest leaves a folder compare refuses by name."""
    from nl_rewrite import io
    from nl_rewrite.cli.main import main

    out, write_json = tmp_path / "ev", io.write_json

    def full_on_splits(path, obj):
        if Path(path).name == "splits.json":
            raise io.DiskFullError(28, f"no space left while writing {Path(path).name}")
        write_json(path, obj)

    monkeypatch.setattr(io, "write_json", full_on_splits)
    argv = ["--model", "tiny-smollm2", "--layer", "1", "--replacement", "zero", "--max-windows", "2", "--window", "16"]
    assert main(["evaluate", *argv, "--out", str(out)]) == 2
    assert "no space left while writing splits.json" in capsys.readouterr().err
    assert not (out / "results.json").exists()
    assert main(["compare", str(out), str(out)]) == 2
    assert f"{out} holds no finished evaluation" in capsys.readouterr().err


def test_stacked_conditions_give_the_numbers_of_one_at_a_time(tiny, windows):
    """Conditions stacked along the batch (several sites, groups that do not fill a stack, window-dependent
    replacements) give each condition's CE and KL as evaluating it alone does, in the order given."""
    from helpers import make_coder
    from nl_rewrite.replacements import TranscoderReplacement

    coder = make_coder()
    reps = [ZeroReplacement("mlp_out.1"), TranscoderReplacement(coder, name="tc"),
            *[MeanReplacement("mlp_out.1", torch.full((32,), 0.1 * i), name=f"m{i}") for i in range(4)],
            IdentityReplacement("mlp_out.0")]
    alone = Evaluator(tiny, windows, batch_size=4, progress=False, stack=1).run(reps)
    stacked = Evaluator(tiny, windows, batch_size=4, progress=False, stack=3).run(reps)
    assert stacked.conditions == alone.conditions == ["clean", "zero", "tc", "m0", "m1", "m2", "m3", "identity"]
    for name in alone.conditions:
        assert stacked.ce[name] == pytest.approx(alone.ce[name], abs=1e-5), name
        assert stacked.kl[name] == pytest.approx(alone.kl[name], abs=1e-6), name


def test_stacking_replacements_of_different_sites_is_refused(tiny, windows):
    from nl_rewrite.replacements.base import BatchInfo, attached_together

    batch = BatchInfo(windows.tokens[:2], torch.arange(2))
    with pytest.raises(ValueError, match="share their read and write sites"):
        with attached_together(tiny, [ZeroReplacement("mlp_out.1"), ZeroReplacement("mlp_out.0")], batch):
            pass
    with pytest.raises(ShapeMismatchError, match="repeated once per replacement"):
        with attached_together(tiny, [ZeroReplacement("mlp_out.1"), IdentityReplacement("mlp_out.1")], batch):
            tiny(windows.tokens[:2])


def test_a_replacement_from_a_function_is_the_same_as_its_class(tiny, windows):
    from_fn = [Replacement.from_fn("mlp_out.1", torch.zeros_like, "zero_fn"),
               Replacement.from_fn("mlp_out.1", lambda x: x, "identity_fn"),
               Replacement.from_fn("mlp_out.1", lambda x: 0.5 * x, "half_fn")]
    res = Evaluator(tiny, windows, progress=False).run(
        [ZeroReplacement("mlp_out.1"), IdentityReplacement("mlp_out.1"), *from_fn])
    assert res.ce["zero_fn"] == res.ce["zero"] and res.kl["identity_fn"] == res.kl["identity"]
    assert 0 < res.summaries["half_fn"].kl_mean < res.summaries["zero"].kl_mean
    assert "fn=<lambda>" in repr(from_fn[2]) and from_fn[2].read_site == from_fn[2].write_site
