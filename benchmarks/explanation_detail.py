"""What more detailed explanations buy (issue 23): the old lexical language against the detailed one, at several
lengths and amounts of statistics, beside the ceilings of their kinds of item and swap diagnostics.

On the default run's layer and coder (trained first if absent) and its eval windows:
- explain-split statistics from ``--stat-windows`` windows (plus the run's held-out calibration windows, whose
  activations calibrate every arm per latent, isotonic, as in the run); ``--sizes`` repeat the 12-item and the
  headline detailed arm on fewer statistics windows, to show what data buys;
- arms ``items<B>`` (the default run's language, at most B items) and ``chars<C>`` (the detailed language, C
  characters on average across latents, spent where the output cost is largest);
- ceilings: the unlimited current-token and (previous, current)-token lookups on the same statistics;
- the explanations that most need work: the headline arm's latents ranked by estimated output cost (squared error
  × squared decoder-row norm), the top ``--worst`` listed with their explanations, the top ``--check`` of them
  patched alone (every other latent true) to measure the KL each one costs;
- swaps of the headline arm (``--headline`` characters): true values where the simulation fires (what the missed
  firings cost), and simulated values where the latent truly fires (what wrong magnitudes and the lost false
  positives leave); its firing error rates; the binary oracle for reference.
Recovered fractions of the zero-latents − transcoder gap come with window-bootstrap 95% CIs. Eval windows are only
measured. A plot of recovery against mean length goes to ``<out>/length_curve.png``.

Usage: python benchmarks/explanation_detail.py [--stat-windows 8064] [--sizes 640,2048] [--out DIR]
Last line of stdout: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch
from einops import rearrange

from nl_rewrite.evaluation.evaluator import Evaluator
from nl_rewrite.evaluation.recovery import Recovered, gap, recovered
from nl_rewrite.interp.detailed import candidates, detailed_explanations
from nl_rewrite.interp.lexical import LexicalSimulator, candidate_items, lexical_explanations
from nl_rewrite.latents.cache import LatentCache
from nl_rewrite.model.loading import load_model
from nl_rewrite.pipeline.config import RunConfig
from nl_rewrite.pipeline.detail import (arm_scores, context_lookup, dense_values, firing_auroc, firing_errors,
                                        needs_work as worst_explained, output_error, values_condition)
from nl_rewrite.pipeline.run_context import load_run_coder, windows_for
from nl_rewrite.pipeline.ladder import TOKENS_AS_ROWS, lexical_condition, simulated_arm
from nl_rewrite.replacements.coders import TranscoderReplacement, ZeroLatentsReplacement
from nl_rewrite.replacements.oracles import OracleReplacement, mean_pearson
from nl_rewrite.replacements.swaps import SWAPS, SwapReplacement


def finite(obj):
    """Strict JSON has no NaN: an undefined correlation becomes null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def fraction(r: Recovered):
    return r.fraction.as_list() if r.fraction else f"undefined: {r.reason}"


def explanations(cache, pool: list[int], args, weights) -> dict[str, tuple[dict[int, str], int]]:
    """name → (texts, statistics windows)."""
    out = {}
    for n in args.sizes:
        stat = sorted(pool[:n])
        out[f"items12_n{n}"] = (lexical_explanations(cache, stat, 12), n)
        out[f"chars{args.headline}_n{n}"] = (detailed_explanations(cache, stat, args.headline, weights), n)
    full = sorted(pool)
    plain = candidate_items(cache, full, max_per_latent=max(args.items))
    for b in args.items:
        out[f"items{b}"] = (lexical_explanations(cache, full, b, plain), len(full))
    detailed = candidates(cache, full)
    for c in args.chars:
        out[f"chars{c}"] = (detailed_explanations(cache, full, c, weights, detailed), len(full))
    return out


def plot(path: Path, arms: dict, ceilings: dict) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, metric in zip(axes, ("kl", "ce")):
        for prefix, label in (("items", "items per latent (plain, previous-token, start)"),
                              ("chars", "detailed (also pairs; one global budget)")):
            pts = sorted((a["mean_chars"], a[f"recovered_{metric}"]) for name, a in arms.items()
                         if name.startswith(prefix) and "_n" not in name and isinstance(a[f"recovered_{metric}"], list))
            if pts:
                x = [p[0] for p in pts]
                m, lo, hi = zip(*(p[1] for p in pts))
                ax.errorbar(x, m, yerr=[[a - b for a, b in zip(m, lo)], [b - a for a, b in zip(m, hi)]], marker="o",
                            capsize=3, label=label)
        ax.set_xscale("log")
        ax.set_xticks([50, 100, 200, 400, 800])
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        for name, c in ceilings.items():
            if isinstance(c[f"recovered_{metric}"], list):
                ax.axhline(c[f"recovered_{metric}"][0], ls="--", lw=1, color="grey")
                ax.annotate(f"{name} (unlimited, uncalibrated)", (1.0, c[f"recovered_{metric}"][0]),
                            xycoords=("axes fraction", "data"), ha="right", va="bottom", fontsize=7, color="grey")
        ax.set_xlabel("mean explanation length (characters)")
        ax.set_title(f"{metric.upper()} gap recovered (95% CI)")
    axes[0].set_ylabel("fraction of the zero-latents − transcoder gap")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stat-windows", type=int, default=8064, help="explain windows behind the statistics")
    parser.add_argument("--sizes", type=ints, default=[640, 2048], help="fewer statistics windows, for the data curve")
    parser.add_argument("--items", type=ints, default=[3, 6, 12, 24], help="old-language item budgets")
    parser.add_argument("--chars", type=ints, default=[50, 100, 200, 400, 800], help="detailed-language mean lengths")
    parser.add_argument("--headline", type=int, default=400, help="the detailed arm that gets swaps and a data curve")
    parser.add_argument("--worst", type=int, default=20, help="explanations listed as needing work the most")
    parser.add_argument("--check", type=int, default=5, help="of those, how many are patched alone to check")
    parser.add_argument("--out", default="runs/explanation_detail")
    args = parser.parse_args()
    if args.headline not in args.chars:
        parser.error(f"--headline {args.headline} must be one of --chars {args.chars}")
    start = time.perf_counter()
    cfg = RunConfig(preset="default").resolved()
    out = Path(args.out)
    model = load_model(cfg.model)
    coder = load_run_coder(cfg, model)
    n_calib, n_latents = cfg.lexical_calib_windows, coder.cfg.n_latents
    cache = LatentCache.build(model, coder, windows_for(cfg, model, "explain", n_calib + args.stat_windows),
                              out / "latents")
    order = random.Random(cfg.seed + 1).sample(range(len(cache)), len(cache))
    calib_ids, pool = sorted(order[:n_calib]), order[n_calib:]
    eval_windows = windows_for(cfg, model, "eval", cfg.eval_windows)
    eval_cache = LatentCache.build(model, coder, eval_windows, out / "latents_eval")
    n_eval, n_pos = eval_windows.tokens.shape
    eval_strings = {w: eval_cache.token_strings(eval_cache.window_tokens(w)) for w in range(n_eval)}
    true = eval_cache.dense_windows(range(n_eval))
    true_rows = rearrange(true, TOKENS_AS_ROWS)
    weights = coder.W_dec.detach().norm(dim=-1) ** 2
    explain_started = time.perf_counter()
    texts = explanations(cache, pool, args, weights)
    explain_seconds = time.perf_counter() - explain_started

    conditions = [TranscoderReplacement(coder, "transcoder"), ZeroLatentsReplacement(coder, "zero_latents")]
    arms, swap_info, needs_work = {}, {}, []
    for name, (arm_texts, n_stat) in texts.items():
        arm = simulated_arm(LexicalSimulator(), arm_texts, 0, cache, calib_ids, eval_strings)
        condition = lexical_condition(coder, arm, range(n_latents), name)
        scores = rearrange(arm_scores(arm.eval_sims, n_eval, n_latents), TOKENS_AS_ROWS)
        arms[name] = {"mean_chars": sum(map(len, arm_texts.values())) / n_latents, "stat_windows": n_stat,
                      "pearson": mean_pearson(scores, true_rows), "firing_auroc": firing_auroc(scores, true_rows),
                      "unparseable": arm.fallbacks}
        conditions.append(condition)
        if name == f"chars{args.headline}":
            simulated = dense_values(condition, range(n_eval), n_pos)
            conditions += [SwapReplacement(condition, keep, f"swap_{keep}") for keep in SWAPS]
            swap_info = {"arm": name, **asdict(firing_errors(simulated, true, coder.cfg.k))}
            cost = output_error(simulated, true, weights)
            needs_work = [asdict(row) for row in worst_explained(cost, arm_texts, args.worst)]
            conditions += [lexical_condition(coder, arm, [row["latent"]], f"alone_{row['latent']}")
                           for row in needs_work[:args.check]]
    ceilings = {}
    for name, pairs in (("lookup_current", False), ("lookup_previous_current", True)):
        values = context_lookup(cache, sorted(pool), eval_windows.tokens, pairs)
        ceilings[name] = {"pearson": mean_pearson(rearrange(values, TOKENS_AS_ROWS), true_rows)}
        conditions.append(values_condition(coder, values, name))
    conditions.append(OracleReplacement(coder, "binary", mean_active=cache.stats.mean, name="oracle_binary"))

    res = Evaluator(model, eval_windows, batch_size=cfg.batch_size).run(conditions)
    for table in (arms, ceilings):
        for name, entry in table.items():
            entry.update({f"recovered_{m}": fraction(recovered(res, name, m)) for m in ("kl", "ce")})
    for name in [f"swap_{keep}" for keep in SWAPS] + ["oracle_binary"]:
        swap_info[name] = {f"recovered_{m}": fraction(recovered(res, name, m)) for m in ("kl", "ce")}
    for entry in needs_work[:args.check]:
        delta, (lo, hi) = res.difference(f"alone_{entry['latent']}", "transcoder", "kl")
        entry["kl_alone"] = [delta, lo, hi]
    plot(out / "length_curve.png", arms, ceilings)
    result = {"layer": cfg.layer, "gap_ce": gap(res, "ce").as_list(), "gap_kl": gap(res, "kl").as_list(),
              "n_tokens": res.summaries["transcoder"].n_tokens, "stat_windows": len(pool), "calib_windows": n_calib,
              "explain_seconds": round(explain_seconds, 1), "seconds": round(time.perf_counter() - start, 1),
              "arms": arms, "ceilings": ceilings, "swaps": swap_info,
              "needs_work": needs_work, "plot": str(out / "length_curve.png")}
    for entry in needs_work:
        alone = f", alone ΔKL {entry['kl_alone'][0]:+.4f}" if "kl_alone" in entry else ""
        print(f"latent {entry['latent']:>5} ({100 * entry['estimated_share']:.1f}% of the estimated cost{alone}): "
              f"{entry['explanation'][:150]}")
    for name, a in arms.items():
        print(f"{name:>16}: {a['mean_chars']:6.0f} chars, r {a['pearson']:.3f}, AUROC {a['firing_auroc']:.3f}, "
              f"KL {a['recovered_kl']}, CE {a['recovered_ce']}")
    print(json.dumps(finite(result)))


if __name__ == "__main__":
    main()
