"""How well does the default transcoder stand in for its MLP? Issue 8's targets: on ``eval`` FVU ≤ 0.25, dead
latents ≤ 10%, fraction of CE recovered (vs zero-ablating the MLP) ≥ 0.95; on ``eval_ood`` ≥ 0.85.

Loads the cached default transcoder (training it first if absent), then for ``eval`` and ``eval_ood``:
- CE of clean, zero-ablated MLP, transcoder, and skip+bias only ("zero_latents"), via the Evaluator;
- FVU of the transcoder's mlp_out prediction, mean L0, and the fraction of latents that never fire on a larger
  sample (``--dead-windows``).

With ``--tokens``, ``--passes``, ``--lr`` or ``--lr-decay``, it trains a candidate with those settings (the rest the default's) into
``--out`` instead, and reports its training seconds beside its quality: how to measure a new default before making it.

Usage: python benchmarks/transcoder_quality.py [--windows 96] [--layer 10] [--tokens 200k --passes 4 --out DIR]
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
from nl_rewrite.model.loading import load_model, prepend_bos_for
from nl_rewrite.replacements.baselines import ZeroReplacement
from nl_rewrite.replacements.coders import TranscoderReplacement, ZeroLatentsReplacement
from nl_rewrite.coders.sparse_coder import SparseCoder
from nl_rewrite.coders.train import (DEFAULT_CODER_RECIPE, DEFAULT_LAYER, TrainConfig, default_transcoder,
                                     site_activations, train)


@torch.no_grad()
def reconstruction_stats(model, coder: SparseCoder, tokens: torch.Tensor) -> dict:
    x, y = site_activations(model, tokens, coder.cfg.read_site, coder.cfg.write_site)
    latents = coder.encode(x)
    pred = coder.decode(latents) + coder.skip(x)
    return {"fvu": float((y - pred).pow(2).sum() / (y - y.mean(0)).pow(2).sum()),
            "l0": float((latents.values > 0).sum(-1).float().mean()), "n_tokens": int(x.shape[0])}


@torch.no_grad()
def dead_fraction(model, coder: SparseCoder, tokens: torch.Tensor, chunk: int = 64) -> dict:
    """Latents that never fire on ``tokens`` (encoding only, so a large sample is cheap: a latent firing once per
    10k tokens looks dead on a 4k-token sample)."""
    fired = torch.zeros(coder.cfg.n_latents, dtype=torch.bool)
    for start in range(0, tokens.shape[0], chunk):
        x, _ = site_activations(model, tokens[start:start + chunk], coder.cfg.read_site, coder.cfg.write_site)
        latents = coder.encode(x)
        fired[latents.indices[latents.values > 0]] = True
    return {"dead_fraction": float(1 - fired.float().mean()), "dead_sample_tokens": int(tokens.numel())}


def evaluate_split(model, coder: SparseCoder, split: str, n_windows: int, model_name: str, dead_windows: int) -> dict:
    windows = token_windows(model, split, window=64, max_windows=n_windows, prepend_bos=prepend_bos_for(model_name))
    sample = token_windows(model, split, window=64, max_windows=dead_windows, seed=1,
                           prepend_bos=prepend_bos_for(model_name))
    conditions = [ZeroReplacement(coder.cfg.write_site), TranscoderReplacement(coder), ZeroLatentsReplacement(coder)]
    results = Evaluator(model, windows, batch_size=8, progress=False).run(conditions)
    ce = {name: sum(v) / len(v) for name, v in results.ce.items()}
    frac, ci = results.fraction_recovered("transcoder", worse="zero")
    frac_skip, _ = results.fraction_recovered("zero_latents", worse="zero")
    return {"fraction_ce_recovered": frac, "fraction_ce_recovered_ci": list(ci),
            "fraction_ce_recovered_undefined_resamples": ci.undefined,
            "fraction_ce_recovered_zero_latents": frac_skip, "ce": ce, "n_windows": len(windows),
            **reconstruction_stats(model, coder, windows.tokens), **dead_fraction(model, coder, sample.tokens)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layer", type=int, default=DEFAULT_LAYER)
    parser.add_argument("--windows", type=int, default=96, help="evaluation windows (64 tokens each) per split")
    parser.add_argument("--dead-windows", type=int, default=512, help="windows (64 tokens) scanned for dead latents")
    parser.add_argument("--tokens", default=None, help="train a candidate on this many model tokens (e.g. 200k)")
    parser.add_argument("--passes", type=int, default=None, help="the candidate's optimiser passes per buffer")
    parser.add_argument("--lr", type=float, default=None, help="the candidate's learning rate")
    parser.add_argument("--lr-decay", type=float, default=None,
                        help="the candidate's share of steps with a linearly falling learning rate")
    parser.add_argument("--out", default="runs/transcoder_candidate", help="the candidate's folder")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = load_model(args.model)
    start = time.perf_counter()
    settings = (("tokens", args.tokens), ("buffer_passes", args.passes), ("lr", args.lr), ("lr_decay", args.lr_decay))
    candidate = {k: v for k, v in settings if v is not None}
    if candidate:
        cfg = TrainConfig(model=args.model, layer=args.layer, out=args.out,
                          **{**DEFAULT_CODER_RECIPE, **candidate})
        coder = train(cfg, model=model)
    else:
        coder = default_transcoder(args.model, args.layer, model=model)
    train_seconds = time.perf_counter() - start
    out = {"model": args.model, "site": coder.cfg.write_site, "width": coder.cfg.n_latents, "k": coder.cfg.k,
           "candidate": candidate, "seconds_to_get_coder": round(train_seconds, 1)}
    for split in ("eval", "eval_ood"):
        t = time.perf_counter()
        out[split] = evaluate_split(model, coder, split, args.windows, args.model, args.dead_windows)
        out[split]["seconds"] = round(time.perf_counter() - t, 1)
        print(split, json.dumps(out[split]), flush=True)
    ev, ood = out["eval"], out["eval_ood"]
    out["targets"] = {"fvu_eval<=0.25": ev["fvu"] <= 0.25, "dead_eval<=0.10": ev["dead_fraction"] <= 0.10,
                      "ce_recovered_eval>=0.95": ev["fraction_ce_recovered"] >= 0.95,
                      "ce_recovered_eval_ood>=0.85": ood["fraction_ce_recovered"] >= 0.85}
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
