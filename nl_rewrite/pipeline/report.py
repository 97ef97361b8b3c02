"""Outputs of ``nl-rewrite run``: results.json/csv, plots, report.html (opening with the answer), manifest.

results.json schema (version 2):
{
  "schema": "nl_rewrite.run/2",
  "complete": true,      (results.json is the last file a run writes, and a rerun removes it first: a folder
                          without it is unfinished)
  "config": {...RunConfig...},
  "answer": [sentences],
  "n_tokens": int, "gap": {"ce" | "kl": [mean, lo, hi]}     (zero_latents − transcoder, all positions)
  "pool": {"size", "n_latents", "share_of_latents", "mass_share", "chosen": {fraction: [ids]}},
  "modes": {"all" | "last": {"conditions": {name: summary}, "per_window_ce", "per_window_kl"}},
  "recovery": {condition: {"ce" | "kl": {"fraction": [v, lo, hi] | null, "reason", "nonpositive_denominators",
                                          "n_resamples", "p_vs_worse", "p_vs_better"}}},     (all positions)
  "conditions_info": {condition: {"family", "fraction_of_latents", "pearson", "label"}},
  "pool_run": {"n_windows", "llm_condition", "conditions", "conditions_info", "gap", "recovery",
               "gap_vs_pool_zeroed", "recovery_vs_pool_zeroed"},   (pool_zeroed: only the pool's latents set to 0)
  "lexical": {budget: {"explained", "mean_pearson_explain", "parse_fallbacks", "linear_calibrations"}},
  "latents": [...LLM pool latents...], "counts": {...}, "calibration_fallbacks": {...}, "stage_seconds": {...}
}
KL is KL(clean || patched) per token, averaged; CE in nats; CIs are 95% paired window-bootstrap intervals.
"""

from __future__ import annotations

import csv
import html
import importlib.metadata
import math
import platform
import subprocess
from dataclasses import asdict
from pathlib import Path

from nl_rewrite import io
from nl_rewrite.pipeline.answer import answer_lines, run_coder
from nl_rewrite.evaluation.evaluator import EvalResults
from nl_rewrite.pipeline.experiment import RESULTS_FILE, Artifacts
from nl_rewrite.evaluation.recovery import format_p, gap, recovered_json, recovery_table
from nl_rewrite.pipeline.report_plots import PLOTS

SCHEMA = "nl_rewrite.run/2"
def reference(coder: str) -> tuple[str, str]:
    """The gap's two ends: M(zero_latents) − M(coder), which simulated latents should recover; ``coder`` is the
    condition of the run's own coder (``transcoder`` or ``sae``)."""
    return coder, "zero_latents"


def _gap_json(res: EvalResults, coder: str, worse: str = "zero_latents") -> dict:
    return {m: gap(res, m, worse=worse, better=coder).as_list() for m in ("ce", "kl")}


def _recovery_json(res: EvalResults, names: list[str], coder: str, worse: str = "zero_latents") -> dict:
    return {name: {m: recovered_json(r) for m, r in by_metric.items()}
            for name, by_metric in recovery_table(res, names, worse=worse, better=coder).items()}


def _default_llm_condition(art: Artifacts) -> str:
    names = [n for n in art.pool_results.conditions if n.startswith("sim_")]
    preferred = [n for n in names if n.startswith("sim_isotonic_f1")]
    return (preferred or names or [""])[0]


def pool_payload(art: Artifacts) -> dict:
    res, coder = art.pool_results, art.cfg.coder
    simulated = [n for n in res.conditions if n not in ("clean", *reference(coder))]
    info = {k.split(":", 1)[1]: asdict(v) for k, v in art.info.items() if k.startswith("pool:")}
    return {"n_windows": len(res.window_ids), "llm_condition": _default_llm_condition(art),
            "conditions": {n: asdict(s) for n, s in res.summaries.items()}, "conditions_info": info,
            "gap": _gap_json(res, coder), "recovery": _recovery_json(res, simulated, coder),
            "gap_vs_pool_zeroed": _gap_json(res, coder, worse="pool_zeroed"),
            "recovery_vs_pool_zeroed": _recovery_json(res, [n for n in simulated if n != "pool_zeroed"], coder,
                                                      "pool_zeroed")}


def trained_payload(art: Artifacts) -> dict | None:
    """The trained simulator's block: 100% of latents and its references on the first eval windows."""
    res, coder = art.trained_results, art.cfg.coder
    if res is None:
        return None
    info = {k.split(":", 1)[1]: asdict(v) for k, v in art.info.items() if k.startswith("trained:")}
    names = [n for n in res.conditions if n not in ("clean", *reference(coder))]
    return {"n_windows": len(res.window_ids), "simulator": art.cfg.trained_simulator,
            "conditions": {n: asdict(s) for n, s in res.summaries.items()}, "conditions_info": info,
            "gap": _gap_json(res, coder), "recovery": _recovery_json(res, names, coder)}


def latent_rows(art: Artifacts) -> list[dict]:
    scores = {s.latent: s for s in art.scores}
    rows = []
    for rec in art.explanations:
        s = scores.get(rec.latent)
        sim = {k: {m: getattr(q[rec.latent], m) for m in ("pearson", "spearman", "precision", "recall")}
               for k, q in art.quality.items() if rec.latent in q}
        lexical = art.lexical[art.cfg.lexical_budget].texts.get(rec.latent, "")
        rows.append({"latent": rec.latent, "explanation": rec.text, "lexical_explanation": lexical, "ok": rec.ok,
                     "error": rec.error, "detection_balanced_accuracy": s.balanced_accuracy if s else None,
                     "detection_auroc": s.auroc if s else None, "simulation": sim})
    return rows


def _lexical_summary(art: Artifacts) -> dict:
    out = {}
    for budget, arm in art.lexical.items():
        rs = [q.pearson for q in arm.quality.values() if math.isfinite(q.pearson)]
        out[str(budget)] = {"explained": len(arm.texts), "mean_pearson_explain": sum(rs) / len(rs) if rs else None,
                            "parse_fallbacks": arm.fallbacks, "linear_calibrations": arm.linear_calibrations}
    return out


def results_payload(art: Artifacts) -> dict:
    main, coder = art.results["all"], art.cfg.coder
    names = [n for n in main.conditions if n not in ("clean", *reference(coder))]
    data = {
        "schema": SCHEMA, "config": art.cfg.to_dict(),
        "n_tokens": len(main.window_ids) * main.tokens_per_window, "gap": _gap_json(main, coder),
        "pool": {"size": len(art.pool), "n_latents": art.n_latents, "share_of_latents": len(art.pool) / art.n_latents,
                 "mass_share": art.pool_mass_share, "chosen": {str(f): ids for f, ids in art.chosen.items()}},
        "modes": {mode: {"conditions": {n: asdict(s) for n, s in res.summaries.items()},
                         "per_window_ce": res.ce, "per_window_kl": res.kl} for mode, res in art.results.items()},
        "recovery": _recovery_json(main, names, coder),
        "conditions_info": {k: asdict(v) for k, v in art.info.items() if ":" not in k},
        "pool_run": pool_payload(art), "trained_run": trained_payload(art), "lexical": _lexical_summary(art),
        "latents": latent_rows(art), "counts": art.counts, "calibration_fallbacks": art.fallbacks,
        "stage_seconds": art.stages,
    }
    data["answer"] = answer_lines(data)
    return data


def validate_results(data: dict) -> None:
    """Raise ValueError naming the first missing piece of a results.json payload."""
    for key in ("schema", "config", "answer", "gap", "pool", "modes", "recovery", "conditions_info", "pool_run",
                "latents", "counts"):
        if key not in data:
            raise ValueError(f"results.json lacks {key!r}")
    if data["schema"] != SCHEMA:
        raise ValueError(f"unexpected schema {data['schema']!r}")
    for mode, payload in data["modes"].items():
        conds = payload["conditions"]
        for name in ("clean", *reference(run_coder(data))):
            if name not in conds:
                raise ValueError(f"mode {mode}: condition {name!r} missing")
        for name, summary in conds.items():
            if not all(math.isfinite(summary[k]) for k in ("mean_ce", "kl_mean")):
                raise ValueError(f"mode {mode}: condition {name} has a non-finite mean")
    missing = [n for n in data["recovery"] if n not in data["modes"]["all"]["conditions"]]
    if missing:
        raise ValueError(f"recovery given for conditions that were not evaluated: {missing}")


def _fraction_cells(entry: dict | None) -> list:
    if not entry or not entry["fraction"]:
        return ["", "", ""]
    return entry["fraction"]


def write_csv(data: dict, path: Path) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["run", "condition", "family", "fraction_of_latents", "pearson", "mean_ce", "ce_delta",
                         "ce_delta_lo", "ce_delta_hi", "kl_mean", "kl_lo", "kl_hi", "recovered_kl", "recovered_kl_lo",
                         "recovered_kl_hi", "recovered_ce", "recovered_ce_lo", "recovered_ce_hi", "n_tokens"])
        runs = [(f"eval_{mode}", p["conditions"], data["recovery"] if mode == "all" else {}, data["conditions_info"])
                for mode, p in data["modes"].items()]
        pool = data["pool_run"]
        runs.append(("eval_pool", pool["conditions"], pool["recovery"], pool["conditions_info"]))
        if data.get("trained_run"):
            trained = data["trained_run"]
            runs.append(("eval_trained", trained["conditions"], trained["recovery"], trained["conditions_info"]))
        for run, conds, rec, info in runs:
            for name, s in conds.items():
                meta = info.get(name, {})
                r = rec.get(name, {})
                writer.writerow([run, name, meta.get("family", "clean"), meta.get("fraction_of_latents", ""),
                                 meta.get("pearson", ""), s["mean_ce"], s["ce_delta"], *s["ce_delta_ci"], s["kl_mean"],
                                 *s["kl_ci"], *_fraction_cells(r.get("kl")), *_fraction_cells(r.get("ce")),
                                 s["n_tokens"]])


def _example_html(decode, example) -> str:
    peak = max(example.acts) or 1.0
    parts = []
    for text, act in zip(decode(example.tokens), example.acts):
        piece = html.escape(text)
        parts.append(f'<mark style="background: rgba(255,140,0,{act / peak:.2f})">{piece}</mark>' if act > 0 else piece)
    return "<div class=ex>" + "".join(parts) + "</div>"


def _latent_html(row: dict, record, decode) -> str:
    examples = sorted(record.examples, key=lambda e: -e.max_act)[:3] if record else []
    sims = ", ".join(f"{k}: r={v['pearson']:.2f}" for k, v in row["simulation"].items())
    acc = row["detection_balanced_accuracy"]
    return (f"<h4>latent {row['latent']} — detection acc {acc if acc is None else f'{acc:.2f}'}; {html.escape(sims)}</h4>"
            f"<p><b>{html.escape(row['explanation'] or '(failed: ' + str(row['error']) + ')')}</b></p>"
            + "".join(_example_html(decode, e) for e in examples))


def _ranked(rows: list[dict]) -> list[dict]:
    scored = [r for r in rows if r["ok"] and r["detection_balanced_accuracy"] is not None
              and math.isfinite(r["detection_balanced_accuracy"])]
    return sorted(scored, key=lambda r: -r["detection_balanced_accuracy"])


def _recovery_cell(entry: dict | None) -> str:
    if not entry:
        return ""
    frac = entry["fraction"]
    if not frac:
        return f"<i>undefined</i> ({html.escape(entry['reason'])})"
    bad = entry.get("nonpositive_denominators", 0)
    note = f"<br><small>{bad} of {entry['n_resamples']} resamples: undefined ratio</small>" if bad else ""
    return f"{frac[0]:.3f} [{frac[1]:.3f}, {frac[2]:.3f}]{note}"


def _summary_table(conds: dict, rec: dict, info: dict, coder: str) -> str:
    head = ("<tr><th>condition</th><th>what</th><th>latents</th><th>r (eval)</th><th>mean CE</th>"
            "<th>ΔCE vs clean [95% CI]</th><th>KL(clean‖patched) [95% CI]</th><th>KL gap recovered</th>"
            f"<th>CE gap recovered</th><th>p vs zero-latents (CE / KL)</th><th>p vs {coder} (CE / KL)</th></tr>")
    rows = []
    for n, s in conds.items():
        meta, r = info.get(n, {}), rec.get(n, {})
        pr = "" if not meta or not math.isfinite(meta["pearson"]) else f"{meta['pearson']:.2f}"
        frac = "" if not meta else f"{100 * meta['fraction_of_latents']:.3g}%"
        p_w = f"{format_p(r['ce']['p_vs_worse'])} / {format_p(r['kl']['p_vs_worse'])}" if r else ""
        p_b = f"{format_p(r['ce']['p_vs_better'])} / {format_p(r['kl']['p_vs_better'])}" if r else ""
        rows.append(f"<tr><td>{html.escape(n)}</td><td>{html.escape(meta.get('label', ''))}</td><td>{frac}</td>"
                    f"<td>{pr}</td><td>{s['mean_ce']:.4f}</td>"
                    f"<td>{s['ce_delta']:+.4f} [{s['ce_delta_ci'][0]:+.4f}, {s['ce_delta_ci'][1]:+.4f}]</td>"
                    f"<td>{s['kl_mean']:.4f} [{s['kl_ci'][0]:.4f}, {s['kl_ci'][1]:.4f}]</td>"
                    f"<td>{_recovery_cell(r.get('kl'))}</td><td>{_recovery_cell(r.get('ce'))}</td>"
                    f"<td>{p_w}</td><td>{p_b}</td></tr>")
    return "<table>" + head + "".join(rows) + "</table>"


def _generations_html(data: dict) -> str:
    gens = data.get("generations") or []
    if not gens:
        return ""
    blocks = []
    for g in gens:
        rows = "".join(f"<tr><td>{html.escape(name)}</td><td class=ex>{html.escape(text)}</td></tr>"
                       for name, text in g["continuations"].items())
        blocks.append(f"<p class=ex>{html.escape(g['prompt'])}</p><table>{rows}</table>")
    return "<h2>Greedy continuations of eval prompts</h2>" + "".join(blocks)


def _trained_html(data: dict, coder: str) -> str:
    trained = data.get("trained_run")
    if not trained:
        return ""
    return (f"<h2>Trained simulator at 100% of latents: first {trained['n_windows']} eval windows</h2>"
            f"<p>Every latent read by the trained simulator from its lexical explanation, beside the lexical reader "
            f"and the oracles on the same windows (recovery of the zero-latents gap).</p>"
            + _summary_table(trained["conditions"], trained["recovery"], trained["conditions_info"], coder))


def write_html(data: dict, art: Artifacts, path: Path, decode) -> None:
    records = {r.latent: r for r in art.explanations}
    ranked = _ranked(data["latents"])
    best = "".join(_latent_html(r, records.get(r["latent"]), decode) for r in ranked[:10])
    answer = "".join(f"<li>{html.escape(line)}</li>" for line in data["answer"])
    pool = data["pool_run"]
    modes = "".join(f"<h2>All conditions, positions: {mode} ({data['modes'][mode]['conditions']['clean']['n_tokens']} "
                    f"tokens)</h2>" + _summary_table(p["conditions"], data["recovery"] if mode == "all" else {},
                                                      data["conditions_info"], art.cfg.coder)
                    for mode, p in data["modes"].items())
    body = f"""<html><head><meta charset="utf-8"><title>nl_rewrite report</title><style>
body {{font-family: sans-serif; max-width: 1200px; margin: auto}} table {{border-collapse: collapse; font-size: 12px}}
td, th {{border: 1px solid #ccc; padding: 3px 6px}} .ex {{font-family: monospace; font-size: 12px; margin: 4px 0;
white-space: pre-wrap; background: #f7f7f7; padding: 4px}} .answer li {{margin: 6px 0}}</style></head><body>
<h1>Partially rewriting {html.escape(art.cfg.model)} {html.escape(rewritten_part(art.cfg))} in natural language</h1>
<h2>The answer</h2><ul class=answer>{answer}</ul>
<h2>What quality a simulator needs</h2><img src="ladder.png" width="100%">
<h2>Fraction of latents simulated</h2><img src="fractions.png" width="100%">
<h2>Explanation length</h2><img src="budgets.png">
{modes}
<h2>LLM pool run: first {pool['n_windows']} eval windows</h2>
<p>Recovery here is of the gap between zeroing only the pool's latents and the {art.cfg.coder} (every other latent
keeps its true value, so the gap to zero-latents is trivially almost fully recovered).</p>
{_summary_table(pool['conditions'], pool['recovery_vs_pool_zeroed'], pool['conditions_info'], art.cfg.coder)}
{_trained_html(data, art.cfg.coder)}
{_generations_html(data)}
<h2>LLM pool latents, best detection score first</h2>{best}
</body></html>"""
    io.write_text(path, body)


def rewritten_part(cfg) -> str:
    """What the run rewrites, in words: "MLP 10" (transcoder) or "the SAE on resid_post.10"."""
    return f"MLP {cfg.layer}" if cfg.coder == "transcoder" else f"the SAE on {cfg.sae_site}.{cfg.layer}"


def summary_text(data: dict) -> str:
    """The answer block, for the console."""
    return "\n".join(["", "=== the answer ===", *(f"- {line}" for line in data["answer"])])


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


def write_outputs(art: Artifacts, out: Path) -> dict:
    """Write every output file into ``out``; returns the results.json payload."""
    data = results_payload(art)
    data["generations"] = art.generations
    validate_results(data)
    write_csv(data, out / "results.csv")
    for name, plot in PLOTS.items():
        plot(data, out / name)
    write_html(data, art, out / "report.html", art.decode)
    io.write_json(out / "manifest.json", manifest(art))
    io.write_json(out / RESULTS_FILE, {**data, "complete": True})  # last: its presence says the run finished
    return data
