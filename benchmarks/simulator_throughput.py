"""Simulator throughput: (latent, token) predictions per second, three ways, in one run.

Same explanations ("latents"), same 32-token windows from the explain split, same embedded model:
  1. paper mode as the paper ran it: one independent request per (latent, token), every prompt processed in
     full (``paper_no_reuse``; the headline baseline), and paper mode with the few-shot+explanation prefix KV
     reused and requests batched (``paper``; the strongest version of the baseline);
  2. all-at-once, prefix recomputed for every window (``EmbeddedBackend(reuse_prefix=False)``);
  3. all-at-once, prefix KV computed once per latent and reused across its windows;
  4. the trained single-pass simulator (``--trained FOLDER``, else an untrained net of the default shape: same
     speed), on the same windows (``trained``) and on ``--trained-windows`` windows per latent (``trained_batched``,
     how it runs over a whole eval sample).
Backends are warmed up on an unrelated prompt; each timing starts with an empty prefix cache, so prefix
costs are counted; all-at-once modes take the best of ``--repeats``. Peak memory is the process's max RSS after each mode (monotone).
The last line of stdout is one JSON object.

    python benchmarks/simulator_throughput.py [--latents 2] [--windows 2] [--paper-windows 2] [--trained FOLDER]
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

EXPLANATIONS = (
    "numbers, years and dates",
    "words about government, law and the state",
    "the word \"the\" and other articles",
    "punctuation that ends a sentence",
)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def windows_as_strings(tokenizer, n: int, window: int) -> list[tuple[str, ...]]:
    from nl_rewrite.data.windows import token_windows

    windows = token_windows(tokenizer, "explain", window=window, max_windows=n, seed=0)
    return [tuple(tokenizer.decode([t]) for t in row.tolist()) for row in windows.tokens]


def make_backend(reuse: bool):
    """A backend warmed up on an unrelated prompt, so one-time start-up costs are not timed."""
    from nl_rewrite.llm.embedded import EmbeddedBackend
    from nl_rewrite.interp.simulate import SimulationItem, Simulator

    backend = EmbeddedBackend("smollm2-135m", reuse_prefix=reuse)
    Simulator(backend, "all_at_once").simulate_many([SimulationItem("warm-up", ("a", " b"))])
    return backend


def time_mode(backend, mode: str, explanations, windows) -> tuple[float, int]:
    """Seconds and predictions for simulating every (explanation, window), prefix cache empty at the start."""
    from nl_rewrite.interp.simulate import SimulationItem, Simulator

    backend._prefixes.clear()  # benchmark only: each repeat must pay for its prefixes, as a fresh run would
    sim = Simulator(backend, mode)
    items = [SimulationItem(e, w) for e in explanations for w in windows]
    start = time.perf_counter()
    scores = sim.simulate_many(items)
    elapsed = time.perf_counter() - start
    n = sum(s.numel() for s in scores)
    assert n == sum(len(w) for w in windows) * len(explanations)
    assert sim.stats.nan_predictions == 0, "the embedded backend always gives digit logprobs"
    return elapsed, n


def trained_simulator(folder: str):
    from nl_rewrite.trained.net import InputEncoder, NetConfig, SimulatorNet
    from nl_rewrite.trained.simulator import TrainedSimulator
    from nl_rewrite.trained.training import load_simulator

    if folder:
        return load_simulator(folder)
    net, tokenizer = SimulatorNet.from_base(NetConfig())
    return TrainedSimulator(net.eval(), InputEncoder(tokenizer), "untrained")


def time_trained(sim, explanations, windows) -> tuple[float, int]:
    from nl_rewrite.interp.simulate import SimulationItem

    items = [SimulationItem(e, w) for e in explanations for w in windows]
    start = time.perf_counter()
    scores = sim.simulate_many(items)
    elapsed = time.perf_counter() - start
    return elapsed, sum(s.numel() for s in scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latents", type=int, default=2)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--paper-windows", type=int, default=2, help="windows for paper mode (the slow one)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--trained", default="", help="trained simulator folder (default: untrained, same speed)")
    parser.add_argument("--trained-windows", type=int, default=64, help="windows per latent for trained_batched")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from nl_rewrite.model.loading import load_hf

    _, tokenizer = load_hf("smollm2-135m")
    explanations = EXPLANATIONS[: args.latents]
    windows = windows_as_strings(tokenizer, max(args.windows, args.paper_windows, args.trained_windows), args.window)
    results: dict[str, dict[str, float]] = {}
    runs = (("paper_no_reuse", "paper", False, windows[: args.paper_windows], 1),
            ("paper", "paper", True, windows[: args.paper_windows], 1),
            ("all_at_once_no_reuse", "all_at_once", False, windows[: args.windows], args.repeats),
            ("all_at_once_reuse", "all_at_once", True, windows[: args.windows], args.repeats))
    backends = {True: make_backend(True), False: make_backend(False)}
    for name, mode, reuse, wins, repeats in runs:
        timings = [time_mode(backends[reuse], mode, explanations, wins) for _ in range(repeats)]
        seconds, n = min(timings)
        results[name] = {"predictions": n, "seconds": round(seconds, 3),
                         "predictions_per_s": round(n / seconds, 2), "peak_rss_mb_after": round(peak_rss_mb(), 1)}
        print(f"{name}: {n} predictions in {seconds:.2f} s = {n / seconds:.1f}/s", flush=True)
    sim = trained_simulator(args.trained)
    time_trained(sim, ["warm-up"], windows[:1])
    for name, wins in (("trained", windows[: args.windows]), ("trained_batched", windows[: args.trained_windows])):
        seconds, n = min(time_trained(sim, explanations, wins) for _ in range(args.repeats))
        results[name] = {"predictions": n, "seconds": round(seconds, 3),
                         "predictions_per_s": round(n / seconds, 2), "peak_rss_mb_after": round(peak_rss_mb(), 1)}
        print(f"{name}: {n} predictions in {seconds:.2f} s = {n / seconds:.1f}/s", flush=True)
    paper = results["paper_no_reuse"]["predictions_per_s"]
    paper_reuse = results["paper"]["predictions_per_s"]
    summary = {
        "benchmark": "simulator_throughput", "model": "smollm2-135m", "threads": args.threads,
        "latents": len(explanations), "windows": args.windows, "paper_windows": args.paper_windows,
        "window": args.window, "modes": results,
        "ratio_all_at_once_no_reuse_vs_paper": round(results["all_at_once_no_reuse"]["predictions_per_s"] / paper, 2),
        "ratio_all_at_once_reuse_vs_paper": round(results["all_at_once_reuse"]["predictions_per_s"] / paper, 2),
        "ratio_all_at_once_reuse_vs_paper_with_reuse": round(results["all_at_once_reuse"]["predictions_per_s"]
                                                             / paper_reuse, 2),
        "ratio_reuse_vs_no_reuse": round(results["all_at_once_reuse"]["predictions_per_s"]
                                         / results["all_at_once_no_reuse"]["predictions_per_s"], 2),
        "ratio_trained_vs_paper": round(results["trained"]["predictions_per_s"] / paper, 1),
        "ratio_trained_batched_vs_paper": round(results["trained_batched"]["predictions_per_s"] / paper, 1),
        "ratio_trained_vs_all_at_once_reuse": round(results["trained"]["predictions_per_s"]
                                                    / results["all_at_once_reuse"]["predictions_per_s"], 1),
        "trained_weights": args.trained or "untrained (same shape and speed)", "target_trained_vs_paper": 200,
        "target_reuse_vs_paper": 20, "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
