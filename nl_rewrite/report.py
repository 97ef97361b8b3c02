"""Outputs of ``nl-rewrite run``: results.json/csv, CE/KL-vs-fraction plots, report.html, run manifest.

results.json schema (version 1):
{
  "schema": "nl_rewrite.run/1",
  "config": {...RunConfig...},
  "pool": {"size": int, "n_latents": int, "share_of_latents": float, "chosen": {fraction: [latent ids]}},
  "modes": {"all" | "last": {
      "conditions": {name: {"mean_ce", "ce_ci", "ce_delta", "ce_delta_ci", "kl_mean", "kl_ci", "n_tokens", "n_windows"}},
      "simulated": {calibration: {fraction: condition name}},
      "gap_recovered": {calibration: {"fraction_recovered", "ci", "wilcoxon_p_vs_zero_latents"}}
  }},
  "latents": [{"latent", "explanation", "ok", "detection_balanced_accuracy", "detection_auroc",
               "simulation": {calibration: {"pearson", "spearman", "precision", "recall"}}}],
  "counts": {...}, "calibration_fallbacks": {...}, "stage_seconds": {...}
}
KL is KL(clean || patched), per token, averaged; CE in nats; CIs are 95% window-bootstrap intervals.
"""

from __future__ import annotations

import csv
import html
import importlib.metadata
import json
import math
import platform
import subprocess
from dataclasses import asdict
from pathlib import Path

from .evaluator import EvalResults
from .experiment import Artifacts, condition_name

SCHEMA = "nl_rewrite.run/1"
REFERENCE = ("transcoder", "zero_latents")
"""The summary's gap: CE_zero_latents − CE_transcoder, recovered by simulated latents."""


def gap_recovered(res: EvalResults, name: str) -> dict:
    value, ci = res.fraction_recovered(name, worse="zero_latents", better="transcoder")
    return {"fraction_recovered": value, "ci": list(ci), "wilcoxon_p_vs_zero_latents": res.wilcoxon(name, "zero_latents")}


def mode_payload(art: Artifacts, res: EvalResults) -> dict:
    cfg = art.cfg
    simulated = {k: {str(f): condition_name(k, f) for f in cfg.fractions} for k in cfg.calibrations}
    return {"conditions": {n: asdict(s) for n, s in res.summaries.items()},
            "simulated": simulated,
            "gap_recovered": {k: gap_recovered(res, condition_name(k, max(cfg.fractions))) for k in cfg.calibrations},
            "per_window_ce": res.ce, "per_window_kl": res.kl}


def latent_rows(art: Artifacts) -> list[dict]:
    scores = {s.latent: s for s in art.scores}
    rows = []
    for rec in art.explanations:
        s = scores.get(rec.latent)
        sim = {k: {m: getattr(q[rec.latent], m) for m in ("pearson", "spearman", "precision", "recall")}
               for k, q in art.quality.items() if rec.latent in q}
        rows.append({"latent": rec.latent, "explanation": rec.text, "ok": rec.ok, "error": rec.error,
                     "detection_balanced_accuracy": s.balanced_accuracy if s else None,
                     "detection_auroc": s.auroc if s else None, "simulation": sim})
    return rows


def results_payload(art: Artifacts) -> dict:
    return {
        "schema": SCHEMA, "config": art.cfg.to_dict(),
        "pool": {"size": len(art.pool), "n_latents": art.n_latents, "share_of_latents": len(art.pool) / art.n_latents,
                 "chosen": {str(f): ids for f, ids in art.chosen.items()}},
        "modes": {mode: mode_payload(art, res) for mode, res in art.results.items()},
        "latents": latent_rows(art), "counts": art.counts, "calibration_fallbacks": art.fallbacks,
        "stage_seconds": art.stages,
    }


def validate_results(data: dict) -> None:
    """Raise ValueError naming the first missing piece of a results.json payload."""
    for key in ("schema", "config", "pool", "modes", "latents", "counts"):
        if key not in data:
            raise ValueError(f"results.json lacks {key!r}")
    if data["schema"] != SCHEMA:
        raise ValueError(f"unexpected schema {data['schema']!r}")
    for mode, payload in data["modes"].items():
        conds = payload["conditions"]
        for name in ("clean", *REFERENCE):
            if name not in conds:
                raise ValueError(f"mode {mode}: condition {name!r} missing")
        for kind, by_fraction in payload["simulated"].items():
            absent = [n for n in by_fraction.values() if n not in conds]
            if absent:
                raise ValueError(f"mode {mode}: simulated conditions missing: {absent}")
        for name, summary in conds.items():
            if not all(math.isfinite(summary[k]) for k in ("mean_ce", "kl_mean")):
                raise ValueError(f"mode {mode}: condition {name} has a non-finite mean")


def write_csv(data: dict, path: Path) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["mode", "condition", "calibration", "fraction", "mean_ce", "ce_delta", "ce_delta_lo",
                         "ce_delta_hi", "kl_mean", "kl_lo", "kl_hi", "n_tokens"])
        for mode, payload in data["modes"].items():
            lookup = {n: (k, f) for k, by_f in payload["simulated"].items() for f, n in by_f.items()}
            for name, s in payload["conditions"].items():
                kind, frac = lookup.get(name, ("", ""))
                writer.writerow([mode, name, kind, frac, s["mean_ce"], s["ce_delta"], *s["ce_delta_ci"],
                                 s["kl_mean"], *s["kl_ci"], s["n_tokens"]])


def plot_metric(payload: dict, metric: str, path: Path, title: str) -> None:
    """One line (with CI band) per calibration over the fraction simulated; baselines as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conds = payload["conditions"]
    # CE is shown as the paired delta against clean: the spread of CE across windows would swamp the bands.
    value, ci = ("ce_delta", "ce_delta_ci") if metric == "ce" else ("kl_mean", "kl_ci")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, by_fraction in payload["simulated"].items():
        fracs = sorted(by_fraction, key=float)
        xs = [float(f) for f in fracs]
        ys = [conds[by_fraction[f]][value] for f in fracs]
        lo = [conds[by_fraction[f]][ci][0] for f in fracs]
        hi = [conds[by_fraction[f]][ci][1] for f in fracs]
        ax.plot(xs, ys, marker="o", label=f"simulated ({kind})")
        ax.fill_between(xs, lo, hi, alpha=0.2)
    styles = {"clean": "k-", "transcoder": "g--", "zero_latents": "r--", "zero_mlp": "m:", "mean_mlp": "c:",
              "random_latents": "y-."}
    for name, style in styles.items():
        if name in conds:
            ax.axhline(conds[name][value], linestyle=style[1:], color=style[0], label=name, linewidth=1.2)
    ax.set_xscale("log")
    ax.set_xlabel("fraction of pool latents simulated")
    ax.set_ylabel("mean CE − clean CE (nats)" if metric == "ce" else "mean KL(clean ‖ patched) (nats)")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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


def _summary_table(payload: dict) -> str:
    head = "<tr><th>condition</th><th>mean CE</th><th>ΔCE [95% CI]</th><th>KL(clean‖patched) [95% CI]</th></tr>"
    rows = [f"<tr><td>{html.escape(n)}</td><td>{s['mean_ce']:.4f}</td>"
            f"<td>{s['ce_delta']:+.4f} [{s['ce_delta_ci'][0]:+.4f}, {s['ce_delta_ci'][1]:+.4f}]</td>"
            f"<td>{s['kl_mean']:.4f} [{s['kl_ci'][0]:.4f}, {s['kl_ci'][1]:.4f}]</td></tr>"
            for n, s in payload["conditions"].items()]
    return "<table>" + head + "".join(rows) + "</table>"


def write_html(data: dict, art: Artifacts, path: Path, decode) -> None:
    records = {r.latent: r for r in art.explanations}
    ranked = _ranked(data["latents"])
    best = "".join(_latent_html(r, records.get(r["latent"]), decode) for r in ranked[:10])
    worst = "".join(_latent_html(r, records.get(r["latent"]), decode) for r in ranked[::-1][:10])
    summary = html.escape(summary_text(data))
    body = f"""<html><head><meta charset="utf-8"><title>nl_rewrite report</title><style>
body {{font-family: sans-serif; max-width: 1100px; margin: auto}} table {{border-collapse: collapse; font-size: 13px}}
td, th {{border: 1px solid #ccc; padding: 3px 6px}} .ex {{font-family: monospace; font-size: 12px; margin: 4px 0;
white-space: pre-wrap; background: #f7f7f7; padding: 4px}}</style></head><body>
<h1>Partially rewriting {html.escape(art.cfg.model)} MLP {art.cfg.layer} in natural language</h1>
<pre>{summary}</pre>
<img src="ce_vs_fraction.png"><img src="kl_vs_fraction.png">
<h2>All positions</h2>{_summary_table(data['modes']['all'])}
<h2>Last token per window (paper protocol)</h2>{_summary_table(data['modes']['last'])}
<h2>10 best-explained latents</h2>{best}<h2>10 worst-explained latents</h2>{worst}
</body></html>"""
    path.write_text(body)


def summary_text(data: dict) -> str:
    payload = data["modes"]["all"]
    conds = payload["conditions"]
    pool = data["pool"]
    lines = [f"pool: {pool['size']} latents of {pool['n_latents']} ({100 * pool['share_of_latents']:.2f}%); "
             f"fractions are of the pool",
             f"mean CE (all positions): clean {conds['clean']['mean_ce']:.4f}, transcoder "
             f"{conds['transcoder']['mean_ce']:.4f}, zero_latents {conds['zero_latents']['mean_ce']:.4f}"]
    for kind, gap in payload["gap_recovered"].items():
        lo, hi = gap["ci"]
        lines.append(f"fraction of CE gap recovered at f=max ({kind}): {gap['fraction_recovered']:.3f} "
                     f"[95% CI {lo:.3f}, {hi:.3f}], Wilcoxon p vs zero_latents = {gap['wilcoxon_p_vs_zero_latents']:.3g}")
    return "\n".join(lines)


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def manifest(art: Artifacts) -> dict:
    from .data import split_manifest

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
    validate_results(data)
    (out / "results.json").write_text(json.dumps(data, indent=1, default=str))
    write_csv(data, out / "results.csv")
    for metric in ("ce", "kl"):
        plot_metric(data["modes"]["all"], metric, out / f"{metric}_vs_fraction.png",
                    f"{metric.upper()} vs fraction simulated (all positions, {art.cfg.model} MLP {art.cfg.layer})")
    write_html(data, art, out / "report.html", art.decode)
    (out / "manifest.json").write_text(json.dumps(manifest(art), indent=1, default=str))
    return data
