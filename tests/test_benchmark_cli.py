"""Benchmarking a user's replacement from the CLI (on the tiny model: this is plumbing): same numbers as in Python,
comparable runs merged, different suites refused."""

import json
import textwrap

import pytest

from nl_rewrite.cli.main import main

PLUGIN = '''
from nl_rewrite.replacements import Replacement


class Scaled(Replacement):
    def __init__(self, layer, scale):
        super().__init__(f"mlp_out.{layer}", name=f"scaled{scale:g}")
        self.scale = scale

    def forward(self, x, batch):
        return x * self.scale


def make(layer, scale=0.5):
    return Scaled(layer, scale)
'''


def test_a_plugin_benchmarked_from_the_cli_matches_python_and_runs_compare(tmp_cache, tmp_path, capsys):
    from nl_rewrite.data.windows import token_windows
    from nl_rewrite.evaluation.evaluator import Evaluator
    from nl_rewrite.evaluation.suite import SUITES
    from nl_rewrite.model.loading import TINY_SMOLLM2, load_model, prepend_bos_for

    plugin = tmp_path / "scaled.py"
    plugin.write_text(textwrap.dedent(PLUGIN))
    runs = {name: tmp_path / name for name in ("half", "most", "custom", "cmp")}
    common = ["evaluate", "--suite", "smoke", "--model", TINY_SMOLLM2, "--layer", "1"]
    assert main([*common, "--replacement", f'{plugin}:make:{{"scale": 0.5}}', "--replacement", "zero",
                 "--out", str(runs["half"])]) == 0
    assert main([*common, "--replacement", f'{plugin}:make:{{"scale": 0.9}}', "--out", str(runs["most"])]) == 0

    data = json.loads((runs["half"] / "results.json").read_text())
    suite = SUITES["smoke"]
    model = load_model(TINY_SMOLLM2)
    windows = token_windows(model, "eval_ood", window=suite.window, max_windows=suite.windows, seed=suite.seed,
                            prepend_bos=prepend_bos_for(TINY_SMOLLM2))
    exec(textwrap.dedent(PLUGIN), namespace := {})
    python = Evaluator(model, windows, positions="last", progress=False).run([namespace["Scaled"](1, 0.5)])
    cli = data["blocks"]["eval_ood/last"]
    assert cli["ce"]["scaled0.5"] == pytest.approx(python.ce["scaled0.5"], abs=1e-5)
    assert cli["kl"]["scaled0.5"] == pytest.approx(python.kl["scaled0.5"], abs=1e-6)
    assert data["references"]["scaled0.5"] == "zero_mlp"  # the zero it was given is its reference
    assert (runs["half"] / "results.md").read_text().count("| scaled0.5 |") == 4  # one row per block

    assert main(["compare", str(runs["half"]), str(runs["most"]), "--out", str(runs["cmp"])]) == 0
    table = (runs["cmp"] / "compare.md").read_text()
    assert "| scaled0.5 |" in table and "| scaled0.9 |" in table and "| zero@mlp_out.1 |" in table
    assert (runs["cmp"] / "compare.png").exists() and (runs["cmp"] / "compare.html").exists()

    assert main(["evaluate", "--model", TINY_SMOLLM2, "--layer", "1", "--replacement", "zero", "--window", "16",
                 "--max-windows", "6",
                 "--out", str(runs["custom"])]) == 0
    capsys.readouterr()
    assert main(["compare", str(runs["half"]), str(runs["custom"])]) == 2
    err = capsys.readouterr().err
    assert "not comparable" in err and "suite name differs: 'smoke' vs 'custom'" in err


def test_a_bad_spec_fails_before_the_model_loads(tmp_path, capsys):
    assert main(["evaluate", "--replacement", "mod:"]) == 2
    assert "is not MODULE:FACTORY[:JSON]" in capsys.readouterr().err
    assert main(["evaluate", "--suite", "huge"]) == 2
    assert "unknown suite 'huge'; valid: standard, smoke" in capsys.readouterr().err
