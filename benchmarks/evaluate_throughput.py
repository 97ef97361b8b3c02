"""Evaluator throughput at the default layer, mode against mode:

- ``chunked``: the Evaluator's defaults: the clean pass's residual reused from the patch point, ``--stack``
  conditions along the batch in one forward pass, and scoring from the last hidden state with the unembedding
  applied a vocabulary chunk at a time (nl_rewrite/evaluation/scoring.py);
- ``full_chunked``: full recompute (each condition from the embedding, one at a time) with the chunked scoring;
- ``full``: full recompute to the model's logits, scored from them (the baseline);
- ``reuse``: that, with the clean pass's residual reused from the patch point;
- ``stacked``: that, plus ``--stack`` conditions per forward pass.

The conditions mirror a run's: two ablations of the MLP's output and ``--conditions - 2`` transcoder-shaped
replacements reading the MLP's input (a random 4096-latent TopK coder; its cost is the blocks after it, not its
weights). All modes evaluate the same conditions on the same windows in one process, interleaved, taking the minimum
of ``--repeats`` wall times (the machine is shared), and must give the same numbers. Peak RSS is read after each
mode's first repeat, in the order of the list above, so each increase is what that mode added.

It also times the per-condition unembedding and scoring alone on one batch (``scoring_seconds``), with each way's
largest and mean error against a float64 KL.

Where the time goes (``flop_accounting``): each mode's matrix-multiply FLOPs over the whole run (counted by
``torch.utils.flop_counter`` on one and two batches, then scaled to the run's windows), the GFLOP/s each mode then
reached, and a 2048³ float32 GEMM's GFLOP/s in the same process: a mode near that rate is bound by its FLOPs, and
its speedup over full recompute can then exceed the FLOP ratio only by what it saves outside the multiplies. And
the defaults' ceiling: the share of their time spent inside matrix multiplies (``torch.profiler`` on two batches),
and the speedup they would reach if that were all the time they took (``speedup_chunked_vs_full_if_only_matmuls``).

Usage: python benchmarks/evaluate_throughput.py [--windows 32] [--layer 10] [--conditions 24] [--stack 2]
Last line of stdout: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from nl_rewrite.coders.sparse_coder import CoderConfig, SparseCoder
from nl_rewrite.coders.train import DEFAULT_LAYER
from nl_rewrite.data.windows import token_windows
from nl_rewrite.evaluation.evaluator import DEFAULT_STACK, Evaluator
from nl_rewrite.evaluation.scoring import CleanPrediction, LinearUnembedding, token_ce_and_kl, unembedding_deferred
from nl_rewrite.model.loading import load_model
from nl_rewrite.replacements import MeanReplacement, TranscoderReplacement, ZeroReplacement


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def textbook_ce_and_kl(logits: torch.Tensor, clean_logprobs: torch.Tensor, clean_probs: torch.Tensor,
                       targets: torch.Tensor):
    """What the Evaluator scored with before: the clean log-probabilities and probabilities computed once per batch
    (passed in), a log-softmax of the patched logits, and the KL as the probability-weighted difference."""
    logprobs = F.log_softmax(logits, -1)
    ce = -logprobs.gather(-1, targets[..., None]).squeeze(-1)
    return ce, torch.einsum("bpv,bpv->bp", clean_probs, clean_logprobs - logprobs).clamp_min(0.0)


def mode_options(stack: int) -> dict[str, dict]:
    """Each mode's Evaluator options (the module docstring's list)."""
    logits = dict(chunked_unembedding=False)
    # the chunked modes first: peak RSS only grows, and they are the ones expected to need less
    return {"chunked": dict(reuse_prefix=True, stack=stack), "full_chunked": dict(reuse_prefix=False, stack=1),
            "full": dict(reuse_prefix=False, stack=1, **logits), "reuse": dict(reuse_prefix=True, stack=1, **logits),
            "stacked": dict(reuse_prefix=True, stack=stack, **logits)}


MODES = tuple(mode_options(1))


def mean_seconds(fn, repeats: int) -> float:
    """Mean wall time of ``repeats`` calls after one warm-up call."""
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


@torch.no_grad()
def scoring_seconds(model, tokens: torch.Tensor, repeats: int = 10) -> dict[str, float]:
    """Unembedding and scoring one batch three ways, each with its clean side computed once beforehand, as the
    Evaluator does: the model's logits scored the textbook way (a log-softmax of the patched logits) or by
    ``token_ce_and_kl`` (``Logits``), and from the hidden state a vocabulary chunk at a time (``LinearUnembedding``,
    the Evaluator's default), at several chunk sizes. Errors are against a float64 KL, for hidden states nudged by
    30% of their spread (KLs of nats) and by 0.1% (small KLs, where rounding shows)."""
    with unembedding_deferred(model):
        clean_hidden = model(tokens)[:, :-1]
    unembedding, targets = LinearUnembedding.of(model), tokens[:, 1:]
    whole = slice(None)
    clean_logits = unembedding.logits(clean_hidden, whole)
    clean, chunked_clean = CleanPrediction.of(clean_logits), CleanPrediction.of(clean_hidden, unembedding)
    clean_logprobs = F.log_softmax(clean_logits, -1)
    clean_probs = clean_logprobs.exp()
    noise = torch.randn(clean_hidden.shape, generator=torch.Generator().manual_seed(0)) * clean_hidden.std()
    scorers = {
        "textbook": lambda h: textbook_ce_and_kl(unembedding.logits(h, whole), clean_logprobs, clean_probs, targets),
        "logits": lambda h: token_ce_and_kl(unembedding.logits(h, whole), clean, targets),
        "chunked": lambda h: token_ce_and_kl(h, chunked_clean, targets)}
    patched = clean_hidden + 0.3 * noise
    out: dict[str, float] = {f"seconds_score_{name}": round(mean_seconds(lambda: fn(patched), repeats), 4)
                             for name, fn in scorers.items()}
    for chunk in (1024, 2048, 4096, 8192, unembedding.weight.shape[0]):  # CHUNK in nl_rewrite/evaluation/scoring.py
        sized = CleanPrediction.of(clean_hidden, unembedding, chunk=chunk)
        out[f"seconds_score_chunk_{chunk}"] = round(
            mean_seconds(lambda: token_ce_and_kl(patched, sized, targets, chunk=chunk), repeats), 4)
    out["score_speedup_chunked_vs_logits"] = round(out["seconds_score_logits"] / out["seconds_score_chunked"], 3)
    exact_logprobs = clean_logits.double().log_softmax(-1)
    for nudge, size in (("large", 0.3), ("small", 1e-3)):
        hidden = clean_hidden + size * noise
        patched_logprobs = unembedding.logits(hidden, whole).double().log_softmax(-1)
        exact = (exact_logprobs.exp() * (exact_logprobs - patched_logprobs)).sum(-1)
        exact_ce = -patched_logprobs.gather(-1, targets[..., None]).squeeze(-1)
        out[f"kl_mean_{nudge}"] = float(exact.mean())
        for name, fn in scorers.items():
            ce, kl = fn(hidden)
            out[f"max_abs_kl_error_{nudge}_{name}"] = float((kl.double() - exact).abs().max())
            out[f"mean_kl_error_{nudge}_{name}"] = float((kl.double() - exact).mean())
            out[f"max_abs_ce_error_{nudge}_{name}"] = float((ce.double() - exact_ce).abs().max())
    return out


def gemm_gflops(size: int = 2048, repeats: int = 10) -> float:
    """This machine's float32 GEMM rate at the benchmark's thread count (the best of ``repeats``, as the modes'
    times are): the ceiling for FLOP-bound work."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up, once
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        seconds.append(time.perf_counter() - start)
    return 2 * size ** 3 / min(seconds) / 1e9


def evaluated(model, windows, reps, options: dict, batch_size: int):
    """One Evaluator run of a mode's ``options`` over ``windows``, without a progress bar."""
    return Evaluator(model, windows, batch_size=batch_size, progress=False, **options).run(reps)


MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")


def matmul_share(model, windows, reps, options: dict, batch_size: int) -> float:
    """The share of an Evaluator run's wall time spent inside matrix multiplies, by ``torch.profiler`` on its first
    two batches (the share is the same batch after batch). The profiler's own overhead counts as time outside them,
    so the share errs low and the ceiling built on it high."""
    sample = windows.subset(range(min(len(windows), 2 * batch_size)))
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        start = time.perf_counter()
        evaluated(model, sample, reps, options, batch_size)
        wall_us = (time.perf_counter() - start) * 1e6
    self_us = {event.key: event.self_cpu_time_total for event in profiler.key_averages()}
    return sum(self_us.get(op, 0) for op in MATMULS) / wall_us


def counted_flops(model, windows, reps, options: dict, batch_size: int) -> int:
    with FlopCounterMode(display=False) as counter:
        evaluated(model, windows, reps, options, batch_size)
    return counter.get_total_flops()


def run_flops(model, windows, reps, options: dict, batch_size: int) -> int:
    """Matrix-multiply FLOPs of one Evaluator run of ``options`` over all of ``windows``. Beyond two batches, from
    runs on one and two: their difference is a batch's work, linear in its windows (they all have one length), and
    the rest is once per run (the checks before the first batch)."""
    if len(windows) <= 2 * batch_size:
        return counted_flops(model, windows, reps, options, batch_size)
    one, two = (counted_flops(model, windows.subset(range(n * batch_size)), reps, options, batch_size)
                for n in (1, 2))
    return one + (two - one) * (len(windows) - batch_size) // batch_size


def flop_accounting(model, windows, reps, modes: dict[str, dict], seconds: dict[str, float],
                    batch_size: int) -> dict:
    flops = {mode: run_flops(model, windows, reps, options, batch_size) for mode, options in modes.items()}
    ceiling = {}
    if "chunked" in modes:  # the defaults' speedup, were their matrix multiplies all the time they took
        share = matmul_share(model, windows, reps, modes["chunked"], batch_size)
        ceiling = {"matmul_share_chunked": round(share, 3),
                   "speedup_chunked_vs_full_if_only_matmuls": round(seconds["full"] / (seconds["chunked"] * share), 3)}
    return {"gemm_gflop_per_second_2048": round(gemm_gflops(), 1), **ceiling,
            **{f"gflop_{mode}": round(f / 1e9, 1) for mode, f in flops.items()},
            **{f"gflop_per_second_{mode}": round(f / 1e9 / seconds[mode], 1) for mode, f in flops.items()},
            **{f"flop_ratio_full_vs_{mode}": round(flops["full"] / f, 3) for mode, f in flops.items()
               if mode != "full"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--layer", type=int, default=DEFAULT_LAYER)
    parser.add_argument("--conditions", type=int, default=24, help="replacements per run (the clean pass is shared)")
    parser.add_argument("--stack", type=int, default=DEFAULT_STACK, help="conditions per forward pass when stacked")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--modes", default=",".join(MODES),
                        help="comma-separated modes to time (full, the baseline, always runs)")
    parser.add_argument("--compare-stack", type=int, default=0,
                        help="also time the chunked mode at this many conditions per pass (mode chunked_stackN)")
    args = parser.parse_args()
    unknown = set(args.modes.split(",")) - set(MODES)
    if unknown:  # before the model loads
        parser.error(f"unknown modes {sorted(unknown)}; choose from {', '.join(MODES)}")
    torch.set_num_threads(2)
    model = load_model("smollm2-135m")
    windows = token_windows(model, "eval", window=args.window, max_windows=args.windows)
    d = model.cfg.d_model
    site = f"mlp_out.{args.layer}"
    coder = SparseCoder(CoderConfig(d_in=d, d_out=d, n_latents=4096, k=32, read_site=f"mlp_in.{args.layer}",
                                    write_site=site, model="smollm2-135m"), seed=0)
    reps = [ZeroReplacement(site, name="zero"), MeanReplacement(site, torch.full((d,), 0.01), name="mean")]
    reps += [TranscoderReplacement(coder, name=f"tc{i}") for i in range(args.conditions - 2)]
    modes = mode_options(args.stack)
    modes = {mode: options for mode, options in modes.items() if mode == "full" or mode in args.modes.split(",")}
    if args.compare_stack:
        modes[f"chunked_stack{args.compare_stack}"] = dict(reuse_prefix=True, stack=args.compare_stack)
    best = {mode: float("inf") for mode in modes}
    results, rss = {}, {"start": peak_rss_mb()}
    for repeat in range(args.repeats):
        for mode, options in modes.items():  # interleaved, so drift in machine load hits every mode alike
            start = time.perf_counter()
            results[mode] = evaluated(model, windows, reps, options, batch_size=8)
            best[mode] = min(best[mode], time.perf_counter() - start)
            if repeat == 0:
                rss[mode] = peak_rss_mb()

    def max_diff(mode: str, metric: str) -> float:
        ref, got = getattr(results["full"], metric), getattr(results[mode], metric)
        return max(abs(a - b) for name in ref for a, b in zip(ref[name], got[name]))

    n_tokens = windows.tokens.numel()
    scoring = scoring_seconds(model, windows.tokens[:8])
    accounting = flop_accounting(model, windows, reps, modes, best, batch_size=8)
    print(json.dumps({
        "benchmark": "evaluate_throughput", "model": "smollm2-135m", "layer": args.layer,
        "threads": torch.get_num_threads(), "windows": len(windows), "tokens": n_tokens, "conditions": len(reps),
        "stack": args.stack, **{f"seconds_{mode}": round(s, 2) for mode, s in best.items()},
        **{f"speedup_{mode}_vs_full": round(best["full"] / best[mode], 3) for mode in modes if mode != "full"},
        **{f"speedup_{fast}_vs_{slow}": round(best[slow] / best[fast], 3)
           for fast, slow in (("stacked", "reuse"), ("chunked", "stacked"), ("chunked", "full_chunked"),
                              (f"chunked_stack{args.compare_stack}", "chunked"))
           if fast in best and slow in best},
        **{f"max_abs_{metric}_difference_{mode}": max_diff(mode, metric) for mode in modes if mode != "full"
           for metric in ("ce", "kl")},
        "peak_rss_mb": {k: round(v) for k, v in rss.items()}, **scoring, **accounting,
    }))


if __name__ == "__main__":
    main()
