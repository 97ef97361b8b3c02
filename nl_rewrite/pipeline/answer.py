"""The run's answer in words: how much of the coder's computation (transcoder or SAE) explanations carry.

Every number comes from the results payload (``report.results_payload``); when a fraction is undefined (the
gap's CI reaches 0, or too many bootstrap resamples have a non-positive gap) the text says so instead of
printing a number, and a fraction that is defined says how many resamples had an undefined ratio when any did.
"""

from __future__ import annotations

import math

from nl_rewrite.evaluation.recovery import Interval, Recovered, describe, format_p

HALF = 0.5


CODER_WORDS = {"transcoder": "transcoder", "sae": "SAE"}
"""How the answer names the run's coder in a sentence (its condition keeps the kind's name)."""


def run_coder(data: dict) -> str:
    """The run's coder kind (results written before SAE runs existed are transcoder runs)."""
    return data["config"].get("coder", "transcoder")


def _recovered(entry: dict) -> Recovered:
    frac = entry["fraction"]
    return Recovered(Interval(*frac) if frac else None, entry["nonpositive_denominators"], entry["n_resamples"],
                     entry["p_vs_worse"], entry["p_vs_better"], entry["reason"])


def gap_sentence(gap: dict, n_tokens: int, worse: str = "zero-latents", better: str = "transcoder") -> str:
    parts = []
    for metric, label in (("ce", "CE"), ("kl", "KL")):
        value, lo, hi = gap[metric]
        verdict = "significant" if lo > 0 else "NOT significantly positive: recovery fractions on it are undefined"
        parts.append(f"{label} {value:+.4f} [{lo:+.4f}, {hi:+.4f}] nats ({verdict})")
    return f"The gap {worse} − {better}, over {n_tokens} eval tokens: " + "; ".join(parts) + "."


def condition_sentence(rec: dict, name: str, worse: str = "zero-latents") -> str:
    kl, ce = _recovered(rec[name]["kl"]), _recovered(rec[name]["ce"])
    return (f"{describe(kl)} of the KL gap and {describe(ce)} of the CE gap "
            f"(paired Wilcoxon vs {worse}: KL {format_p(kl.p_vs_worse)}, CE {format_p(ce.p_vs_worse)})")


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


def ladder_points(data: dict, metric: str) -> list[tuple[float, float]]:
    info, rec = data["conditions_info"], data["recovery"]
    points = []
    for name, meta in info.items():
        if name.startswith("noisy_r") or name == "oracle":
            frac = rec[name][metric]["fraction"]
            if frac:
                points.append((meta["pearson"], frac[0]))
    return points


def answer_lines(data: dict) -> list[str]:
    cfg, rec, info = data["config"], data["recovery"], data["conditions_info"]
    n_latents = data["pool"]["n_latents"]
    lines = [gap_sentence(data["gap"], data["n_tokens"], better=run_coder(data))]
    lex = info.get("lexical")
    if lex:
        lines.append(f"Lexical explanations (≤ {cfg['lexical_budget']} items) of all {n_latents} latents "
                     f"(Pearson r {lex['pearson']:.2f} with the true activations on eval) recover "
                     + condition_sentence(rec, "lexical") + ".")
    budgets = sorted(int(n.split("_b")[1]) for n in rec if n.startswith("lexical_b"))
    if budgets:
        curve = ", ".join(f"≤{b} items: {describe(_recovered(rec[f'lexical_b{b}']['kl']))}" for b in budgets)
        lines.append(f"Explanation length (KL gap recovered): {curve}; ≤{cfg['lexical_budget']} is the headline.")
    lines.append(_pool_sentence(data))
    if data.get("trained_run"):
        lines.append(_trained_sentence(data))
    lines.append(f"By the noisy-oracle ladder, a simulator would need Pearson r {r_for_half(ladder_points(data, 'kl'))} "
                 f"to recover half of the KL gap, and r {r_for_half(ladder_points(data, 'ce'))} for half of the CE gap.")
    if "binary_oracle" in rec:
        lines.append("The binary oracle (true firing pattern at each latent's mean value) recovers "
                     + condition_sentence(rec, "binary_oracle") + ".")
    return lines


def _pool_sentence(data: dict) -> str:
    pool = data["pool_run"]
    llm = pool["llm_condition"]
    if not llm:
        return "No LLM pool condition was evaluated."
    rec, info = pool["recovery_vs_pool_zeroed"], pool["conditions_info"]
    g = pool["gap_vs_pool_zeroed"]
    return (f"The LLM simulator ({data['config']['llm']}, {llm}) on the pool of {data['pool']['size']} latents "
            f"({100 * data['pool']['mass_share']:.1f}% of the {CODER_WORDS[run_coder(data)]}'s output mass; "
            f"r {info[llm]['pearson']:.2f}), "
            f"on the first {pool['n_windows']} eval windows, with every other latent kept true: of the gap between "
            f"zeroing the pool and the {CODER_WORDS[run_coder(data)]} (KL {g['kl'][0]:+.4f} [{g['kl'][1]:+.4f}, {g['kl'][2]:+.4f}], "
            f"CE {g['ce'][0]:+.4f} [{g['ce'][1]:+.4f}, {g['ce'][2]:+.4f}] nats) it recovers "
            f"{condition_sentence(rec, llm, 'pool-zeroed')}; lexical explanations of the same latents "
            f"(r {info['lexical_pool']['pearson']:.2f}) recover {condition_sentence(rec, 'lexical_pool', 'pool-zeroed')}.")


def _trained_sentence(data: dict) -> str:
    trained = data["trained_run"]
    rec, info, g = trained["recovery"], trained["conditions_info"], trained["gap"]
    return (f"The trained simulator reading the lexical explanations of all {data['pool']['n_latents']} latents "
            f"(r {info['trained']['pearson']:.2f}), on the first {trained['n_windows']} eval windows (gap KL "
            f"{g['kl'][0]:+.4f} [{g['kl'][1]:+.4f}, {g['kl'][2]:+.4f}], CE {g['ce'][0]:+.4f} [{g['ce'][1]:+.4f}, "
            f"{g['ce'][2]:+.4f}] nats), recovers {condition_sentence(rec, 'trained')}; the lexical reader on the same "
            f"windows (r {info['lexical']['pearson']:.2f}) recovers {condition_sentence(rec, 'lexical')}.")
