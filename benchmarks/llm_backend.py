"""Embedded backend throughput: score prompts/s and tokens/s with and without prefix-KV reuse (and batched),
on the same ~20 prompts (a ~300-token shared prefix + short bodies), in one run; plus chat tokens/s.

Each variant runs ``--repeats`` times, interleaved, and the best time counts (the CPU is shared and noisy).
Last line of stdout: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from nl_rewrite.llm.base import ChatRequest, ScoreRequest
from nl_rewrite.llm.embedded import EmbeddedBackend

WORDS = ["cat", "the", "horse", "table", "river", "dog", "of", "bird", "running", "car", "fish", "and"]


def make_prefix(target_tokens: int, tokenizer) -> str:
    """Instructions plus few-shot lines, grown until the prefix has about ``target_tokens`` tokens."""
    text = "Rate from 0 to 9 how strongly each word relates to animals. One word per line, then a tab, then the digit.\n"
    i = 0
    while len(tokenizer(text).input_ids) < target_tokens:
        text += f"{WORDS[i % len(WORDS)]}\t{(i * 7) % 10}\n"
        i += 1
    return text + "Now the words to rate:\n"


def make_requests(prefix: str, n: int) -> list[ScoreRequest]:
    requests = []
    for i in range(n):
        words = [WORDS[(i + j) % len(WORDS)] for j in range(4)]
        segments = tuple(s for w in words for s in (f"{w}\t", "0\n"))[:-1]
        requests.append(ScoreRequest(prefix, segments, tuple(range(0, len(segments), 2))))
    return requests


def time_scoring(backend: EmbeddedBackend, requests: list[ScoreRequest]) -> float:
    backend._prefixes.clear()  # every pass pays for its prefix once, as a fresh run would
    start = time.perf_counter()
    backend.score(requests)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    for flag, default in (("--prompts", 20), ("--prefix-tokens", 300), ("--repeats", 3), ("--chat-tokens", 48)):
        parser.add_argument(flag, type=int, default=default)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (2 is slow when a core is busy)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    variants = {"no_reuse": EmbeddedBackend(reuse_prefix=False, batch_size=1),
                "reuse": EmbeddedBackend(reuse_prefix=True, batch_size=1),
                "reuse_batch4": EmbeddedBackend(reuse_prefix=True, batch_size=4)}
    tokenizer = variants["reuse"].tokenizer
    prefix = make_prefix(args.prefix_tokens, tokenizer)
    requests = make_requests(prefix, args.prompts)
    n_tokens = sum(len(tokenizer(r.prompt).input_ids) for r in requests)
    best = {name: float("inf") for name in variants}
    for _ in range(args.repeats):
        for name, backend in variants.items():
            best[name] = min(best[name], time_scoring(backend, requests))
    result = {name: {"seconds": round(t, 3), "prompts_per_s": round(len(requests) / t, 2),
                     "tokens_per_s": round(n_tokens / t, 1)} for name, t in best.items()}

    chat = ChatRequest((("user", "Describe a cat in two sentences."),), max_tokens=args.chat_tokens)
    backend = variants["reuse"]
    start = time.perf_counter()
    reply = backend.chat([chat])[0]
    chat_s = time.perf_counter() - start
    n_chat = len(tokenizer(reply, add_special_tokens=False).input_ids)

    summary = {
        "benchmark": "llm_backend", "model": "smollm2-135m", "threads": args.threads, "repeats": args.repeats,
        "prompts": len(requests), "prefix_tokens": len(tokenizer(prefix).input_ids),
        "tokens_per_prompt": round(n_tokens / len(requests), 1), "score": result,
        "reuse_speedup": round(best["no_reuse"] / best["reuse"], 2),
        "batch4_vs_reuse": round(best["reuse"] / best["reuse_batch4"], 2),
        "chat": {"new_tokens": n_chat, "seconds": round(chat_s, 3), "tokens_per_s": round(n_chat / chat_s, 1)},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    for name, row in result.items():
        print(f"{name:>13}: {row['prompts_per_s']:6.2f} prompts/s  {row['tokens_per_s']:7.1f} tokens/s")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
