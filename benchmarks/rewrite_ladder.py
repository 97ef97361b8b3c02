"""The rewrite ladder of the default run: gap, oracle ladder, lexical and LLM pool recovery, in one JSON line.

Reads ``--run`` (default ``runs/nl_rewrite``, the README's main job) and runs ``nl-rewrite run`` first when its
results are missing (cached stages make a rerun take about a minute).

Usage: python benchmarks/rewrite_ladder.py [--run runs/nl_rewrite]
Last line of stdout: one JSON object (see issue 8 for the keys).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from nl_rewrite.evaluation.recovery import Recovered, Recovery
from nl_rewrite.pipeline.conditions import ConditionInfo
from nl_rewrite.pipeline.results import RunResults, load_results


def finite_or_none(value):
    """Strict JSON has no NaN: an undefined correlation (baselines) becomes null."""
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def condition_entry(rec: Recovery, info: ConditionInfo, **extra) -> dict:
    def frac(r: Recovered):
        return r.fraction.as_list() if r.fraction else f"undefined: {r.reason}"

    return {"recovered_ce": frac(rec.ce), "recovered_kl": frac(rec.kl), "pearson": finite_or_none(info.pearson),
            "fraction": info.fraction_of_latents, **extra}


def ladder(results: RunResults) -> dict:
    conds = results.all_positions.conditions
    zero = conds["zero_mlp"]
    out = {"layer": results.settings.layer, "zero_mlp_delta_ce": [zero.ce_delta, *zero.ce_delta_ci],
           "gap_ce": results.gap.ce.as_list(), "gap_kl": results.gap.kl.as_list(), "n_tokens": results.n_tokens,
           "conditions": {name: condition_entry(results.recovery[name], info)
                          for name, info in results.conditions_info.items() if name in results.recovery}}
    pool = results.pool_run
    for name in (pool.llm_condition, "lexical_pool"):
        if name:
            out["conditions"][f"pool:{name}"] = condition_entry(
                pool.recovery_vs_pool_zeroed[name], pool.conditions_info[name], reference="pool_zeroed",
                n_tokens=pool.conditions[name].n_tokens)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/nl_rewrite")
    args = parser.parse_args()
    start = time.perf_counter()
    path = Path(args.run) / "results.json"
    if not path.is_file():
        from nl_rewrite.cli.main import main as cli

        cli(["run", "--out", args.run])
    results = load_results(path)
    out = ladder(results)
    out["seconds"] = round(time.perf_counter() - start, 1)
    out["run_stage_seconds"] = results.stage_seconds
    print(json.dumps(out, allow_nan=False))


if __name__ == "__main__":
    main()
