"""Evaluator throughput on the embedded model: tokens/s clean-only vs with one replacement, and peak memory.

Usage: python benchmarks/evaluate_throughput.py [--windows 16] [--layer 15]
Last line of stdout: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from nl_rewrite.data import token_windows
from nl_rewrite.evaluator import Evaluator
from nl_rewrite.models import load_model
from nl_rewrite.replacements import ZeroReplacement


def timed(fn, repeats: int) -> float:
    """Minimum wall time over ``repeats`` (the machine is shared and noisy)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    model = load_model("smollm2-135m")
    windows = token_windows(model, "eval", window=args.window, max_windows=args.windows)
    evaluator = Evaluator(model, windows, batch_size=8, progress=False)
    clean_s = timed(lambda: evaluator.run([]), args.repeats)
    # clean + one replacement = two forward passes per batch
    replaced_s = timed(lambda: evaluator.run([ZeroReplacement(f"mlp_out.{args.layer}")]), args.repeats)
    n_tokens = windows.tokens.numel()
    print(json.dumps({
        "benchmark": "evaluate_throughput", "model": "smollm2-135m", "threads": torch.get_num_threads(),
        "tokens": n_tokens, "clean_tokens_per_s": n_tokens / clean_s,
        "clean_plus_replacement_tokens_per_s": n_tokens / replaced_s,
        "replacement_overhead_ratio": replaced_s / clean_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


if __name__ == "__main__":
    main()
