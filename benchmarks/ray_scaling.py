"""Ray against one process: the latent cache and the Evaluator on the real SmolLM2, same windows, same machine.

In one process torch uses every core (``--threads``); on Ray, ``--workers`` actors use one core each and each gets
its own copy of the model (unpickling it is part of the Ray time, paid per stage). Two Ray paths: ``ray`` keeps its
worker processes from the latent cache to the evaluation, as one run keeps them from stage to stage, and stops them
after (so each repeat's cache stage starts them); ``ray_fresh`` starts new ones for every stage (the behaviour before
workers were kept). Paths are interleaved and the minimum of ``--repeats`` wall times is kept (the machine is
shared). Also reports the largest difference between the one-process and Ray numbers.

Usage: python benchmarks/ray_scaling.py [--windows 64] [--workers 2] [--repeats 2]
Last line of stdout: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch

from nl_rewrite.coders.train import DEFAULT_LAYER, default_transcoder
from nl_rewrite.data.windows import token_windows
from nl_rewrite.evaluation.evaluator import Evaluator
from nl_rewrite.latents.cache import LatentCache
from nl_rewrite.model.loading import load_model
from nl_rewrite.parallel.runner import InProcess, RayOptions, RayRunner
from nl_rewrite.replacements import MeanReplacement, TranscoderReplacement, ZeroReplacement


class FreshWorkers(RayRunner):
    """A Ray runner that starts new worker processes for every stage."""

    def map(self, *args, **kwargs) -> None:
        try:
            super().map(*args, **kwargs)
        finally:
            self.stop()


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def cache_run(model, coder, windows, runner, root: Path) -> tuple[float, LatentCache]:
    folder = Path(tempfile.mkdtemp(dir=root))
    return timed(lambda: LatentCache.build(model, coder, windows, folder, shard_windows=16, progress=False,
                                           runner=runner))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the single process")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    import ray

    torch.set_num_threads(args.threads)
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    model = load_model("smollm2-135m")
    coder = default_transcoder("smollm2-135m", model=model)
    windows = token_windows(model, "eval", window=32, max_windows=args.windows)
    site = f"mlp_out.{DEFAULT_LAYER}"
    conditions = [TranscoderReplacement(coder), ZeroReplacement(site, name="zero"),
                  MeanReplacement(site, torch.zeros(model.cfg.d_model) + 0.01, name="mean")]
    options = RayOptions(workers=args.workers, retries=1)
    runners = {"one_process": InProcess(), "ray": RayRunner(options), "ray_fresh": FreshWorkers(options)}
    best = {f"{stage}_{name}": float("inf") for stage in ("cache", "evaluate") for name in runners}
    out: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as root:
        for _ in range(args.repeats):
            for name, runner in runners.items():  # interleaved: load drift hits both paths alike
                seconds, out[f"cache_{name}"] = cache_run(model, coder, windows, runner, Path(root))
                best[f"cache_{name}"] = min(best[f"cache_{name}"], seconds)
                evaluator = Evaluator(model, windows, batch_size=8, progress=False)
                seconds, out[f"evaluate_{name}"] = timed(lambda: evaluator.run(conditions, runner))
                best[f"evaluate_{name}"] = min(best[f"evaluate_{name}"], seconds)
                if isinstance(runner, RayRunner):
                    runner.stop()  # kept for its two stages (cache, then evaluate), like one run; the CPUs freed
        one, other = out["evaluate_one_process"], out["evaluate_ray"]
        ce_diff = max(abs(a - b) for n in one.ce for a, b in zip(one.ce[n], other.ce[n]))
        stats_diff = float((out["cache_one_process"].stats.mean - out["cache_ray"].stats.mean).abs().nan_to_num().max())
    ray.shutdown()
    print(json.dumps({
        "benchmark": "ray_scaling", "model": "smollm2-135m", "windows": args.windows, "window": 32,
        "workers": args.workers, "single_process_threads": args.threads, "conditions": len(conditions) + 1,
        **{f"seconds_{k}": round(v, 2) for k, v in best.items()},
        "cache_speedup_ray": best["cache_one_process"] / best["cache_ray"],
        "evaluate_speedup_ray": best["evaluate_one_process"] / best["evaluate_ray"],
        "cache_speedup_kept_workers": best["cache_ray_fresh"] / best["cache_ray"],
        "evaluate_speedup_kept_workers": best["evaluate_ray_fresh"] / best["evaluate_ray"],
        "max_abs_ce_difference": ce_diff, "max_abs_latent_mean_difference": stats_diff,
        "peak_rss_mb_driver": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


if __name__ == "__main__":
    main()
