"""Evaluator throughput: reusing the clean pass's residual at the patched layer vs recomputing every layer.

Both paths evaluate the same conditions on the same windows in the same process, interleaved, taking the
minimum of ``--repeats`` wall times (the machine is shared). Also checks the two give the same numbers.

Usage: python benchmarks/evaluate_throughput.py [--windows 32] [--layer 10] [--conditions 8]
Last line of stdout: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from nl_rewrite.data.windows import token_windows
from nl_rewrite.evaluation.evaluator import Evaluator
from nl_rewrite.model.loading import load_model
from nl_rewrite.replacements import MeanReplacement, ZeroReplacement
from nl_rewrite.coders.train import DEFAULT_LAYER


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--layer", type=int, default=DEFAULT_LAYER)
    parser.add_argument("--conditions", type=int, default=8, help="replacements evaluated per run (the clean pass is shared)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = load_model("smollm2-135m")
    windows = token_windows(model, "eval", window=args.window, max_windows=args.windows)
    site = f"mlp_out.{args.layer}"
    d = model.cfg.d_model
    reps = [ZeroReplacement(site, name="zero")] + [MeanReplacement(site, torch.full((d,), 0.01 * i), name=f"m{i}")
                                                   for i in range(args.conditions - 1)]
    best = {"reuse": float("inf"), "full": float("inf")}
    results = {}
    for _ in range(args.repeats):
        for mode in best:  # interleaved, so drift in machine load hits both paths alike
            evaluator = Evaluator(model, windows, batch_size=8, progress=False, reuse_prefix=mode == "reuse")
            start = time.perf_counter()
            results[mode] = evaluator.run(reps)
            best[mode] = min(best[mode], time.perf_counter() - start)
    max_diff = max(abs(a - b) for name in results["full"].ce for a, b in zip(results["full"].ce[name],
                                                                              results["reuse"].ce[name]))
    n_tokens = windows.tokens.numel()
    print(json.dumps({
        "benchmark": "evaluate_throughput", "model": "smollm2-135m", "layer": args.layer, "threads": torch.get_num_threads(),
        "tokens": n_tokens, "conditions": len(reps),
        "full_recompute_tokens_per_s_per_condition": n_tokens * len(reps) / best["full"],
        "prefix_reuse_tokens_per_s_per_condition": n_tokens * len(reps) / best["reuse"],
        "speedup": best["full"] / best["reuse"], "max_abs_ce_difference": max_diff,
        "seconds_full": best["full"], "seconds_reuse": best["reuse"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


if __name__ == "__main__":
    main()
