"""Outputs of ``nl-rewrite run``: results.json/csv, plots, report.html (opening with the answer), manifest.

:func:`run_results` builds the typed results tree (:mod:`.results`, which documents results.json's layout) from
the run's :class:`Artifacts` once; every output is drawn from that tree.
"""

from __future__ import annotations

import csv
import html
import importlib.metadata
import math
import platform
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, TypeVar

from nl_rewrite import io
from nl_rewrite.evaluation.evaluator import CLEAN, ConditionSummary, EvalResults
from nl_rewrite.evaluation.generate import Generation
from nl_rewrite.evaluation.recovery import Recovered, Recovery, format_p, gaps, recovery_table
from nl_rewrite.interp.explain import Explanation
from nl_rewrite.pipeline.answer import answer_lines
from nl_rewrite.pipeline.conditions import ConditionInfo
from nl_rewrite.pipeline.experiment import Artifacts
from nl_rewrite.pipeline.report_plots import PLOTS
from nl_rewrite.pipeline.results import (RESULTS_FILE, SCHEMA, ZERO_LATENTS, ConditionBlock, Diagnostics, LatentRow,
                                         LexicalSummary, ModeResults, PoolChoice, PoolRun, RunResults, RunSettings,
                                         SimulationScores, TrainedRun, write_results)

Block = TypeVar("Block", bound=ConditionBlock)


def reference(coder: str) -> tuple[str, str]:
    """The gap's two ends: M(zero_latents) − M(coder), which simulated latents should recover; ``coder`` is the
    condition of the run's own coder (``transcoder`` or ``sae``)."""
    return coder, ZERO_LATENTS


def _simulated(res: EvalResults, coder: str) -> list[str]:
    """The conditions measured against the gap: all but the clean model and the gap's two ends."""
    return [n for n in res.conditions if n not in (CLEAN, *reference(coder))]


def _default_llm_condition(res: EvalResults) -> str:
    names = [n for n in res.conditions if n.startswith("sim_")]
    preferred = [n for n in names if n.startswith("sim_isotonic_f1")]
    return (preferred or names or [""])[0]


def condition_block(kind: type[Block], res: EvalResults, info: dict[str, ConditionInfo], coder: str,
                    **extra: object) -> Block:
    """A block of ``kind`` from its evaluation: the fields every block has (its gap between zero latents and the coder,
    each simulated condition's recovery of it), and the ``extra`` ones of its kind."""
    return kind(n_windows=len(res.window_ids), conditions=dict(res.summaries), conditions_info=info,
                gap=gaps(res, better=coder), recovery=recovery_table(res, _simulated(res, coder), better=coder),
                **extra)


def pool_run(art: Artifacts) -> PoolRun:
    res, coder = art.pool_results, art.cfg.coder
    rest = [n for n in _simulated(res, coder) if n != "pool_zeroed"]
    return condition_block(PoolRun, res, art.pool_info, coder, llm_condition=_default_llm_condition(res),
                           gap_vs_pool_zeroed=gaps(res, worse="pool_zeroed", better=coder),
                           recovery_vs_pool_zeroed=recovery_table(res, rest, worse="pool_zeroed", better=coder))


def trained_run(art: Artifacts) -> TrainedRun | None:
    """The trained simulator's block: 100% of latents and its references on the first eval windows."""
    if art.trained_results is None:
        return None
    return condition_block(TrainedRun, art.trained_results, art.trained_info, art.cfg.coder,
                           simulator=art.cfg.trained_simulator)


def latent_rows(art: Artifacts) -> list[LatentRow]:
    scores = {s.latent: s for s in art.scores}
    headline = art.lexical[art.cfg.lexical_budget]
    rows = []
    for rec in art.explanations:
        s = scores.get(rec.latent)
        sim = {kind: SimulationScores.of(q[rec.latent]) for kind, q in art.quality.items() if rec.latent in q}
        rows.append(LatentRow(latent=rec.latent, explanation=rec.text,
                              lexical_explanation=headline.texts.get(rec.latent, ""), ok=rec.ok, error=rec.error,
                              detection_balanced_accuracy=s.balanced_accuracy if s else None,
                              detection_auroc=s.auroc if s else None, simulation=sim))
    return rows


def _lexical_summary(art: Artifacts) -> dict[str, LexicalSummary]:
    out = {}
    for budget, arm in art.lexical.items():
        rs = [q.pearson for q in arm.quality.values() if math.isfinite(q.pearson)]
        out[str(budget)] = LexicalSummary(explained=len(arm.texts), mean_pearson_explain=sum(rs) / len(rs) if rs else None,
                                          parse_fallbacks=arm.fallbacks, linear_calibrations=arm.linear_calibrations,
                                          mean_chars=sum(map(len, arm.texts.values())) / max(len(arm.texts), 1))
    return out


def run_results(art: Artifacts) -> RunResults:
    """The run's results tree, its answer included: what results.json holds."""
    main, coder = art.results["all"], art.cfg.coder
    results = RunResults(
        schema=SCHEMA, config=art.cfg.to_dict(), n_tokens=len(main.window_ids) * main.tokens_per_window,
        gap=gaps(main, better=coder),
        pool=PoolChoice(size=len(art.pool), n_latents=art.n_latents, share_of_latents=len(art.pool) / art.n_latents,
                        mass_share=art.pool_mass_share, chosen={str(f): ids for f, ids in art.chosen.items()}),
        modes={mode: ModeResults(dict(res.summaries), res.ce, res.kl) for mode, res in art.results.items()},
        recovery=recovery_table(main, _simulated(main, coder), better=coder), conditions_info=art.info,
        pool_run=pool_run(art), trained_run=trained_run(art), lexical=_lexical_summary(art),
        latents=latent_rows(art), counts=art.counts, calibration_fallbacks=art.fallbacks, stage_seconds=art.stages,
        generations=art.generations, diagnostics=art.diagnostics)
    return replace(results, answer=answer_lines(results))


def _fraction_cells(entry: Recovered | None) -> list:
    if entry is None or entry.fraction is None:
        return ["", "", ""]
    return entry.fraction.as_list()


CSV_HEADER = ["run", "condition", "family", "fraction_of_latents", "pearson", "mean_ce", "ce_delta", "ce_delta_lo",
              "ce_delta_hi", "kl_mean", "kl_lo", "kl_hi", "recovered_kl", "recovered_kl_lo", "recovered_kl_hi",
              "recovered_ce", "recovered_ce_lo", "recovered_ce_hi", "n_tokens"]


@dataclass(frozen=True)
class Table:
    """One evaluated block as a table: its conditions' summaries, recovery (where reported) and what each is."""

    run: str
    conditions: dict[str, ConditionSummary]
    recovery: dict[str, Recovery]
    info: dict[str, ConditionInfo]


def tables(results: RunResults) -> list[Table]:
    """results.csv's blocks, in order: each position mode (recovery for all positions only), the pool, the trained."""
    out = [Table(f"eval_{mode}", m.conditions, results.recovery if mode == "all" else {}, results.conditions_info)
           for mode, m in results.modes.items()]
    pool = results.pool_run
    out.append(Table("eval_pool", pool.conditions, pool.recovery, pool.conditions_info))
    if results.trained_run is not None:
        trained = results.trained_run
        out.append(Table("eval_trained", trained.conditions, trained.recovery, trained.conditions_info))
    return out


def csv_row(run: str, name: str, s: ConditionSummary, meta: ConditionInfo | None, r: Recovery | None) -> list:
    what = ["clean", "", ""] if meta is None else [meta.family, meta.fraction_of_latents, meta.pearson]
    return [run, name, *what, s.mean_ce, s.ce_delta, *s.ce_delta_ci, s.kl_mean, *s.kl_ci,
            *_fraction_cells(r and r.kl), *_fraction_cells(r and r.ce), s.n_tokens]


def write_csv(results: RunResults, path: Path) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_HEADER)
        for table in tables(results):
            for name, s in table.conditions.items():
                writer.writerow(csv_row(table.run, name, s, table.info.get(name), table.recovery.get(name)))


def _example_html(decode, example) -> str:
    peak = max(example.acts) or 1.0
    parts = []
    for text, act in zip(decode(example.tokens), example.acts):
        piece = html.escape(text)
        parts.append(f'<mark style="background: rgba(255,140,0,{act / peak:.2f})">{piece}</mark>' if act > 0 else piece)
    return "<div class=ex>" + "".join(parts) + "</div>"


def _latent_html(row: LatentRow, record: Explanation | None, decode) -> str:
    examples = sorted(record.examples, key=lambda e: -e.max_act)[:3] if record else []
    sims = ", ".join(f"{k}: r={v.pearson:.2f}" for k, v in row.simulation.items())
    acc = row.detection_balanced_accuracy
    return (f"<h4>latent {row.latent} — detection acc {acc if acc is None else f'{acc:.2f}'}; {html.escape(sims)}</h4>"
            f"<p><b>{html.escape(row.explanation or '(failed: ' + str(row.error) + ')')}</b></p>"
            + "".join(_example_html(decode, e) for e in examples))


def _ranked(rows: list[LatentRow]) -> list[LatentRow]:
    scored = [r for r in rows if r.ok and r.detection_balanced_accuracy is not None
              and math.isfinite(r.detection_balanced_accuracy)]
    return sorted(scored, key=lambda r: -r.detection_balanced_accuracy)


def _recovery_cell(entry: Recovered | None) -> str:
    if entry is None:
        return ""
    frac = entry.fraction
    if frac is None:
        return f"<i>undefined</i> ({html.escape(entry.reason)})"
    bad = entry.nonpositive_denominators
    note = f"<br><small>{bad} of {entry.n_resamples} resamples: undefined ratio</small>" if bad else ""
    return f"{frac.value:.3f} [{frac.lo:.3f}, {frac.hi:.3f}]{note}"


def _summary_row(n: str, s: ConditionSummary, meta: ConditionInfo | None, r: Recovery | None) -> str:
    pr = "" if meta is None or not math.isfinite(meta.pearson) else f"{meta.pearson:.2f}"
    frac = "" if meta is None else f"{100 * meta.fraction_of_latents:.3g}%"
    p_w = f"{format_p(r.ce.p_vs_worse)} / {format_p(r.kl.p_vs_worse)}" if r else ""
    p_b = f"{format_p(r.ce.p_vs_better)} / {format_p(r.kl.p_vs_better)}" if r else ""
    return (f"<tr><td>{html.escape(n)}</td><td>{html.escape(meta.label if meta else '')}</td><td>{frac}</td>"
            f"<td>{pr}</td><td>{s.mean_ce:.4f}</td>"
            f"<td>{s.ce_delta:+.4f} [{s.ce_delta_ci[0]:+.4f}, {s.ce_delta_ci[1]:+.4f}]</td>"
            f"<td>{s.kl_mean:.4f} [{s.kl_ci[0]:.4f}, {s.kl_ci[1]:.4f}]</td>"
            f"<td>{_recovery_cell(r and r.kl)}</td><td>{_recovery_cell(r and r.ce)}</td>"
            f"<td>{p_w}</td><td>{p_b}</td></tr>")


def _summary_table(conds: dict[str, ConditionSummary], rec: dict[str, Recovery], info: dict[str, ConditionInfo],
                   coder: str) -> str:
    head = ("<tr><th>condition</th><th>what</th><th>latents</th><th>r (eval)</th><th>mean CE</th>"
            "<th>ΔCE vs clean [95% CI]</th><th>KL(clean‖patched) [95% CI]</th><th>KL gap recovered</th>"
            f"<th>CE gap recovered</th><th>p vs zero-latents (CE / KL)</th><th>p vs {coder} (CE / KL)</th></tr>")
    rows = [_summary_row(n, s, info.get(n), rec.get(n)) for n, s in conds.items()]
    return "<table>" + head + "".join(rows) + "</table>"


def _generations_html(generations: list[Generation]) -> str:
    if not generations:
        return ""
    blocks = []
    for g in generations:
        rows = "".join(f"<tr><td>{html.escape(name)}</td><td class=ex>{html.escape(text)}</td></tr>"
                       for name, text in g.continuations.items())
        blocks.append(f"<p class=ex>{html.escape(g.prompt)}</p><table>{rows}</table>")
    return "<h2>Greedy continuations of eval prompts</h2>" + "".join(blocks)


def _trained_html(trained: TrainedRun | None, coder: str) -> str:
    if trained is None:
        return ""
    return (f"<h2>Trained simulator at 100% of latents: first {trained.n_windows} eval windows</h2>"
            f"<p>Every latent read by the trained simulator from its lexical explanation, beside the lexical reader "
            f"and the oracles on the same windows (recovery of the zero-latents gap).</p>"
            + _summary_table(trained.conditions, trained.recovery, trained.conditions_info, coder))


def _needs_work_html(diagnostics: Diagnostics | None) -> str:
    if diagnostics is None or not diagnostics.needs_work:
        return ""
    rows = "".join(f"<tr><td>{row.latent}</td><td>{100 * row.estimated_share:.1f}%</td>"
                   f"<td class=ex>{html.escape(row.explanation)}</td></tr>" for row in diagnostics.needs_work)
    return (f"<h2>The {len(diagnostics.needs_work)} explanations that most need work</h2><p>Latents of the "
            f"{html.escape(diagnostics.condition)} condition ranked by the estimated output cost of their simulation "
            "errors on the eval windows (squared error × squared decoder-row norm; cross terms between latents "
            "ignored). <code>benchmarks/explanation_detail.py</code> checks such estimates by patching latents "
            "alone.</p><table><tr><th>latent</th><th>share of the estimated cost</th><th>explanation</th></tr>"
            f"{rows}</table>")


def _modes_html(results: RunResults) -> str:
    coder = results.settings.coder
    return "".join(f"<h2>All conditions, positions: {mode} ({m.conditions['clean'].n_tokens} tokens)</h2>"
                   + _summary_table(m.conditions, results.recovery if mode == "all" else {}, results.conditions_info,
                                    coder)
                   for mode, m in results.modes.items())


def write_html(results: RunResults, explanations: list[Explanation], path: Path,
               decode: Callable[[list[int]], list[str]]) -> None:
    """report.html: the answer first, then the plots, every table and the best-detected pool latents with their
    strongest examples (``explanations`` hold the examples, which results.json does not)."""
    records = {r.latent: r for r in explanations}
    best = "".join(_latent_html(r, records.get(r.latent), decode) for r in _ranked(results.latents)[:10])
    answer = "".join(f"<li>{html.escape(line)}</li>" for line in results.answer)
    pool, settings = results.pool_run, results.settings
    body = f"""<html><head><meta charset="utf-8"><title>nl_rewrite report</title><style>
body {{font-family: sans-serif; max-width: 1200px; margin: auto}} table {{border-collapse: collapse; font-size: 12px}}
td, th {{border: 1px solid #ccc; padding: 3px 6px}} .ex {{font-family: monospace; font-size: 12px; margin: 4px 0;
white-space: pre-wrap; background: #f7f7f7; padding: 4px}} .answer li {{margin: 6px 0}}</style></head><body>
<h1>Partially rewriting {html.escape(settings.model)} {html.escape(rewritten_part(settings))} in natural language</h1>
<h2>The answer</h2><ul class=answer>{answer}</ul>
<h2>What quality a simulator needs</h2><img src="ladder.png" width="100%">
<h2>Fraction of latents simulated</h2><img src="fractions.png" width="100%">
<h2>Explanation length</h2><img src="budgets.png">{_needs_work_html(results.diagnostics)}
{_modes_html(results)}
<h2>LLM pool run: first {pool.n_windows} eval windows</h2>
<p>Recovery here is of the gap between zeroing only the pool's latents and the {settings.coder} (every other latent
keeps its true value, so the gap to zero-latents is trivially almost fully recovered).</p>
{_summary_table(pool.conditions, pool.recovery_vs_pool_zeroed, pool.conditions_info, settings.coder)}
{_trained_html(results.trained_run, settings.coder)}
{_generations_html(results.generations)}
<h2>LLM pool latents, best detection score first</h2>{best}
</body></html>"""
    io.write_text(path, body)


def rewritten_part(settings: RunSettings) -> str:
    """What the run rewrites, in words: "MLP 10" (transcoder) or "the SAE on resid_post.10"."""
    return f"MLP {settings.layer}" if settings.coder == "transcoder" else f"the SAE on {settings.sae_site}.{settings.layer}"


def summary_text(results: RunResults) -> str:
    """The answer block, for the console."""
    return "\n".join(["", "=== the answer ===", *(f"- {line}" for line in results.answer)])


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def manifest(art: Artifacts) -> dict:
    from nl_rewrite.data.windows import split_manifest

    packages = {}
    for name in ("torch", "transformers", "transformer-lens", "nl_rewrite", "openai", "scipy"):
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    return {"config": art.cfg.to_dict(), "seed": art.cfg.seed, "git_commit": _git_commit(), "packages": packages,
            "python": platform.python_version(), "platform": platform.platform(), "stage_seconds": art.stages,
            "splits": split_manifest(seed=art.cfg.seed)}


def write_outputs(art: Artifacts, out: Path) -> RunResults:
    """Write every output file into ``out``; returns the results tree results.json holds."""
    results = run_results(art)
    write_csv(results, out / "results.csv")
    for name, plot in PLOTS.items():
        plot(results, out / name)
    write_html(results, art.explanations, out / "report.html", art.decode)
    io.write_json(out / "manifest.json", manifest(art))
    write_results(results, out / RESULTS_FILE)  # last: its presence says the run finished
    return results
