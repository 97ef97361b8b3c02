"""Training throughput on CPU: the optimiser step with the sparse-gather decoder (embedding_bag) against the
dense-matmul baseline (scatter the k values into [tokens, n_latents], multiply by W_dec), on the same activations
in the same run; then end-to-end tokens/s of ``train`` (model forward up to the layer + steps) on SmolLM2.

Usage: python benchmarks/train_throughput.py [--steps 20] [--e2e-tokens 16384]
Last line of stdout: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time

import torch
from torch import Tensor

from nl_rewrite.coders.sparse_coder import SparseCoder
from nl_rewrite.coders.train import TrainConfig, new_state, train, train_step


class DenseDecodeCoder(SparseCoder):
    """Baseline: decode by a dense [tokens, n_latents] @ [n_latents, d_out] matmul."""

    def _decode_sparse(self, values: Tensor, indices: Tensor) -> Tensor:
        dense = torch.zeros(*values.shape[:-1], self.cfg.n_latents, dtype=self.W_dec.dtype)
        return dense.scatter(-1, indices, values.to(self.W_dec.dtype)) @ self.W_dec


def time_steps(cfg: TrainConfig, coder_cls: type, x: Tensor, y: Tensor, steps: int, repeats: int = 3) -> float:
    """Best-of-``repeats`` tokens/s of ``steps`` optimiser steps (the machine is shared: min time is the signal)."""
    best = float("inf")
    for _ in range(repeats):
        state = new_state(cfg, x.shape[1], y.shape[1], "bench")
        coder = coder_cls(state.coder.cfg, seed=cfg.seed)
        state.coder = coder
        state.optimizer = torch.optim.Adam(coder.parameters(), lr=cfg.lr)
        state.since_fired[: cfg.width // 4] = cfg.dead_tokens  # a quarter dead: AuxK runs too
        start = time.perf_counter()
        for i in range(steps):
            rows = slice((i * cfg.batch_size) % x.shape[0], (i * cfg.batch_size) % x.shape[0] + cfg.batch_size)
            train_step(state, cfg, x[rows], y[rows])
        best = min(best, time.perf_counter() - start)
    return steps * cfg.batch_size / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--e2e-tokens", type=int, default=16384, help="0 skips the end-to-end run")
    args = parser.parse_args()
    torch.set_num_threads(2)
    cfg = TrainConfig(width=args.width, k=32, batch_size=1024)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8192, 576, generator=gen), torch.randn(8192, 576, generator=gen) * 3
    result = {"width": args.width, "k": 32, "batch_size": cfg.batch_size, "d": 576}
    dense = time_steps(cfg, DenseDecodeCoder, x, y, args.steps)
    sparse = time_steps(cfg, SparseCoder, x, y, args.steps)
    result.update(step_tokens_per_s_dense_baseline=round(dense), step_tokens_per_s_sparse=round(sparse),
                  sparse_over_dense=round(sparse / dense, 3))
    print(json.dumps(result), flush=True)
    if args.e2e_tokens:
        from nl_rewrite.model.loading import load_model

        model = load_model("smollm2-135m")
        with tempfile.TemporaryDirectory() as out:
            e2e = TrainConfig(tokens=args.e2e_tokens, out=out, checkpoint_every=10_000)
            start = time.perf_counter()
            train(e2e, model=model, progress=False)
            seconds = time.perf_counter() - start
        # the initialisation buffer (8192 tokens) is an extra model pass; report both rates
        result.update(e2e_tokens=args.e2e_tokens, e2e_seconds=round(seconds, 1),
                      e2e_training_tokens_per_s=round(args.e2e_tokens / seconds, 1))
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
