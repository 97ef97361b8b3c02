import json

import pytest
import torch

from nl_rewrite.data.windows import TokenWindows, token_windows
from nl_rewrite.errors import ShapeMismatchError
from nl_rewrite.evaluation.evaluator import EvalResults, Evaluator
from nl_rewrite.replacements import IdentityReplacement, MeanReplacement, Replacement, ZeroReplacement


@pytest.fixture(scope="module")
def windows():
    gen = torch.Generator().manual_seed(0)
    return TokenWindows(torch.randint(1, 90, (10, 12), generator=gen), [f"d{i // 3}" for i in range(10)], "eval")


def test_identity_is_exact_and_zero_moves_the_output(tiny, windows):
    res = Evaluator(tiny, windows, batch_size=4, progress=False).run(
        [IdentityReplacement("mlp_out.1"), ZeroReplacement("mlp_out.1")])
    assert abs(res.summaries["identity"].ce_delta) < 1e-5
    assert res.summaries["identity"].kl_mean < 1e-9
    assert res.summaries["zero"].kl_mean > 1e-7  # random init: small MLP outputs
    assert res.summaries["clean"].kl_mean == 0.0
    lo, hi = res.summaries["zero"].ce_delta_ci
    assert lo <= res.summaries["zero"].ce_delta <= hi


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


def test_reading_another_site(tiny, windows):
    class MlpFromInput(Replacement):
        def forward(self, x, batch):
            return torch.zeros_like(x) + x.mean()

    rep = MlpFromInput("mlp_out.1", read_site="mlp_in.1", name="from_input")
    res = Evaluator(tiny, windows, progress=False).run([rep])
    assert res.summaries["from_input"].kl_mean > 0


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
    assert 0 <= res.wilcoxon("zero", "clean") <= 1


def test_duplicate_condition_names_rejected(tiny, windows):
    with pytest.raises(ValueError, match="unique"):
        Evaluator(tiny, windows, progress=False).run([ZeroReplacement("mlp_out.0"), ZeroReplacement("mlp_out.1")])


@pytest.mark.slow
def test_real_model_zero_mean_identity(smol, tmp_cache):
    layer = 6
    windows = token_windows(smol, "eval", window=32, max_windows=16)
    mean = MeanReplacement.fit(smol, token_windows(smol, "train", window=32, max_windows=16), f"mlp_out.{layer}")
    res = Evaluator(smol, windows, batch_size=8, progress=False).run(
        [ZeroReplacement(f"mlp_out.{layer}"), mean, IdentityReplacement(f"mlp_out.{layer}")])
    s = res.summaries
    print(res.table())
    assert abs(s["identity"].ce_delta) < 1e-5
    assert s["zero"].ce_delta > 0.02
    assert s["clean"].mean_ce < s["mean"].mean_ce < s["zero"].mean_ce


@pytest.mark.slow
def test_evaluate_cli_writes_results_and_split_manifest(tmp_cache, tmp_path):
    from nl_rewrite.cli.main import main

    out = tmp_path / "ev"
    assert main(["evaluate", "--layer", "6", "--replacement", "zero", "--max-windows", "4", "--window", "16",
                 "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["summaries"]["zero_mlp"]["kl_mean"] > 0
    splits = json.loads((out / "splits.json").read_text())["splits"]
    assert not set(splits["eval"]) & set(splits["explain"])
