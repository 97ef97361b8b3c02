"""nl_rewrite.pipeline.report and .results on synthetic artifacts whose answers are known: the results tree, its
loader's checks, CSV, HTML, files; and a results.json written before the tree existed, read back to the character.

The per-window numbers are built so every recovered fraction is exact: the oracle equals the transcoder (recovers
1), the lexical condition sits halfway between transcoder and zero-latents (0.5), the noisy oracles at r 0.9 and
0.5 recover 0.75 and 0.25 (so the ladder reaches one half at r = 0.70).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from nl_rewrite.evaluation.evaluator import EvalResults
from nl_rewrite.evaluation.generate import Generation
from nl_rewrite.interp.explain import Explanation
from nl_rewrite.interp.score import DetectionScore
from nl_rewrite.interp.simulation_store import SimulationQuality
from nl_rewrite.latents.sampling import Example
from nl_rewrite.pipeline.answer import answer_lines
from nl_rewrite.pipeline.config import RunConfig
from nl_rewrite.pipeline.conditions import ConditionInfo
from nl_rewrite.pipeline.experiment import Artifacts
from nl_rewrite.pipeline.ladder import LexicalArm
from nl_rewrite.pipeline.report import run_results, summary_text, write_csv, write_html, write_outputs
from nl_rewrite.pipeline.results import (SCHEMA, PoolChoice, ResultsError, SimulationScores, check_results,
                                         load_results, results_json, same_results, write_results)

STORED = Path(__file__).parent / "fixtures" / "run_results_v2"
"""results.json, results.csv and report.html as the dict-built payload wrote them (see make_fixture.py there)."""
N_WINDOWS, TOKENS = 12, 7
# condition → share of the gap zero_latents − transcoder still open (0: as good as the transcoder)
MAIN = {"oracle": 0.0, "noisy_r0.9": 0.25, "lexical": 0.5, "noisy_r0.5": 0.75, "lexical_b3": 0.6, "zero_mlp": 2.0}
POOL = {"sim_isotonic_f1": 0.5, "lexical_pool": 0.8}
PEARSON = {"oracle": 1.0, "noisy_r0.9": 0.9, "lexical": 0.6, "noisy_r0.5": 0.5, "lexical_b3": 0.4, "zero_mlp": math.nan}


def per_window(seed: int, offset: float, spread: float) -> torch.Tensor:
    return offset + spread * torch.rand(N_WINDOWS, generator=torch.Generator().manual_seed(seed), dtype=torch.double)


def synthetic_results(between: dict[str, float], extra: dict[str, float] | None = None, seed: int = 0,
                      positions: str = "all") -> EvalResults:
    """clean < transcoder < zero_latents per window (gap 0.2-0.3 nats); each named condition a share of the way."""
    ce, kl = {}, {}
    for table, metric_seed in ((ce, seed), (kl, seed + 100)):
        clean = per_window(metric_seed, 3.0, 1.0) if table is ce else torch.zeros(N_WINDOWS, dtype=torch.double)
        transcoder = clean + per_window(metric_seed + 1, 0.05, 0.05)
        zero_latents = transcoder + per_window(metric_seed + 2, 0.2, 0.1)
        table.update(clean=clean, transcoder=transcoder, zero_latents=zero_latents)
        for name, share in (extra or {}).items():
            table[name] = transcoder + share * (zero_latents - transcoder)
        base = table.get("pool_zeroed", zero_latents)
        for name, share in between.items():
            table[name] = transcoder + share * (base - transcoder)
    return EvalResults(positions, list(range(N_WINDOWS)), {k: v.tolist() for k, v in ce.items()},
                       {k: v.tolist() for k, v in kl.items()}, TOKENS)


def quality(latent: int, r: float) -> SimulationQuality:
    return SimulationQuality(latent=latent, n=40, n_nan=0, pearson=r, spearman=r, precision=0.5, recall=0.5)


@pytest.fixture
def artifacts() -> Artifacts:
    cfg = RunConfig(preset="smoke", model="tiny", layer=1)
    info = {name: ConditionInfo("oracle" if "oracle" in name or "noisy" in name else "lexical", 1.0, r, label=name)
            for name, r in PEARSON.items()}
    info["zero_mlp"] = ConditionInfo("baseline", 0.0, math.nan, "zero the MLP")
    pool_info = {n: ConditionInfo("llm", 1.0, r, n) for n, r in (("sim_isotonic_f1", 0.7), ("lexical_pool", 0.4))}
    examples = [Example(w, [72, 105, 60, 33], [0.0, 1.5 * (w + 1), 0.0, 0.5]) for w in range(4)]
    explanations = [Explanation(3, "the letter <i>", True, "prompt", examples),
                    Explanation(5, "", False, "prompt", [], error="no reply")]
    arm = LexicalArm(budget=cfg.lexical_budget, texts={3: "i, j", 5: "k"}, calibrators={},
                     quality={3: quality(3, 0.6), 5: quality(5, math.nan)}, eval_sims={}, fallbacks=1)
    return Artifacts(
        cfg=cfg,
        results={"all": synthetic_results(MAIN), "last": synthetic_results(MAIN, seed=7, positions="last")},
        pool_results=synthetic_results(POOL, extra={"pool_zeroed": 0.9}, seed=3),
        info=info, pool_info=pool_info, lexical={cfg.lexical_budget: arm}, pool_mass_share=0.25, explanations=explanations,
        scores=[DetectionScore(3, 0.8, 10, auroc=0.9), DetectionScore(5, math.nan, 0)],
        quality={"isotonic": {3: quality(3, 0.7)}}, pool=[3, 5], n_latents=64, chosen={1.0: [3, 5]},
        fallbacks={"isotonic": {"constant": 1}}, counts={"pool": 2, "explained_ok": 1, "explanations_failed": 1},
        stages={"evaluate": 1.5}, decode=lambda ids: [chr(i) for i in ids],
        generations=[Generation("x < y & <b>", {"clean": "<tag>", "sim_isotonic_f1": "plain"})],
    )


def test_results_numbers_follow_the_evaluations(artifacts):
    results = run_results(artifacts)
    check_results(results)
    assert results.schema == SCHEMA and results.n_tokens == N_WINDOWS * TOKENS
    main = artifacts.results["all"]
    for metric, table in (("ce", main.ce), ("kl", main.kl)):
        gap = sum(a - b for a, b in zip(table["zero_latents"], table["transcoder"])) / N_WINDOWS
        interval = results.gap.on(metric)
        assert interval.value == pytest.approx(gap) and 0 < interval.lo < interval.value < interval.hi
        for name, open_share in MAIN.items():
            frac = results.recovery[name].on(metric).fraction
            assert frac.value == pytest.approx(1 - open_share), (name, metric)
    assert set(results.recovery) == set(MAIN)  # clean and the two references are not "recovered"
    assert results.pool == PoolChoice(size=2, n_latents=64, share_of_latents=2 / 64, mass_share=0.25,
                                      chosen={"1.0": [3, 5]})
    pool = results.pool_run
    assert pool.llm_condition == "sim_isotonic_f1" and pool.n_windows == N_WINDOWS
    assert pool.recovery_vs_pool_zeroed["sim_isotonic_f1"].kl.fraction.value == pytest.approx(0.5)
    assert pool.conditions_info["lexical_pool"].pearson == 0.4
    assert "sim_isotonic_f1" not in results.conditions_info and results.trained_run is None
    rows = {r.latent: r for r in results.latents}
    assert rows[3].detection_balanced_accuracy == 0.8 and rows[3].lexical_explanation == "i, j"
    assert rows[3].simulation == {"isotonic": SimulationScores(pearson=0.7, spearman=0.7, precision=0.5, recall=0.5)}
    assert rows[5].ok is False and rows[5].error == "no reply" and rows[5].simulation == {}


def test_answer_and_summary_text(artifacts):
    results = run_results(artifacts)
    answer = results.answer
    assert answer[0].startswith(f"The gap zero-latents − transcoder, over {N_WINDOWS * TOKENS} eval tokens: CE +")
    assert "(significant)" in answer[0] and "NOT significantly" not in answer[0]
    # the arm's two texts, "i, j" and "k", are 2.5 characters long on average
    assert any(line.startswith("Lexical explanations (≤ 12 items, 2 characters on average) of all 64 latents "
                               "(Pearson r 0.60") and
               "recover 50% [50%, 50%] of the KL gap" in line for line in answer)
    assert any("≤3 items: 40% [40%, 40%]" in line for line in answer)
    ladder = next(line for line in answer if line.startswith("By the noisy-oracle ladder"))
    assert "Pearson r ≈ 0.70 to recover half of the KL gap" in ladder
    text = summary_text(results)
    assert text.splitlines() == ["", "=== the answer ===", *(f"- {line}" for line in answer)]


def test_results_round_trip_through_the_file(artifacts, tmp_path):
    results = run_results(artifacts)
    write_results(results, tmp_path / "results.json")
    back = load_results(tmp_path)  # the run's folder names its results.json
    assert same_results(back, results)
    assert back.recovery == results.recovery and back.gap == results.gap and back.pool == results.pool
    assert back.generations == results.generations and back.latents[0] == results.latents[0]
    assert back.modes["all"].conditions["lexical"] == results.modes["all"].conditions["lexical"]
    assert back.settings.coder == "transcoder" and back.settings.lexical_budget == 12


def _ghost(d: dict) -> None:
    d["recovery"]["ghost"] = d["recovery"]["lexical"]


@pytest.mark.parametrize("breakage, message", [
    (lambda d: d.update(schema="nl_rewrite.run/1"), r"has schema 'nl_rewrite.run/1'; this version of nl_rewrite "
                                                    r"reads 'nl_rewrite.run/2' only: rerun `nl-rewrite run --config"),
    (lambda d: d.pop("schema"), "has schema None"),
    (lambda d: d.pop("pool_run"), "pool_run: Field required"),
    (lambda d: d["pool"].update(size="two"), "pool.size: Input should be a valid integer"),
    (lambda d: d["recovery"]["lexical"]["kl"].update(fraction=[0.5, 0.4]), r"recovery.lexical.kl.fraction\[2\]: Field "
                                                                           "required"),
    (lambda d: d["latents"][0].pop("ok"), r"latents\[0\].ok: Field required"),
    (lambda d: d["config"].pop("lexical_budget"), "config.lexical_budget: Field required"),
    (lambda d: d["config"].update(coder="crosscoder"), "config.coder: Input should be 'transcoder' or 'sae'"),
    (lambda d: d.update(complete=False), "complete: Input should be True"),
    (lambda d: d["modes"]["last"]["conditions"].pop("transcoder"), "mode last: condition 'transcoder' missing"),
    (lambda d: d["modes"]["all"]["conditions"]["lexical"].update(kl_mean=math.nan), "lexical has a non-finite mean"),
    (_ghost, r"not evaluated: \['ghost'\]"),
])
def test_load_refuses_a_wrong_file_naming_the_problem_and_the_fix(artifacts, tmp_path, breakage, message):
    data = results_json(run_results(artifacts))
    breakage(data)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ResultsError, match=message) as caught:
        load_results(path)
    assert str(path) in str(caught.value) and "rerun `nl-rewrite run --config" in str(caught.value)


def test_load_names_a_missing_or_corrupt_file(tmp_path):
    with pytest.raises(ResultsError, match="run results not found.*results.json.*rerun `nl-rewrite run --config"):
        load_results(tmp_path)
    (tmp_path / "results.json").write_text('{"schema": "nl_rewrite.run/2", ')
    with pytest.raises(ResultsError, match="not valid JSON"):
        load_results(tmp_path)


def test_results_written_before_the_typed_tree_load_and_report_unchanged(artifacts, tmp_path):
    """A results.json the dict-built payload wrote (with a trained block) loads, and the answer, results.csv and
    report.html drawn from the loaded tree are what that code wrote, to the character."""
    stored = json.loads((STORED / "results.json").read_text())
    results = load_results(STORED / "results.json")
    # the same keys and values, to the character once keys are sorted (a block's shared fields now come first), and
    # the fields added since (the diagnostics, each lexical arm's mean length), absent
    lexical = {budget: {**arm, "mean_chars": None} for budget, arm in stored["lexical"].items()}
    assert json.dumps(results_json(results), sort_keys=True) == json.dumps(
        {**stored, "diagnostics": None, "lexical": lexical}, sort_keys=True), "the tree writes the layout it reads"
    assert results.trained_run is not None and results.trained_run.simulator == "default"
    assert answer_lines(results) == stored["answer"]
    assert any(line.startswith("The trained simulator reading") for line in stored["answer"])
    write_csv(results, tmp_path / "results.csv")
    assert (tmp_path / "results.csv").read_text() == (STORED / "results.csv").read_text()
    write_html(results, artifacts.explanations, tmp_path / "report.html", artifacts.decode)
    assert (tmp_path / "report.html").read_text() == (STORED / "report.html").read_text()


def test_csv_has_one_row_per_condition_and_run(artifacts, tmp_path):
    results = run_results(artifacts)
    write_csv(results, tmp_path / "r.csv")
    with open(tmp_path / "r.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    n_main = len(artifacts.results["all"].conditions)
    assert [r["run"] for r in rows] == ["eval_all"] * n_main + ["eval_last"] * n_main + ["eval_pool"] * 6
    lexical = next(r for r in rows if r["run"] == "eval_all" and r["condition"] == "lexical")
    summary = results.modes["all"].conditions["lexical"]
    assert float(lexical["mean_ce"]) == pytest.approx(summary.mean_ce)
    assert float(lexical["recovered_kl"]) == pytest.approx(0.5) and float(lexical["pearson"]) == 0.6
    assert lexical["family"] == "lexical" and int(lexical["n_tokens"]) == N_WINDOWS * TOKENS
    last = next(r for r in rows if r["run"] == "eval_last" and r["condition"] == "lexical")
    assert last["recovered_kl"] == ""  # recovery is reported for all positions only
    clean = next(r for r in rows if r["condition"] == "clean")
    assert clean["family"] == "clean" and float(clean["ce_delta"]) == 0.0


def test_write_outputs_writes_every_file(artifacts, tmp_path):
    results = write_outputs(artifacts, tmp_path)
    for name in ("results.json", "results.csv", "ladder.png", "fractions.png", "budgets.png", "report.html",
                 "manifest.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = load_results(tmp_path / "results.json")
    assert saved.answer == results.answer and saved.generations == artifacts.generations
    html = (tmp_path / "report.html").read_text()
    assert html.index("The answer") < html.index("ladder.png")
    assert "x &lt; y &amp; &lt;b&gt;" in html and "&lt;tag&gt;" in html and "<tag>" not in html
    assert "the letter &lt;i&gt;" in html  # the explanation of the best-detected latent, escaped
    assert '<mark style="background: rgba(255,140,0,1.00)">i</mark>' in html  # its strongest example's peak token
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["config"]["model"] == "tiny" and manifest["stage_seconds"] == {"evaluate": 1.5}
    assert set(manifest["splits"]["splits"]) >= {"train", "explain", "eval"}
