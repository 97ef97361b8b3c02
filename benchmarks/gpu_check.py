"""The smoke preset on CUDA and on the CPU, side by side: every condition's CE and KL must agree within a stated
tolerance, and each stage's seconds are reported for both.

Each device gets its own empty cache (the converted models linked from the user cache), so each trains its own
coder, builds its own latent cache and calls its own embedded LLM: the same windows and seeds, different hardware.
The two coders are trained apart, so conditions can differ by training noise as well as by float rounding; the
tolerances below are set for that (a device bug, a patch written to the wrong rows or a dtype lost on the way,
moves a condition by far more).

Without CUDA it says so in its JSON and exits 0. Usage: python benchmarks/gpu_check.py [--device cuda:0]
Last line of stdout: one JSON object.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CE_TOLERANCE = 0.05
"""Largest |mean CE (CUDA) − mean CE (CPU)| of one condition, in nats."""
KL_TOLERANCE = 0.05
"""Largest |mean KL (CUDA) − mean KL (CPU)| of one condition, in nats."""
SHARED = ("models", "windows")
"""User-cache folders both runs link to: converted models and tokenised windows (device-free)."""


def run_on(device: str, root: Path) -> tuple[dict[tuple[str, str], tuple[float, float]], dict, float]:
    """``nl-rewrite run --preset smoke --device <device>`` from an empty cache under ``root``: each condition's
    (mean CE, mean KL), the stage seconds, and the wall time."""
    from nl_rewrite.paths import cache_dir

    cache = root / "cache"
    cache.mkdir(parents=True)
    for name in SHARED:
        (cache_dir() / name).mkdir(parents=True, exist_ok=True)
        (cache / name).symlink_to(cache_dir() / name)
    out = root / "run"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "nl_rewrite.cli.main", "run", "--preset", "smoke", "--device", device,
                    "--out", str(out)], env={**os.environ, "NL_REWRITE_CACHE": str(cache)}, check=True)
    wall = time.perf_counter() - start
    with open(out / "results.csv") as fh:
        rows = {(r["run"], r["condition"]): (float(r["mean_ce"]), float(r["kl_mean"])) for r in csv.DictReader(fh)}
    return rows, json.loads((out / "results.json").read_text())["stage_seconds"], wall


def compare(cuda: dict, cpu: dict) -> dict:
    """Per-condition differences, and whether each is within its tolerance."""
    shared = sorted(set(cuda) & set(cpu))
    ce = {f"{r}/{c}": abs(cuda[(r, c)][0] - cpu[(r, c)][0]) for r, c in shared}
    kl = {f"{r}/{c}": abs(cuda[(r, c)][1] - cpu[(r, c)][1]) for r, c in shared}
    return {"conditions": len(shared), "only_one_device": sorted(f"{r}/{c}" for r, c in set(cuda) ^ set(cpu)),
            "max_abs_ce_difference": max(ce.values(), default=None),
            "max_abs_kl_difference": max(kl.values(), default=None),
            "outside_tolerance": sorted(k for k in ce if ce[k] > CE_TOLERANCE or kl[k] > KL_TOLERANCE)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="the CUDA device to check against the CPU")
    args = parser.parse_args()
    result: dict = {"benchmark": "gpu_check", "torch": torch.__version__, "cuda": torch.cuda.is_available(),
                    "ce_tolerance": CE_TOLERANCE, "kl_tolerance": KL_TOLERANCE}
    if not torch.cuda.is_available():
        result.update(ok=None, reason="this torch sees no CUDA device: nothing to check here; run it on a GPU machine")
        print(json.dumps(result))
        return
    result["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        cuda_rows, cuda_stages, cuda_wall = run_on(args.device, Path(tmp) / "cuda")
        cpu_rows, cpu_stages, cpu_wall = run_on("cpu", Path(tmp) / "cpu")
    found = compare(cuda_rows, cpu_rows)
    result.update(found, ok=not found["outside_tolerance"] and not found["only_one_device"],
                  seconds={"cuda": round(cuda_wall, 1), "cpu": round(cpu_wall, 1)},
                  speedup=round(cpu_wall / cuda_wall, 2),
                  stage_seconds={"cuda": cuda_stages, "cpu": cpu_stages})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
