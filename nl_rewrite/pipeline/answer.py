"""The run's answer in words: how much of the coder's computation (transcoder or SAE) explanations carry.

Every number comes from the run's results tree (:class:`~nl_rewrite.pipeline.results.RunResults`); when a fraction
is undefined (the gap's CI reaches 0, or too many bootstrap resamples have a non-positive gap) the text says so
instead of printing a number, and a fraction that is defined says how many resamples had an undefined ratio when
any did.
"""

from __future__ import annotations

import math

from nl_rewrite.evaluation.recovery import METRICS, Gap, Metric, Recovery, describe, format_p
from nl_rewrite.pipeline.results import RunResults, TrainedRun
from nl_rewrite.replacements.swaps import SWAP_PREFIX

HALF = 0.5


CODER_WORDS = {"transcoder": "transcoder", "sae": "SAE"}
"""How the answer names the run's coder in a sentence (its condition keeps the kind's name)."""
METRIC_WORDS: dict[Metric, str] = {"ce": "CE", "kl": "KL"}


def gap_sentence(gap: Gap, n_tokens: int, worse: str = "zero-latents", better: str = "transcoder") -> str:
    parts = []
    for metric in METRICS:
        value, lo, hi = gap.on(metric).as_list()
        verdict = "significant" if lo > 0 else "NOT significantly positive: recovery fractions on it are undefined"
        parts.append(f"{METRIC_WORDS[metric]} {value:+.4f} [{lo:+.4f}, {hi:+.4f}] nats ({verdict})")
    return f"The gap {worse} − {better}, over {n_tokens} eval tokens: " + "; ".join(parts) + "."


def condition_sentence(rec: Recovery, worse: str = "zero-latents") -> str:
    kl, ce = rec.kl, rec.ce
    return (f"{describe(kl)} of the KL gap and {describe(ce)} of the CE gap "
            f"(paired Wilcoxon vs {worse}: KL {format_p(kl.p_vs_worse)}, CE {format_p(ce.p_vs_worse)})")


def _gap_brackets(gap: Gap) -> str:
    """``KL +0.0123 [+0.0100, +0.0150], CE ...``, without the verdicts of :func:`gap_sentence`."""
    k, c = gap.kl, gap.ce
    return (f"KL {k.value:+.4f} [{k.lo:+.4f}, {k.hi:+.4f}], "
            f"CE {c.value:+.4f} [{c.lo:+.4f}, {c.hi:+.4f}] nats")


def r_for_half(points: list[tuple[float, float]]) -> str:
    """Smallest Pearson r at which the (r, recovered) curve reaches one half, by linear interpolation."""
    pts = sorted((r, v) for r, v in points if math.isfinite(r) and math.isfinite(v))
    if not pts:
        return "unknown (no oracle point had a defined recovery)"
    if pts[0][1] >= HALF:
        return f"≤ {pts[0][0]:.2f} (every measured noise level recovers at least half)"
    for (r0, v0), (r1, v1) in zip(pts, pts[1:]):
        if v0 < HALF <= v1:
            return f"≈ {r0 + (HALF - v0) * (r1 - r0) / (v1 - v0):.2f}"
    return f"> {pts[-1][0]:.2f} (no measured oracle reached half)"


def ladder_points(results: RunResults, metric: Metric) -> list[tuple[float, float]]:
    points = []
    for name, meta in results.conditions_info.items():
        if name.startswith("noisy_r") or name == "oracle":
            frac = results.recovery[name].on(metric).fraction
            if frac is not None:
                points.append((meta.pearson, frac.value))
    return points


def answer_lines(results: RunResults) -> list[str]:
    """The answer, one sentence per finding (``results.answer`` is left out: this is what fills it)."""
    settings, rec, info = results.settings, results.recovery, results.conditions_info
    lines = [gap_sentence(results.gap, results.n_tokens, better=settings.coder)]
    lex = info.get("lexical")
    if lex:
        lines.append(f"Lexical explanations (≤ {settings.lexical_budget} items{_chars(results, settings.lexical_budget)})"
                     f" of all {results.pool.n_latents} "
                     f"latents (Pearson r {lex.pearson:.2f} with the true activations on eval) recover "
                     + condition_sentence(rec["lexical"]) + ".")
    budgets = sorted(int(n.split("_b")[1]) for n in rec if n.startswith("lexical_b"))
    if budgets:
        curve = ", ".join(f"≤{b} items{_chars(results, b)}: {describe(rec[f'lexical_b{b}'].kl)}" for b in budgets)
        lines.append(f"Explanation length (KL gap recovered): {curve}; ≤{settings.lexical_budget} is the headline.")
    lines.append(_pool_sentence(results))
    if results.trained_run is not None:
        lines.append(_trained_sentence(results, results.trained_run))
    lines.append(f"By the noisy-oracle ladder, a simulator would need Pearson r "
                 f"{r_for_half(ladder_points(results, 'kl'))} to recover half of the KL gap, and r "
                 f"{r_for_half(ladder_points(results, 'ce'))} for half of the CE gap.")
    swaps = _swap_sentence(results)
    if swaps:
        lines.append(swaps)
    if "binary_oracle" in rec:
        lines.append("The binary oracle (true firing pattern at each latent's mean value) recovers "
                     + condition_sentence(rec["binary_oracle"]) + ".")
    return lines


def _pool_sentence(results: RunResults) -> str:
    pool, choice, settings = results.pool_run, results.pool, results.settings
    llm = pool.llm_condition
    if not llm:
        return "No LLM pool condition was evaluated."
    rec, info = pool.recovery_vs_pool_zeroed, pool.conditions_info
    coder = CODER_WORDS[settings.coder]
    return (f"The LLM simulator ({settings.llm}, {llm}) on the pool of {choice.size} latents "
            f"({100 * choice.mass_share:.1f}% of the {coder}'s output mass; r {info[llm].pearson:.2f}), "
            f"on the first {pool.n_windows} eval windows, with every other latent kept true: of the gap between "
            f"zeroing the pool and the {coder} ({_gap_brackets(pool.gap_vs_pool_zeroed)}) it recovers "
            f"{condition_sentence(rec[llm], 'pool-zeroed')}; lexical explanations of the same latents "
            f"(r {info['lexical_pool'].pearson:.2f}) recover {condition_sentence(rec['lexical_pool'], 'pool-zeroed')}.")


def _trained_sentence(results: RunResults, trained: TrainedRun) -> str:
    rec, info = trained.recovery, trained.conditions_info
    return (f"The trained simulator reading the lexical explanations of all {results.pool.n_latents} latents "
            f"(r {info['trained'].pearson:.2f}), on the first {trained.n_windows} eval windows (gap "
            f"{_gap_brackets(trained.gap)}), recovers {condition_sentence(rec['trained'])}; the lexical reader on the "
            f"same windows (r {info['lexical'].pearson:.2f}) recovers {condition_sentence(rec['lexical'])}.")


def _chars(results: RunResults, budget: int) -> str:
    """``, 158 characters on average`` for a lexical budget whose length was recorded (nothing otherwise)."""
    summary = results.lexical.get(str(budget))
    return "" if summary is None or summary.mean_chars is None else f", {summary.mean_chars:.0f} characters on average"


def _swap_sentence(results: RunResults) -> str | None:
    """Where the headline arm loses the gap: its two swaps (main conditions; both drop its false positives) and its
    firing errors. The verdict needs the swaps' KL CIs apart."""
    rec = results.recovery
    fires, values = rec.get(SWAP_PREFIX + "simulated_firing"), rec.get(SWAP_PREFIX + "true_firing")
    if fires is None or values is None:
        return None
    line = (f"Where the lexical explanations lose the gap (their false positives dropped in both swaps): the true "
            f"values written where they fire recover {describe(fires.kl)} of the KL gap and {describe(fires.ce)} of "
            f"the CE gap (lost: the firings they miss); their own values written where the latent truly fires recover "
            f"{describe(values.kl)} and {describe(values.ce)} (lost: their magnitudes, the missed firings' included)")
    a, b = fires.kl.fraction, values.kl.fraction
    if a is None or b is None:
        pass  # an undefined fraction is said in words above; there is nothing to compare
    elif a.lo > b.hi:
        line += ", so by KL their magnitudes cost more than the firings they miss (the CIs are apart)"
    elif b.lo > a.hi:
        line += ", so by KL the firings they miss cost more than their magnitudes (the CIs are apart)"
    else:
        line += "; by KL the two CIs overlap, so neither is shown to cost more"
    diagnostics = results.diagnostics
    if diagnostics is not None:
        errors = diagnostics.firing
        line += (f". Of their firings {100 * errors.false_positive_rate:.0f}% are false positives, and they miss "
                 f"{100 * errors.false_negative_rate:.0f}% of the true firings; the report lists the "
                 f"{len(diagnostics.needs_work)} explanations whose errors cost the most")
    return line + "."
