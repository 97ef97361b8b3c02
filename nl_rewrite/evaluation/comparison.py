"""Comparing benchmark runs: merge results of one suite fingerprint into one table, a plot and an HTML page.

Runs are merged only when their fingerprints match (same suite, model and window tokens), so every row of the
table was measured on the same windows and the paired tests between any two rows are valid. A condition that
appears in several runs with identical per-window numbers (clean, zero-ablation) is kept once; different numbers
under one name are kept apart as ``name (run)``.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from nl_rewrite import io
from nl_rewrite.errors import NLRewriteError
from nl_rewrite.evaluation.evaluator import CLEAN, EvalResults
from nl_rewrite.evaluation.suite import SuiteFile, SuiteResults, VersusZero, fingerprint_differences
from nl_rewrite.typed_json import validated


class ComparisonError(NLRewriteError, ValueError):
    """Runs that cannot be compared: a missing or unreadable results file, or different fingerprints."""


@dataclass(frozen=True)
class Run:
    label: str
    """Where the run came from (its folder), shown next to conditions whose names clash."""
    results: SuiteResults


def load_run(folder: "str | Path") -> Run:
    path = Path(folder) / "results.json" if Path(folder).is_dir() else Path(folder)
    if Path(folder).is_dir() and not path.is_file():
        raise ComparisonError(f"{folder} holds no finished evaluation (results.json, written last, is missing: it "
                              f"did not finish, or never ran there); run `nl-rewrite evaluate --out {folder}`")
    fix = f"run `nl-rewrite evaluate --out {folder}` (again)"
    data = io.read_json_object(path, ComparisonError, "evaluation results", fix)
    if "fingerprint_parts" not in data:
        raise ComparisonError(f"{path} has no suite fingerprint (written by `nl-rewrite run` or an older "
                              "`nl-rewrite evaluate`); rerun `nl-rewrite evaluate --suite standard`")
    stored = validated(SuiteFile, data, ComparisonError, f"{path} as evaluation results", fix)
    return Run(str(folder), stored.suite_results())


def check_comparable(runs: Sequence[Run]) -> None:
    first = runs[0]
    for run in runs[1:]:
        if run.results.fingerprint != first.results.fingerprint:
            why = fingerprint_differences(first.results.parts, run.results.parts) or ["their fingerprints differ"]
            raise ComparisonError(f"{first.label} and {run.label} are not comparable: {'; '.join(why)}. Evaluate "
                                  "both with the same --suite and --model")


def merge_runs(runs: Sequence[Run]) -> tuple[SuiteResults, dict[str, str]]:
    """One result set with every run's conditions, and condition → the run it came from."""
    if not runs:
        raise ComparisonError("no runs to compare")
    check_comparable(runs)
    first = runs[0].results.blocks
    ce: dict[str, dict[str, list[float]]] = {block: {} for block in first}
    kl: dict[str, dict[str, list[float]]] = {block: {} for block in first}
    references: dict[str, str] = {}
    sources: dict[str, str] = {}
    for run in runs:
        names = _names_in_merge(run, ce, kl)
        for block, results in run.results.blocks.items():
            for old, new in names.items():
                ce[block][new], kl[block][new] = results.ce[old], results.kl[old]
        for old, new in names.items():
            reference = run.results.references.get(old, old)
            references[new], sources[new] = names.get(reference, reference), run.label
    blocks = {name: EvalResults(b.positions, b.window_ids, ce[name], kl[name], b.tokens_per_window, b.n_bootstrap,
                                b.seed) for name, b in first.items()}
    return SuiteResults(runs[0].results.parts, blocks, references), sources


def _names_in_merge(run: Run, ce: dict[str, dict], kl: dict[str, dict]) -> dict[str, str]:
    """This run's conditions → their names in the merge, leaving out exact repeats (clean, zero references)."""
    names = {}
    for name in next(iter(run.results.blocks.values())).conditions:
        seen = next(iter(ce.values()))
        if name not in seen:
            names[name] = name
        elif not all(ce[b].get(name) == r.ce[name] and kl[b].get(name) == r.kl[name]
                     for b, r in run.results.blocks.items()):
            names[name] = f"{name} ({run.label})"
    return names


# ---- rendering ---------------------------------------------------------------------------------------------

def _ci(lo: float, hi: float) -> str:
    return f"[{lo:+.4f}, {hi:+.4f}]"


def _p(p: float) -> str:
    return "n/a" if not math.isfinite(p) else ("<0.001" if p < 0.001 else f"{p:.3f}")


def describe_recovered(vs_zero: VersusZero) -> str:
    if vs_zero.recovered is None or vs_zero.recovered_ci is None:
        return "undefined (zero-ablation's CE gap is not clearly positive)"
    lo, hi = vs_zero.recovered_ci
    return f"{100 * vs_zero.recovered:.0f}% [{100 * lo:.0f}%, {100 * hi:.0f}%]"


def rows(results: SuiteResults, block: str, sources: dict[str, str]) -> list[list[str]]:
    """Table rows of one block: every condition but clean, with its paired tests."""
    out = []
    for name, tests in results.tests(block).items():
        c, z = tests.vs_clean, tests.vs_zero
        versus_zero = (["(is the reference)", "", "", ""] if z.reference == name else
                       [z.reference, f"{z.ce_diff:+.4f} {_ci(*z.ce_diff_ci)}", _p(z.wilcoxon_p),
                        describe_recovered(z)])
        out.append([name, sources.get(name, ""), f"{c.ce_delta:+.4f} {_ci(*c.ce_delta_ci)}",
                    f"{c.kl:.4f} {_ci(*c.kl_ci)}", _p(c.wilcoxon_p), *versus_zero])
    return out


HEADER = ["condition", "run", "ΔCE vs clean [95% CI]", "KL(clean‖patched) [95% CI]", "p vs clean", "zero ref",
          "CE − zero ref [95% CI]", "p vs zero", "zero's CE gap recovered [95% CI]"]


def markdown(results: SuiteResults, tables: dict[str, list[list[str]]]) -> str:
    """The report as markdown; ``tables``: block → its :func:`rows`."""
    suite = results.parts["suite"]
    lines = [f"# Benchmark `{suite['name']}` on {results.parts['model']} (fingerprint `{results.fingerprint}`)", "",
             f"{suite['windows']} windows of {suite['window']} tokens per split, seed {suite['seed']}, corpus "
             f"{suite['corpus']}. CIs: window bootstrap; p: paired Wilcoxon on per-window CE.", ""]
    for block in results.blocks:
        n = results.blocks[block].summaries[CLEAN].n_tokens
        lines += [f"## {block} ({n} scored tokens)", "", "| " + " | ".join(HEADER) + " |",
                  "|" + "---|" * len(HEADER)]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in tables[block]]
        lines.append("")
    return "\n".join(lines)


def plot(results: SuiteResults, path: Path) -> None:
    """ΔCE vs clean and KL per condition with 95% CIs, one row of panels per block."""
    from nl_rewrite.evaluation.plotting import pyplot

    plt = pyplot()
    blocks = list(results.blocks)
    fig, axes = plt.subplots(len(blocks), 2, figsize=(11, 1.2 + 0.45 * _n_conditions(results) * len(blocks)),
                             squeeze=False)
    for row, block in zip(axes, blocks):
        summaries = {n: s for n, s in results.blocks[block].summaries.items() if n != CLEAN}
        names = list(summaries)[::-1]
        for ax, (label, value, ci) in zip(row, (("ΔCE vs clean (nats)", "ce_delta", "ce_delta_ci"),
                                                  ("KL(clean‖patched) (nats)", "kl_mean", "kl_ci"))):
            xs = [getattr(summaries[n], value) for n in names]
            err = [[x - getattr(summaries[n], ci)[0] for x, n in zip(xs, names)],
                   [getattr(summaries[n], ci)[1] - x for x, n in zip(xs, names)]]
            ax.errorbar(xs, range(len(names)), xerr=err, fmt="o", capsize=3)
            ax.set_yticks(range(len(names)), names, fontsize=8)
            ax.axvline(0, color="grey", lw=0.8, ls="--")
            ax.set_title(f"{block}: {label}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _n_conditions(results: SuiteResults) -> int:
    return max(len(b.conditions) for b in results.blocks.values())


def html_page(results: SuiteResults, tables: dict[str, list[list[str]]], png: Path) -> str:
    image = base64.b64encode(png.read_bytes()).decode()
    parts = [f"<h1>Benchmark {html.escape(results.parts['suite']['name'])} on "
             f"{html.escape(results.parts['model'])}</h1><p>fingerprint <code>{results.fingerprint}</code></p>",
             f'<img alt="ΔCE and KL per condition" src="data:image/png;base64,{image}">']
    for block in results.blocks:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in HEADER)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                       for row in tables[block])
        parts.append(f"<h2>{html.escape(block)}</h2><table border=1><tr>{head}</tr>{body}</table>")
    return "<!doctype html><meta charset=utf-8><title>nl-rewrite compare</title>" + "".join(parts)


def write_report(runs: Sequence[Run], stem: Path) -> str:
    """``stem``.md, .png and .html for the merged runs; returns the markdown."""
    merged, sources = merge_runs(runs)
    tables = {block: rows(merged, block, sources) for block in merged.blocks}  # paired tests, computed once
    stem.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(merged, tables)
    io.write_text(stem.with_suffix(".md"), text)
    plot(merged, stem.with_suffix(".png"))
    io.write_text(stem.with_suffix(".html"), html_page(merged, tables, stem.with_suffix(".png")))
    return text
