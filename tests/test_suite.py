"""Benchmark suites and comparisons on the tiny model: fingerprints, references, paired tests, merging."""

import json

import pytest

from nl_rewrite.evaluation.comparison import (ComparisonError, Run, describe_recovered, load_run, merge_runs,
                                              write_report)
from nl_rewrite.evaluation.suite import Suite, VersusZero, run_suite
from nl_rewrite.replacements import MeanReplacement, ZeroReplacement
from nl_rewrite.replacements.base import Replacement

SUITE = Suite("unit", window=12, windows=5, positions=("all", "last"))


class Halve(Replacement):
    def __init__(self, site="mlp_out.1", name="halve"):
        super().__init__(site, name=name)

    def forward(self, x, batch):
        return x * 0.5


def suite_run(tiny, reps, suite=SUITE, model="tiny"):
    return run_suite(tiny, model, suite, reps, prepend_bos=False, batch_size=4, progress=False)


@pytest.fixture(scope="module")
def halve_run(tiny):
    return suite_run(tiny, [Halve(), Halve("resid_post.0", "halve_resid")])


def test_every_block_has_clean_and_a_zero_reference_per_write_site(halve_run):
    assert list(halve_run.blocks) == ["eval/all", "eval/last", "eval_ood/all", "eval_ood/last"]
    assert halve_run.references == {"halve": "zero@mlp_out.1", "halve_resid": "zero@resid_post.0",
                                    "zero@mlp_out.1": "zero@mlp_out.1", "zero@resid_post.0": "zero@resid_post.0"}
    block = halve_run.blocks["eval/all"]
    assert set(block.conditions) == {"clean", "halve", "halve_resid", "zero@mlp_out.1", "zero@resid_post.0"}
    assert block.summaries["clean"].n_tokens == 5 * 11
    assert halve_run.blocks["eval/last"].summaries["clean"].n_tokens == 5


def test_a_given_zero_ablation_is_reused_as_the_reference(tiny):
    run = suite_run(tiny, [Halve(), ZeroReplacement("mlp_out.1", name="zero_mlp")], Suite("z", ("eval",), 12, 4))
    assert run.references["halve"] == "zero_mlp" and "zero@mlp_out.1" not in run.blocks["eval/all"].conditions


def test_paired_tests_match_the_per_window_numbers(halve_run):
    block = halve_run.blocks["eval/all"]
    tests = halve_run.tests("eval/all")["halve"]
    diff = [a - b for a, b in zip(block.ce["halve"], block.ce["zero@mlp_out.1"])]
    assert tests.vs_zero.ce_diff == pytest.approx(sum(diff) / len(diff))
    lo, hi = tests.vs_zero.ce_diff_ci
    assert lo <= tests.vs_zero.ce_diff <= hi
    assert tests.vs_clean.ce_delta == pytest.approx(block.summaries["halve"].ce_delta)
    recovered = tests.vs_zero.recovered
    assert recovered is None or tests.vs_zero.recovered_ci[0] <= recovered <= tests.vs_zero.recovered_ci[1]


def test_fingerprint_follows_suite_model_and_windows(tiny, halve_run):
    same = suite_run(tiny, [Halve()])
    assert same.fingerprint == halve_run.fingerprint  # replacements are not part of it
    assert suite_run(tiny, [Halve()], model="other").fingerprint != halve_run.fingerprint
    assert suite_run(tiny, [Halve()], Suite("unit", window=12, windows=5, seed=1)).fingerprint != halve_run.fingerprint


def test_results_round_trip_through_json(halve_run, tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(halve_run.to_json()))
    back = load_run(tmp_path).results
    assert back.fingerprint == halve_run.fingerprint and back.tests("eval/last") == halve_run.tests("eval/last")


def test_compare_merges_runs_keeping_shared_conditions_once(tiny, halve_run, tmp_path):
    other = suite_run(tiny, [MeanReplacement("mlp_out.1", mean=_zeros(tiny), name="halve")])  # name clash
    merged, sources = merge_runs([Run("a", halve_run), Run("b", other)])
    names = merged.blocks["eval/all"].conditions
    assert names.count("clean") == 1 and names.count("zero@mlp_out.1") == 1
    assert "halve (b)" in names and sources["halve (b)"] == "b" and merged.references["halve (b)"] == "zero@mlp_out.1"
    assert merged.blocks["eval/all"].ce["halve (b)"] == other.blocks["eval/all"].ce["halve"]
    write_report([Run("a", halve_run), Run("b", other)], tmp_path / "compare")
    text = (tmp_path / "compare.md").read_text()
    assert "| halve (b) | b |" in text and "## eval_ood/last" in text
    assert (tmp_path / "compare.png").stat().st_size > 1000 and "data:image/png" in (tmp_path / "compare.html").read_text()


def _zeros(tiny):
    import torch

    return torch.zeros(tiny.cfg.d_model)


def test_compare_refuses_different_fingerprints_and_says_why(tiny, halve_run):
    other = suite_run(tiny, [Halve()], Suite("unit", window=12, windows=4))
    with pytest.raises(ComparisonError, match=r"a and b are not comparable: suite windows differs: 5 vs 4"):
        merge_runs([Run("a", halve_run), Run("b", other)])


def test_undefined_recovery_is_said_in_words_not_numbers():
    def versus_zero(recovered, ci):
        return VersusZero("zero", 0.1, (0.0, 0.2), 0.1, (0.0, 0.2), 0.5, recovered, ci)

    assert describe_recovered(versus_zero(None, None)).startswith("undefined")
    assert describe_recovered(versus_zero(0.5, (0.25, 0.75))) == "50% [25%, 75%]"


def test_load_run_errors_name_the_fix(tmp_path):
    with pytest.raises(ComparisonError, match="holds no finished evaluation .*; run `nl-rewrite evaluate --out"):
        load_run(tmp_path)
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(ComparisonError, match="not valid JSON"):
        load_run(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"summaries": {}}))
    with pytest.raises(ComparisonError, match="no suite fingerprint"):
        load_run(tmp_path)


@pytest.mark.parametrize("breakage, message", [
    (lambda d: d.pop("references"), "references: Field required"),
    (lambda d: d["blocks"]["eval/all"]["ce"].update(halve="high"), r"blocks.eval/all.ce.halve: Input should be a "
                                                                   "valid list"),
    (lambda d: d["blocks"]["eval/last"].pop("window_ids"), "blocks.eval/last.window_ids: Field required"),
])
def test_load_run_refuses_an_ill_typed_file_naming_the_field(halve_run, tmp_path, breakage, message):
    data = json.loads(json.dumps(halve_run.to_json()))
    breakage(data)
    (tmp_path / "results.json").write_text(json.dumps(data))
    with pytest.raises(ComparisonError, match=f"results.json as evaluation results is not valid: {message}.*; run "
                                              f"`nl-rewrite evaluate --out"):
        load_run(tmp_path)
