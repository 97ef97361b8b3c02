"""Evaluator throughput at the default layer: full recompute, the clean pass's residual reused from the patch point,
and that plus several conditions stacked along the batch in one forward pass (``--stack``; the Evaluator's default is 1).

The conditions mirror a run's: two ablations of the MLP's output and ``--conditions - 2`` transcoder-shaped
replacements reading the MLP's input (a random 4096-latent TopK coder; its cost is the blocks after it, not its
weights). All modes evaluate the same conditions on the same windows in one process, interleaved, taking the minimum
of ``--repeats`` wall times (the machine is shared), and must give the same numbers. Peak RSS is read after each
mode's first repeat, in the order full → reuse → stacked, so each increase is what that mode added.

It also times the per-condition scoring alone on one batch of the model's logits: ``token_ce_and_kl`` against the
textbook form the Evaluator used before (a log-softmax of the patched logits, subtracted from the clean
log-probabilities computed once), with each one's largest and mean error against a float64 KL.

Usage: python benchmarks/evaluate_throughput.py [--windows 32] [--layer 10] [--conditions 24] [--stack 4]
Last line of stdout: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
import torch.nn.functional as F

from nl_rewrite.coders.sparse_coder import CoderConfig, SparseCoder
from nl_rewrite.coders.train import DEFAULT_LAYER
from nl_rewrite.data.windows import token_windows
from nl_rewrite.evaluation.evaluator import CleanPrediction, Evaluator, token_ce_and_kl
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


@torch.no_grad()
def scoring_seconds(model, tokens: torch.Tensor, repeats: int = 10) -> dict[str, float]:
    """Both scorings of one batch, with the clean side of each computed once beforehand, as the Evaluator does. The
    patched logits are the clean ones scaled, shifted and nudged: a replacement moves logits by nats, not only by
    noise, and the weighted logit change is where a scoring's rounding shows."""
    clean_logits = model(tokens)[:, :-1]
    noise = torch.randn(clean_logits.shape, generator=torch.Generator().manual_seed(0))
    patched = 0.98 * clean_logits + 0.3 * noise + 1.0
    targets = tokens[:, 1:]
    clean = CleanPrediction.of(clean_logits)
    clean_logprobs = F.log_softmax(clean_logits, -1)
    clean_probs = clean_logprobs.exp()
    scorers = {"textbook": lambda: textbook_ce_and_kl(patched, clean_logprobs, clean_probs, targets),
               "ours": lambda: token_ce_and_kl(patched, clean, targets)}
    best = {}
    for name, fn in scorers.items():
        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        best[name] = (time.perf_counter() - start) / repeats
    exact_logprobs = clean_logprobs.double()
    exact = (exact_logprobs.exp() * (exact_logprobs - F.log_softmax(patched.double(), -1))).sum(-1)
    errors = {name: scorers[name]()[1].double() - exact for name in scorers}
    return {"seconds_score_textbook": round(best["textbook"], 4), "seconds_score": round(best["ours"], 4),
            "score_speedup": round(best["textbook"] / best["ours"], 3), "kl_mean_scored": float(exact.mean()),
            "max_abs_kl_error_textbook": float(errors["textbook"].abs().max()),
            "max_abs_kl_error": float(errors["ours"].abs().max()),
            "mean_kl_error_textbook": float(errors["textbook"].mean()), "mean_kl_error": float(errors["ours"].mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--layer", type=int, default=DEFAULT_LAYER)
    parser.add_argument("--conditions", type=int, default=24, help="replacements per run (the clean pass is shared)")
    parser.add_argument("--stack", type=int, default=4, help="conditions per forward pass when stacked")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = load_model("smollm2-135m")
    windows = token_windows(model, "eval", window=args.window, max_windows=args.windows)
    d = model.cfg.d_model
    site = f"mlp_out.{args.layer}"
    coder = SparseCoder(CoderConfig(d_in=d, d_out=d, n_latents=4096, k=32, read_site=f"mlp_in.{args.layer}",
                                    write_site=site, model="smollm2-135m"), seed=0)
    reps = [ZeroReplacement(site, name="zero"), MeanReplacement(site, torch.full((d,), 0.01), name="mean")]
    reps += [TranscoderReplacement(coder, name=f"tc{i}") for i in range(args.conditions - 2)]
    modes = {"full": dict(reuse_prefix=False, stack=1), "reuse": dict(reuse_prefix=True, stack=1),
             "stacked": dict(reuse_prefix=True, stack=args.stack)}
    best = {mode: float("inf") for mode in modes}
    results, rss = {}, {"start": peak_rss_mb()}
    for repeat in range(args.repeats):
        for mode, options in modes.items():  # interleaved, so drift in machine load hits every mode alike
            evaluator = Evaluator(model, windows, batch_size=8, progress=False, **options)
            start = time.perf_counter()
            results[mode] = evaluator.run(reps)
            best[mode] = min(best[mode], time.perf_counter() - start)
            if repeat == 0:
                rss[mode] = peak_rss_mb()

    def max_diff(mode: str, metric: str) -> float:
        ref, got = getattr(results["full"], metric), getattr(results[mode], metric)
        return max(abs(a - b) for name in ref for a, b in zip(ref[name], got[name]))

    n_tokens = windows.tokens.numel()
    scoring = scoring_seconds(model, windows.tokens[:8])
    print(json.dumps({
        "benchmark": "evaluate_throughput", "model": "smollm2-135m", "layer": args.layer,
        "threads": torch.get_num_threads(), "windows": len(windows), "tokens": n_tokens, "conditions": len(reps),
        "stack": args.stack, **{f"seconds_{mode}": round(s, 2) for mode, s in best.items()},
        "speedup_reuse_vs_full": round(best["full"] / best["reuse"], 3),
        "speedup_stacked_vs_full": round(best["full"] / best["stacked"], 3),
        "speedup_stacked_vs_reuse": round(best["reuse"] / best["stacked"], 3),
        "max_abs_ce_difference_reuse": max_diff("reuse", "ce"), "max_abs_ce_difference_stacked": max_diff("stacked", "ce"),
        "max_abs_kl_difference_stacked": max_diff("stacked", "kl"),
        "peak_rss_mb": {k: round(v) for k, v in rss.items()}, **scoring,
    }))


if __name__ == "__main__":
    main()
