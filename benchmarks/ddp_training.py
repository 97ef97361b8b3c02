"""`nl-rewrite train` in one process against two `torchrun` ranks (gloo), on SmolLM2, same options, same machine.

Both runs train the same transcoder (fixed seed) on the same number of tokens from a cold output folder; the model
conversion and tokenised corpus come from the shared user cache (warmed first, not timed). One process uses
``--threads`` torch threads; each rank uses ``threads / ranks`` (the machine's cores are shared, not added).
Reports wall time (process start to exit, torchrun's start-up included), the trainer's own seconds, and the final
train FVU of each.

Usage: python benchmarks/ddp_training.py [--tokens 32K] [--ranks 2] [--threads 2]
Last line of stdout: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def train_command(out: Path, args: argparse.Namespace) -> list[str]:
    return ["train", "--model", "smollm2-135m", "--layer", str(args.layer), "--tokens", args.tokens,
            "--width", str(args.width), "--k", "32", "--batch-size", "1024", "--buffer-windows", "64",
            "--no-progress", "--out", str(out)]


def run(command: list[str], threads: int) -> float:
    """Wall seconds of ``command`` with ``threads`` OpenMP threads per process."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def summary(out: Path) -> dict:
    return json.loads((out / "training.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="32K")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layer", type=int, default=10)
    parser.add_argument("--width", type=int, default=4096)
    args = parser.parse_args()
    cli = [sys.executable, "-m", "nl_rewrite.cli"]
    with tempfile.TemporaryDirectory() as root:
        run(cli + train_command(Path(root) / "warm", argparse.Namespace(**{**vars(args), "tokens": "2048"})), 2)
        one_seconds = run(cli + train_command(Path(root) / "one", args), args.threads)
        ddp = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.ranks),
               "-m", "nl_rewrite.cli"] + train_command(Path(root) / "ddp", args)
        ddp_seconds = run(ddp, max(1, args.threads // args.ranks))
        one, two = summary(Path(root) / "one"), summary(Path(root) / "ddp")
    print(json.dumps({
        "benchmark": "ddp_training", "model": "smollm2-135m", "layer": args.layer, "width": args.width,
        "tokens": one["tokens"], "ranks": args.ranks, "threads_total": args.threads,
        "wall_seconds_one_process": round(one_seconds, 1), "wall_seconds_ddp": round(ddp_seconds, 1),
        "trainer_seconds_one_process": one["seconds"], "trainer_seconds_ddp": two["seconds"],
        "speedup_ddp_wall": one_seconds / ddp_seconds, "world_size_ddp": two.get("world_size", 1),
        "fvu_one_process": one["final_train_metrics_last20"]["fvu"],
        "fvu_ddp": two["final_train_metrics_last20"]["fvu"],
    }))


if __name__ == "__main__":
    main()
