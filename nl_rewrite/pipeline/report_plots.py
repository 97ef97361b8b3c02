"""Plots of ``nl-rewrite run``: the oracle ladder, the fraction sweeps and the explanation-length curve.

Each reads the results tree only (:class:`~nl_rewrite.pipeline.results.RunResults`), so a plot can be redrawn from a
finished run's results.json (``load_results``).
"""

from __future__ import annotations

from pathlib import Path

from nl_rewrite.evaluation.plotting import pyplot
from nl_rewrite.evaluation.recovery import Metric, Recovered
from nl_rewrite.pipeline.results import RunResults

METRIC_LABEL = {"kl": "KL(clean‖patched) gap recovered", "ce": "CE gap recovered"}


FLOOR = -1.5
"""The ladder's y axis stops here: noisier oracles do far worse than zero-latents, and their exact depth is in
the table; showing it would flatten the region where simulators land."""


def _clip_low(ax, floor: float) -> None:
    low = ax.get_ylim()[0]
    if low < floor:
        ax.set_ylim(floor, max(ax.get_ylim()[1], 1.1))
        ax.text(0.99, 0.01, f"points below {floor} are cut off (see the table)", transform=ax.transAxes, fontsize=7, ha="right",
                color="grey")


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:  # a run with every fraction undefined draws no labelled artist
        ax.legend(fontsize=7)


def _reference_lines(ax) -> None:
    """0 = no better than zero-latents, 1 = as good as the run's coder."""
    ax.axhline(0, color="red", lw=0.8, ls="--")
    ax.axhline(1, color="green", lw=0.8, ls="--")


def _label(ax, xlabel: str, ylabel: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    _legend(ax)


def _save(plt, fig, title: str, path: Path) -> None:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _point(rec: Recovered) -> tuple[float, float, float] | None:
    frac = rec.fraction
    return None if frac is None else (frac.value, frac.lo, frac.hi)


def _errorbar(ax, xs, points, **style) -> None:
    keep = [(x, p) for x, p in zip(xs, points) if p is not None]
    if not keep:
        return
    x = [k[0] for k in keep]
    y = [k[1][0] for k in keep]
    err = [[k[1][0] - k[1][1] for k in keep], [k[1][2] - k[1][0] for k in keep]]
    ax.errorbar(x, y, yerr=err, capsize=3, **style)


def _ladder_extras(ax, results: RunResults, metric: Metric) -> None:
    """The simulators beside the oracle curve: the LLM on its pool and the trained simulator, when the run has them."""
    pool = results.pool_run
    llm = pool.llm_condition
    if llm:
        _errorbar(ax, [pool.conditions_info[llm].pearson], [_point(pool.recovery_vs_pool_zeroed[llm].on(metric))],
                  ls="none", marker="^", color="tab:red", label=f"LLM on its pool ({llm}; gap of zeroing the pool)")
    trained = results.trained_run
    if trained is not None:
        _errorbar(ax, [trained.conditions_info["trained"].pearson], [_point(trained.recovery["trained"].on(metric))],
                  ls="none", marker="*", color="tab:green", ms=10,
                  label=f"trained simulator, all latents (first {trained.n_windows} eval windows)")


def plot_ladder(results: RunResults, path: Path) -> None:
    """Fraction of the gap recovered vs the simulation's Pearson r: oracles as a curve, simulators as points."""
    plt = pyplot()
    info, rec = results.conditions_info, results.recovery
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
    for ax, metric in zip(axes, ("kl", "ce")):
        oracles = sorted((n for n in info if n.startswith("noisy_r") or n == "oracle"), key=lambda n: info[n].pearson)
        _errorbar(ax, [info[n].pearson for n in oracles], [_point(rec[n].on(metric)) for n in oracles],
                  marker="o", color="grey", label="noise-degraded oracles")
        for name, style in (("binary_oracle", dict(marker="s", color="black")),
                            ("lexical", dict(marker="D", color="tab:blue"))):
            if name in info:
                _errorbar(ax, [info[name].pearson], [_point(rec[name].on(metric))], ls="none",
                          label=info[name].label, **style)
        _ladder_extras(ax, results, metric)
        _reference_lines(ax)
        _clip_low(ax, FLOOR)
        _label(ax, "mean per-latent Pearson r with true activations (eval)", METRIC_LABEL[metric])
    _save(plt, fig, f"What quality a simulator needs: gap zero-latents → {results.settings.coder} recovered (95% CIs)",
          path)


def plot_fractions(results: RunResults, path: Path) -> None:
    """Recovered fraction vs fraction of all latents simulated (best-explained first)."""
    plt = pyplot()
    info, rec = results.conditions_info, results.recovery
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
    families = {"lexical": ("lexical_f", "lexical"), "binary oracle": ("binary_oracle_f", "binary_oracle")}
    for ax, metric in zip(axes, ("kl", "ce")):
        for label, (prefix, full) in families.items():
            names = sorted((n for n in info if n.startswith(prefix)), key=lambda n: info[n].fraction_of_latents)
            names += [full] if full in info else []
            _errorbar(ax, [info[n].fraction_of_latents for n in names], [_point(rec[n].on(metric)) for n in names],
                      marker="o", label=label)
        _reference_lines(ax)
        ax.set_xscale("log")
        _label(ax, "fraction of all latents simulated (ordered by lexical explanation score)", METRIC_LABEL[metric])
    _save(plt, fig, "Fraction sweep (95% CIs)", path)


def plot_budgets(results: RunResults, path: Path) -> None:
    """Recovered fraction vs explanation length budget (items), all latents."""
    plt = pyplot()
    rec, budget = results.recovery, results.settings.lexical_budget
    names = {budget: "lexical", **{int(n.split("_b")[1]): n for n in rec if n.startswith("lexical_b")}}
    budgets = sorted(names)
    fig, ax = plt.subplots(figsize=(6, 4))
    for metric in ("kl", "ce"):
        _errorbar(ax, budgets, [_point(rec[names[b]].on(metric)) for b in budgets], marker="o",
                  label=METRIC_LABEL[metric])
    ax.set_xscale("log", base=2)
    ax.set_xticks(budgets, [str(b) for b in budgets])
    _label(ax, "items per lexical explanation", "fraction of gap recovered")
    ax.set_title("How long must an explanation be?")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PLOTS = {"ladder.png": plot_ladder, "fractions.png": plot_fractions, "budgets.png": plot_budgets}
