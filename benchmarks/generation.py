"""Greedy generation, one prompt at a time against prompts of one length batched (what the run's generate stage
and ``nl-rewrite generate`` do), on the real SmolLM2 with the default transcoder patched in and clean.

The prompts are the openings of a seeded sample of 32-token eval windows (BOS first), like the run's; the default
transcoder is loaded from the user cache (trained first if absent). Same machine; the two paths are interleaved and
the minimum of ``--repeats`` wall times is kept. Also checks that both paths pick the same tokens.

Usage: python benchmarks/generation.py [--prompts 3] [--prompt-tokens 16] [--new-tokens 12] [--repeats 3]
Last line of stdout: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from nl_rewrite.coders.train import DEFAULT_LAYER, default_transcoder
from nl_rewrite.data.windows import token_windows
from nl_rewrite.evaluation.generate import greedy, greedy_continuations
from nl_rewrite.model.loading import load_model
from nl_rewrite.replacements import TranscoderReplacement


def one_at_a_time(model, prompts, n_new, replacement) -> list[list[int]]:
    return [greedy(model, p, n_new, replacement) for p in prompts]


def timed(fn) -> tuple[float, list]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def interleaved(repeats: int, first, second) -> tuple[float, list, float, list]:
    """The minimum wall time of each path over ``repeats`` alternating runs, and each path's output."""
    runs = [(timed(first), timed(second)) for _ in range(repeats)]
    return (min(a[0] for a, _ in runs), runs[0][0][1], min(b[0] for _, b in runs), runs[0][1][1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag, default in (("--prompts", 3), ("--prompt-tokens", 16), ("--new-tokens", 12), ("--repeats", 3)):
        parser.add_argument(flag, type=int, default=default)
    args = parser.parse_args()
    model = load_model("smollm2-135m")
    windows = token_windows(model, "eval", window=32, max_windows=args.prompts, prepend_bos=True)
    prompts = [windows.tokens[i, :args.prompt_tokens] for i in range(args.prompts)]
    conditions = {"clean": None, "transcoder": TranscoderReplacement(default_transcoder(model=model))}
    result = {"benchmark": "generation", "prompts": args.prompts, "prompt_tokens": args.prompt_tokens,
              "new_tokens": args.new_tokens, "threads": torch.get_num_threads(), "layer": DEFAULT_LAYER}
    for name, rep in conditions.items():
        single_s, single, batched_s, batched = interleaved(
            args.repeats, lambda: one_at_a_time(model, prompts, args.new_tokens, rep),
            lambda: greedy_continuations(model, prompts, args.new_tokens, rep))
        result.update({f"seconds_one_at_a_time_{name}": round(single_s, 3), f"seconds_batched_{name}": round(batched_s, 3),
                       f"speedup_{name}": round(single_s / batched_s, 2), f"same_tokens_{name}": single == batched})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
