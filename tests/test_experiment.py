"""End to end: `nl-rewrite run --preset smoke` on the real embedded model (the shared acceptance run), and the SAE and
trained-simulator variants on the tiny plumbing run (``helpers.TINY_RUN``)."""

import json
import shutil
import time
import tomllib

import pytest
from jaxtyping import TypeCheckError

from helpers import SMOKE_RUN, TINY_RUN
from nl_rewrite.cli.main import main
from nl_rewrite.latents.cache import LatentCache
from nl_rewrite.pipeline.results import load_results
from nl_rewrite.pipeline.config import RunConfig

OUTPUTS = ("results.json", "results.csv", "ladder.png", "fractions.png", "budgets.png", "report.html", "manifest.json",
           "config.toml")


def test_run_config_rejects_bad_fraction():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        RunConfig(preset="smoke", fractions=(0.5, 1.5))


def test_run_config_rejects_unknown_preset(capsys):
    # the tests' runtime type check rejects the Literal first; without it, RunConfig's own ValueError does
    with pytest.raises((ValueError, TypeCheckError), match="smoke"):
        RunConfig(preset="huge")
    assert main(["run", "--preset", "huge"]) == 2
    assert "invalid choice: 'huge'" in capsys.readouterr().err


def test_cli_reports_bad_fraction_without_traceback(capsys):
    assert main(["run", "--preset", "smoke", "--fractions", "2.0"]) == 2
    assert "fractions must lie in [0, 1]" in capsys.readouterr().err


@pytest.mark.acceptance
def test_smoke_run_end_to_end_and_cached_rerun(smoke_run, monkeypatch):
    out = smoke_run.out
    monkeypatch.setenv("NL_REWRITE_CACHE", str(smoke_run.cache))
    for name in OUTPUTS:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    data = smoke_run.results
    load_results(out)
    assert list(data["modes"]) == ["all"]
    all_pos = data["modes"]["all"]["conditions"]
    for name in ("oracle", "binary_oracle", "lexical", "noisy_r0.5", "lexical_b3", "lexical_f0.1", "binary_oracle_f0.1"):
        assert name in all_pos, name
    assert all_pos["transcoder"]["mean_ce"] < all_pos["zero_mlp"]["mean_ce"]
    assert abs(all_pos["oracle"]["mean_ce"] - all_pos["transcoder"]["mean_ce"]) < 1e-5, "true oracle = transcoder"
    pool = data["pool_run"]
    for kind in ("linear", "quantile", "isotonic"):
        assert f"sim_{kind}_f1" in pool["conditions"]
    assert data["counts"]["explained_ok"] + data["counts"]["explanations_failed"] == data["counts"]["pool"]
    assert data["counts"]["lexical_explained"] == data["pool"]["n_latents"]
    assert data["answer"] and "gap zero-latents − transcoder" in data["answer"][0]
    for name, info in data["conditions_info"].items():
        if name.startswith("noisy_r"):
            assert abs(info["pearson"] - float(name[len("noisy_r"):])) < 0.2, (name, info["pearson"])
    assert len(data["generations"]) == 3 and len(data["generations"][0]["continuations"]) == 4
    html = (out / "report.html").read_text()
    assert html.index("The answer") < html.index("ladder.png")
    resolved = RunConfig(preset="smoke", position_modes=("all",), out=str(out)).resolved()
    assert RunConfig.from_toml(out / "config.toml") == resolved
    assert json.loads((out / "manifest.json").read_text())["config"] == tomllib.loads((out / "config.toml").read_text())

    assert main(["generate", "--config", str(out / "config.toml"), "--prompt", "The Congress shall",
                 "--new-tokens", "3"]) == 0

    start = time.perf_counter()
    assert main([*SMOKE_RUN, "--out", str(out)]) == 0
    rerun_s = time.perf_counter() - start
    again = json.loads((out / "results.json").read_text())
    assert again["counts"]["new_calls"] == 0, "a cached rerun must not call the LLM again"
    assert again["modes"]["all"]["conditions"] == data["modes"]["all"]["conditions"]
    assert again["answer"] == data["answer"]
    print(f"cached rerun took {rerun_s:.1f}s")
    assert rerun_s < 60


def test_an_sae_on_the_residual_stream_end_to_end(tmp_cache, tmp_path):
    """The paper's second experiment end to end on the tiny model: an SAE on resid_post.1 through cache,
    explanations, simulation, calibration and patching, with the SAE's own baselines."""
    out = tmp_path / "sae_run"
    # one position mode, half the eval windows and a pool of 2: every kind of stage still runs
    assert main(["run", *TINY_RUN, "--coder", "sae", "--position-modes", "all", "--eval-windows", "4", "--pool", "2",
                 "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert load_results(out).settings.coder == "sae"
    conds = data["modes"]["all"]["conditions"]
    for name in ("sae", "zero_latents", "zero_resid_post", "mean_resid_post", "random_latents", "oracle", "lexical"):
        assert name in conds, name
    assert "transcoder" not in conds and "zero_mlp" not in conds
    assert abs(conds["oracle"]["mean_ce"] - conds["sae"]["mean_ce"]) < 1e-5, "true oracle = the SAE"
    assert data["answer"][0].startswith("The gap zero-latents − sae")
    assert "the SAE on resid_post.1" in (out / "report.html").read_text()
    assert data["config"]["coder"] == "sae" and "sae" in data["stage_seconds"]


def test_the_trained_simulator_added_to_a_finished_run(tiny_run, tmp_path, monkeypatch):
    """Adding --trained-simulator to a finished run trains a (tiny) simulator on its explain split and evaluates only
    the trained block: every latent read by it on the first eval windows, beside the lexical reader and the oracles."""
    out = tmp_path / "run"
    shutil.copytree(tiny_run.out, out)
    monkeypatch.setenv("NL_REWRITE_CACHE", str(tiny_run.cache))
    argv = ["run", *TINY_RUN, "--out", str(out), "--trained-simulator", "default", "--trained.steps", "4",
            "--trained.base_model", "tiny-smollm2", "--trained.n_layers", "1", "--trained.eval_every", "2",
            "--trained.batch_size", "4", "--trained-eval-windows", "2", "--trained-calib-windows", "2"]
    assert main(argv) == 0
    data = json.loads((out / "results.json").read_text())
    assert load_results(out).trained_run is not None
    trained = data["trained_run"]
    assert trained["n_windows"] == 2
    for name in ("transcoder", "zero_latents", "zero_mlp", "lexical", "oracle", "binary_oracle", "trained"):
        assert name in trained["conditions"], name
    assert abs(trained["conditions"]["oracle"]["mean_ce"] - trained["conditions"]["transcoder"]["mean_ce"]) < 1e-5
    assert trained["conditions_info"]["trained"]["fraction_of_latents"] > 0.5
    assert "trained" in trained["recovery"] and any("trained simulator" in line for line in data["answer"])
    assert data["modes"]["all"]["conditions"] == tiny_run.results["modes"]["all"]["conditions"]
    assert not any(k.startswith("evaluate_eval_all") for k in data["stage_seconds"]), "the main block was re-evaluated"
    assert "Trained simulator at 100% of latents" in (out / "report.html").read_text()
    stored = list((out / "simulations" / "trained").rglob("latent_*.safetensors"))
    alive = len(LatentCache.open(out / "latents").stats.alive())
    assert alive > 0 and len(stored) == alive, "every latent that fired on explain is read through the simulation store"


def test_the_tiny_runs_results_load_and_redraw_unchanged(tiny_run, tmp_path):
    """The shared tiny run's results.json reads back as the typed tree, whose answer and results.csv are the run's."""
    from nl_rewrite.pipeline.answer import answer_lines
    from nl_rewrite.pipeline.report import write_csv

    results = load_results(tiny_run.out)
    assert results.answer == tiny_run.results["answer"] == answer_lines(results)
    write_csv(results, tmp_path / "results.csv")
    assert (tmp_path / "results.csv").read_text() == (tiny_run.out / "results.csv").read_text()


def test_the_tiny_run_raises_no_warning_of_its_own(tiny_run):
    """A warning the session's filters hide still reaches a user's terminal: the run's own code raises none (results
    once printed 55 lines of pydantic serializer warnings per run, from tuples in the config)."""
    # raised in our code or by pydantic serialising our results; beartype's are the suite's own type checks, and a
    # dependency's deprecation notices are not the run's to fix
    ours = [w for w in tiny_run.warnings if ("/nl_rewrite/" in w or "/pydantic/" in w) and not w.startswith("Beartype")]
    assert not ours, "\n".join(ours)


def test_the_run_says_where_its_explanations_lose_the_gap(tiny_run):
    """The headline arm's swaps are main conditions; its firing errors and costliest explanations are in results.json,
    the answer and the report."""
    results = load_results(tiny_run.out)
    for name in ("swap_simulated_firing", "swap_true_firing"):
        assert name in results.all_positions.conditions and results.conditions_info[name].family == "diagnostic"
        assert name in results.recovery
    diagnostics = results.diagnostics
    assert diagnostics is not None and diagnostics.condition == "lexical"
    assert 0 < diagnostics.firing.false_positive_rate < 1 and 0 < diagnostics.firing.false_negative_rate < 1
    shares = [row.estimated_share for row in diagnostics.needs_work]
    assert len(shares) == 20 and shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9
    headline = {e["latent"]: e["text"] for e in map(json.loads, (tiny_run.out / "explanations_lexical_b12.jsonl")
                                                    .read_text().splitlines())}
    assert all(row.explanation == headline.get(row.latent, "") for row in diagnostics.needs_work)
    assert any(line.startswith("Where the lexical explanations lose the gap") for line in results.answer)
    chars = results.lexical["12"].mean_chars
    assert chars and f"(≤ 12 items, {chars:.0f} characters on average)" in results.answer[1]
    html = (tiny_run.out / "report.html").read_text()
    section = html[html.index("explanations that most need work"):]
    assert section[:section.index("</table>")].count("<td class=ex>") == 20
