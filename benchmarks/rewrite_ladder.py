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


def finite_or_none(value):
    """Strict JSON has no NaN: an undefined correlation (baselines) becomes null."""
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def triple(summary: dict, value: str, ci: str) -> list[float]:
    return [summary[value], *summary[ci]]


def condition_entry(rec: dict, info: dict, **extra) -> dict:
    def frac(metric: str):
        return rec[metric]["fraction"] or f"undefined: {rec[metric]['reason']}"

    return {"recovered_ce": frac("ce"), "recovered_kl": frac("kl"), "pearson": finite_or_none(info["pearson"]),
            "fraction": info["fraction_of_latents"], **extra}


def ladder(data: dict) -> dict:
    conds = data["modes"]["all"]["conditions"]
    out = {"layer": data["config"]["layer"],
           "zero_mlp_delta_ce": triple(conds["zero_mlp"], "ce_delta", "ce_delta_ci"),
           "gap_ce": data["gap"]["ce"], "gap_kl": data["gap"]["kl"], "n_tokens": data["n_tokens"],
           "conditions": {name: condition_entry(data["recovery"][name], info)
                          for name, info in data["conditions_info"].items() if name in data["recovery"]}}
    pool = data["pool_run"]
    for name in (pool["llm_condition"], "lexical_pool"):
        if name:
            out["conditions"][f"pool:{name}"] = condition_entry(
                pool["recovery_vs_pool_zeroed"][name], pool["conditions_info"][name], reference="pool_zeroed",
                n_tokens=pool["conditions"][name]["n_tokens"])
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
    data = json.loads(path.read_text())
    out = ladder(data)
    out["seconds"] = round(time.perf_counter() - start, 1)
    out["run_stage_seconds"] = data["stage_seconds"]
    print(json.dumps(out, allow_nan=False))


if __name__ == "__main__":
    main()
