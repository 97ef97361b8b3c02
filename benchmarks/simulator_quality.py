"""Simulator quality on held-out latents × held-out documents of the explain split, three readers side by side.

The trained simulator (``--trained FOLDER``), the deterministic lexical reader and the prompted SmolLM2
all-at-once simulator read the *same* lexical explanations (written from the training documents only) on the *same*
(latent, window) items: the trained simulator's held-out latents, each on up to ``windows_per_latent`` held-out-
document windows where it fires and as many where it does not (the training data's balance rule). Per latent:
Pearson and Spearman of raw scores with the true activations, and the AUROC of the scores for "fires" (true > 0).
Reported: median and IQR over latents, and paired Wilcoxon signed-rank tests between simulators over the latents
where both are defined. The eval split is never read. The last line of stdout is one JSON object.

    NL_REWRITE_CACHE=... python benchmarks/simulator_quality.py --out RUN_DIR --trained FOLDER [--latents 24]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch


def per_latent(scores: dict[int, np.ndarray], truth: dict[int, np.ndarray]) -> dict[str, dict[int, float]]:
    from scipy.stats import pearsonr, spearmanr

    from nl_rewrite.interp.score import auroc

    out: dict[str, dict[int, float]] = {"pearson": {}, "spearman": {}, "auroc": {}}
    for lat, s in scores.items():
        t = truth[lat]
        varied = s.std() > 0 and t.std() > 0
        out["pearson"][lat] = float(pearsonr(s, t)[0]) if varied else math.nan
        out["spearman"][lat] = float(spearmanr(s, t)[0]) if varied else math.nan
        fires = t > 0
        out["auroc"][lat] = auroc(fires, s) if 0 < fires.sum() < len(fires) else math.nan
    return out


def summary(values: dict[int, float]) -> dict:
    v = np.array([x for x in values.values() if math.isfinite(x)])
    if not len(v):
        return {"n": 0}
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return {"n": int(len(v)), "median": round(float(med), 4), "iqr": [round(float(q1), 4), round(float(q3), 4)],
            "mean": round(float(v.mean()), 4)}


def paired(a: dict[int, float], b: dict[int, float]) -> dict:
    from scipy.stats import wilcoxon

    keys = [k for k in a if math.isfinite(a[k]) and math.isfinite(b.get(k, math.nan))]
    if len(keys) < 5:
        return {"n": len(keys), "p": None, "note": "fewer than 5 latents defined for both"}
    diff = np.array([a[k] - b[k] for k in keys])
    return {"n": len(keys), "median_difference": round(float(np.median(diff)), 4),
            "p": float(wilcoxon(diff).pvalue), "first_better_share": round(float((diff > 0).mean()), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="run folder whose <out>/latents is the explain cache")
    parser.add_argument("--trained", required=True, help="trained simulator checkpoint folder")
    parser.add_argument("--latents", type=int, default=24, help="held-out latents compared (the prompted one is slow)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from nl_rewrite.interp.lexical import LexicalSimulator
    from nl_rewrite.interp.simulate import SimulationItem, Simulator
    from nl_rewrite.llm.embedded import EmbeddedBackend
    from nl_rewrite.pipeline.config import RunConfig
    from nl_rewrite.pipeline.run_context import explain_cache
    from nl_rewrite.trained.data import build_data
    from nl_rewrite.trained.training import TrainSimulatorConfig, heldout_latents, load_simulator, read_checkpoint_config

    saved = Path(args.out) / "config.toml"  # the run's own options: another run's cache is never rebuilt over it
    run_cfg = dataclasses.replace(RunConfig.from_toml(saved), out=args.out) if saved.is_file() else RunConfig(out=args.out)
    cache, doc_ids = explain_cache(run_cfg.resolved())
    tcfg = TrainSimulatorConfig(**read_checkpoint_config(Path(args.trained))["config"])
    data = build_data(cache, doc_ids, tcfg)
    assert data.val_latents == heldout_latents(args.trained), "the split differs from the checkpoint's"
    with_items = sorted({i.latent for i in data.val_items})  # held-out latents that fire on a held-out document
    latents = with_items[: args.latents]
    items = [i for i in data.val_items if i.latent in set(latents)]
    sim_items = [SimulationItem(i.explanation, tuple(cache.token_strings(cache.window_tokens(i.window)))) for i in items]
    truth_rows = [cache.dense_window(i.window)[:, i.latent].numpy() for i in items]
    readers = {"trained": load_simulator(args.trained), "lexical": LexicalSimulator(),
               "prompted": Simulator(EmbeddedBackend("smollm2-135m"), "all_at_once")}
    metrics, seconds = {}, {}
    for name, reader in readers.items():
        start = time.perf_counter()
        rows = [r.numpy() for r in reader.simulate_many(sim_items)]
        seconds[name] = round(time.perf_counter() - start, 2)
        scores = {lat: np.concatenate([r for r, i in zip(rows, items) if i.latent == lat]) for lat in latents}
        truth = {lat: np.concatenate([t for t, i in zip(truth_rows, items) if i.latent == lat]) for lat in latents}
        metrics[name] = per_latent(scores, truth)
        print(f"{name}: " + ", ".join(f"{m} {summary(v)}" for m, v in metrics[name].items()), flush=True)
    result = {
        "benchmark": "simulator_quality", "trained": args.trained, "heldout_latents": len(latents),
        "items": len(items), "predictions_per_reader": int(sum(len(t) for t in truth_rows)),
        "explanations": f"lexical, <= {tcfg.budget} items, written from the training documents",
        "readers": {name: {m: summary(v) for m, v in by.items()} for name, by in metrics.items()},
        "paired_wilcoxon": {f"{a}_vs_{b}": {m: paired(metrics[a][m], metrics[b][m]) for m in ("pearson", "auroc")}
                            for a, b in (("trained", "prompted"), ("trained", "lexical"), ("lexical", "prompted"))},
        "seconds": seconds,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
