"""Builders shared by several test modules (importable as ``helpers``: pyproject puts tests/ on sys.path).

Test modules import from here, never from each other: importing a ``test_*`` module from another one makes pytest
collect its tests twice and couples unrelated files. Subprocess scripts in tests add tests/ to ``sys.path`` and
import from here too.
"""

from __future__ import annotations

from dataclasses import dataclass

import threading
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import torch

from nl_rewrite.coders.sparse_coder import CoderConfig, SparseCoder
from nl_rewrite.data.windows import TokenWindows
from nl_rewrite.llm.base import ChatRequest, ScoreRequest

SHARED_CACHE_FOLDERS = ("models", "windows")
"""User-cache folders every test cache links to: the converted embedded models (25 s each to convert) and the
tokenised corpus windows (seconds per split). Both are written atomically; windows are keyed by the tokenizer, the
window, BOS and the documents' ids and total length, so a test corpus shares entries only with an identical one."""


def empty_cache(root: Path) -> Path:
    """An empty nl_rewrite cache folder at ``root``, with the user cache's :data:`SHARED_CACHE_FOLDERS` linked in."""
    from nl_rewrite.paths import cache_dir

    root.mkdir(parents=True)
    for name in SHARED_CACHE_FOLDERS:
        real = cache_dir() / name
        real.mkdir(parents=True, exist_ok=True)
        (root / name).symlink_to(real)
    return root


def record_real_model_loads() -> list[str]:
    """Wrap :func:`nl_rewrite.model.loading.load_hf` (which ``load_model`` and the embedded LLM backend call) so that
    every embedded model it loads is appended to the returned list. Call it before anything binds ``load_hf`` by
    name (``from nl_rewrite.model.loading import load_hf`` at a module's top)."""
    from nl_rewrite.model import loading

    loads: list[str] = []
    original, real = loading.load_hf, frozenset(loading.EMBEDDED)  # not names a test adds for itself

    def load_hf(name: str = loading.DEFAULT_MODEL, **options):
        if name in real:
            loads.append(name)
        return original(name, **options)

    loading.load_hf = load_hf
    return loads


SHARED_RUNS = ("smoke_run", "tiny_run")
"""Session fixtures holding a whole run that several tests read (tests/conftest.py)."""
REAL_MODEL_FIXTURES = ("smol", "smoke_run")
"""Session fixtures that hold the real SmolLM2 or its run: only the first test to use one loads it."""


def acceptance_error(nodeid: str, loads: list[str], marked: bool) -> str | None:
    """Why a test may not load (or use a fixture holding) what it did, or None."""
    if marked or not loads:
        return None
    return (f"{nodeid} loaded the real {', '.join(sorted(set(loads)))} but is not marked acceptance: check plumbing on "
            f"the tiny model (tiny-smollm2, helpers.TINY_RUN, the tiny_run fixture), or mark it "
            f"@pytest.mark.acceptance if the real model is the point (docs/architecture.md)")


# ---- the test session's allocator ------------------------------------------------------------------------------

MALLOC_SETTINGS = {"MMAP_THRESHOLD": 32 << 20, "TRIM_THRESHOLD": 1 << 30, "TOP_PAD": 256 << 20}
"""glibc malloc settings for the test session: freed buffers up to 32 MB stay in the heap instead of going back to
the kernel, so the next batch's logits reuse pages instead of faulting fresh zeroed ones in. Measured on the
plumbing run (``TINY_RUN``, one process): 37 s → 30 s wall, 11 s → 6 s system time. The names are glibc's
(``MALLOC_<NAME>_`` in the environment, ``M_<NAME>`` for ``mallopt``)."""
MALLOPT_PARAMETER = {"TRIM_THRESHOLD": -1, "TOP_PAD": -2, "MMAP_THRESHOLD": -3}
"""glibc's ``M_*`` numbers (malloc.h)."""


def reuse_freed_memory() -> None:
    """Apply :data:`MALLOC_SETTINGS` to this process (``mallopt``) and to the processes it starts (the environment:
    the kill -9 runs, Ray workers, servers). A no-op where the C library is not glibc."""
    import ctypes
    import os

    for name, value in MALLOC_SETTINGS.items():
        os.environ.setdefault(f"MALLOC_{name}_", str(value))
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    for name, value in MALLOC_SETTINGS.items():
        mallopt(MALLOPT_PARAMETER[name], value)


# ---- the whole pipeline on a tiny random model, for plumbing tests ---------------------------------------------

SMOKE_RUN = ("run", "--preset", "smoke", "--position-modes", "all")
"""The acceptance run's command (tests/conftest.py's ``smoke_run``): the smoke preset on the real SmolLM2, all
positions only. Add ``--out``."""

TINY_RUN = ("--preset", "smoke", "--model", "tiny-smollm2", "--llm", "embedded:tiny-smollm2", "--layer", "1",
            "--width", "256", "--train-tokens", "8000", "--pool", "8")
"""`nl-rewrite run` options for the plumbing run: every stage of the smoke preset, on ``tiny-smollm2`` (a random
2-layer model with SmolLM2's real tokenizer) as subject model and as LLM, with a 256-latent transcoder and an LLM
pool of 8 latents (two batches of explanations, so a stage can be cut between them). Add ``--out``."""


# ---- a transcoder on the tiny model's MLP 1, and token windows for it ----------------------------------------

N_LATENTS, K = 64, 4
"""Width and TopK of :func:`make_coder`'s transcoder."""


def make_coder(seed: int = 0) -> SparseCoder:
    """A random transcoder mlp_in.1 → mlp_out.1 for the ``tiny`` fixture (d_model 32), whose latents' encoder biases
    run from -0.6 to 0.3, so most latents fire sometimes and a few never (a realistic mix)."""
    cfg = CoderConfig(d_in=32, d_out=32, n_latents=N_LATENTS, k=K, read_site="mlp_in.1", write_site="mlp_out.1",
                      model="tiny")
    coder = SparseCoder(cfg, seed=seed)
    with torch.no_grad():
        coder.encoder.bias.copy_(torch.linspace(-0.6, 0.3, N_LATENTS))
    return coder


def make_windows(n: int = 24, window: int = 12, seed: int = 0) -> TokenWindows:
    """``n`` seeded random windows of ``window`` character tokens (ids 1-89), three windows per document."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 90, (n, window), generator=gen)
    return TokenWindows(tokens, [f"doc{i // 3}" for i in range(n)], "explain")


# ---- a deterministic LLM backend that counts its calls --------------------------------------------------------

class CountingBackend:
    """A deterministic backend: replies derive from the request key, so any mix-up of rows shows."""

    backend_id = "counting:v1"

    def __init__(self) -> None:
        self.calls = 0

    def chat(self, requests):
        self.calls += len(requests)
        return [f"reply to {r.messages[-1][1]} ({r.key()[:6]})" for r in requests]

    def score(self, requests):
        self.calls += len(requests)
        out = []
        for r in requests:
            seed = int(r.key()[:8], 16)
            values = torch.randn(len(r.read_after), len(r.choices), generator=torch.Generator().manual_seed(seed))
            values[0, 0] = float("-inf")  # must survive the round trip
            out.append(values)
        return out


def chat_requests(n: int) -> list[ChatRequest]:
    """``n`` distinct short chat requests."""
    return [ChatRequest((("user", f"question {i}"),), max_tokens=5) for i in range(n)]


def score_requests(n: int) -> list[ScoreRequest]:
    """``n`` distinct score requests sharing a prefix, each read at two points."""
    return [ScoreRequest("shared prefix\n", (f"w{i}\t", "x\n", "y\t"), (0, 2)) for i in range(n)]


# ---- fake HTTP servers ---------------------------------------------------------------------------------------


def serve_posts(answer: Callable[[BaseHTTPRequestHandler], None]) -> ThreadingHTTPServer:
    """A quiet HTTP/1.1 server on 127.0.0.1 (a free port) whose POSTs are answered by ``answer(handler)`` after the
    request body has been read; it serves from a daemon thread until ``shutdown()``."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            answer(self)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# ---- latents defined by rules on the tokens (the lexical explainers' tests) ----

VOCAB = ["<s>", " income", " tax", " the", " rate", " a", " of", "\n"]
INCOME, TAX, THE, RATE = 1, 2, 3, 4


@dataclass
class SyntheticCache:
    """What the explainer reads of a latent cache, for latents defined by rules on the tokens."""

    tokens: torch.Tensor
    values: torch.Tensor
    """[window, pos, latent] activations."""

    @property
    def n_latents(self) -> int:
        return self.values.shape[-1]

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def rows(self, window_ids):
        ids = torch.as_tensor(list(window_ids), dtype=torch.long)
        w, p, lat = torch.nonzero(self.values[ids], as_tuple=True)
        return {"window_ids": ids[w].int(), "positions": p.int(), "latent_ids": lat.int(),
                "values": self.values[ids][w, p, lat]}

    def token_strings(self, ids):
        return [VOCAB[i] for i in ids]


def synthetic(n: int = 300, pos: int = 16, seed: int = 0) -> SyntheticCache:
    """Latent 0 fires (5.0) on " tax" right after " income" only; latent 1 fires (4.0) on " rate" except after
    " the"; latent 2 never fires."""
    tokens = torch.randint(1, len(VOCAB), (n, pos), generator=torch.Generator().manual_seed(seed))
    before = torch.cat([torch.zeros_like(tokens[:, :1]), tokens[:, :-1]], dim=1)
    values = torch.zeros(n, pos, 3)
    values[..., 0] = 5.0 * ((tokens == TAX) & (before == INCOME))
    values[..., 1] = 4.0 * ((tokens == RATE) & (before != THE))
    return SyntheticCache(tokens, values)


def first_token_cache(n: int = 200, pos: int = 8) -> SyntheticCache:
    """Latent 0 fires (6.0) on every window's first token, whatever it is; latent 1 fires (3.0) on VOCAB[2]
    anywhere, the first token included; latent 2 fires (1.0) on VOCAB[3] and (0.5) on the first token, whatever it
    is; latent 3 fires (0.3) on VOCAB[1], VOCAB[2] and VOCAB[4], and (2.0) on the first token."""
    tokens = torch.randint(1, len(VOCAB), (n, pos), generator=torch.Generator().manual_seed(5))
    values = torch.zeros(n, pos, 4)
    values[..., 3] = 0.3 * ((tokens == 1) | (tokens == 2) | (tokens == 4))
    values[:, 0, 3] = 2.0
    values[:, 0, 0] = 6.0
    values[..., 1] = 3.0 * (tokens == 2)
    values[..., 2] = 1.0 * (tokens == 3)
    values[:, 0, 2] = 0.5
    return SyntheticCache(tokens, values)


# ---- whole runs in child processes that may be killed -9 -------------------------------------------------------

PRELOADED = ("torch", "transformer_lens", "transformer_lens.model_bridge", "transformers",
             "transformers.models.llama.modeling_llama", "matplotlib.pyplot", "nl_rewrite.cli.main",
             "nl_rewrite.pipeline.experiment", "nl_rewrite.pipeline.report", "helpers")
"""What the fork server imports once, so that each child it forks starts `nl-rewrite` at once instead of spending
seconds importing. A cached tiny rerun takes 19.5 s in a fresh interpreter and 8.9-10.4 s forked from a server
without TransformerLens's bridge and transformers' Llama (imported lazily, at the first model load), 5.5-6.6 s with
them."""


def start_cli(argv: list[str], env: dict[str, str], log: Path):
    """``nl-rewrite <argv>`` in a child process forked from a server that has imported :data:`PRELOADED`, with
    ``env`` as its environment (what the preloaded modules read at import stays as the server saw it) and its stderr
    (the run's log) written to ``log``. Returns the started ``multiprocessing.Process``: ``.kill()`` is a kill -9;
    ``.exitcode`` is the command's exit code (-9 when killed). The server is one per test process, started on first
    use (torch must not run a thread pool before a fork, which a test process's has)."""
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(PRELOADED))
    proc = context.Process(target=run_cli, args=(list(argv), dict(env), str(log)), daemon=True)
    proc.start()
    return proc


def run_cli(argv: list[str], env: dict[str, str], log: str) -> None:
    """The child of :func:`start_cli`: the environment replaced, stdout discarded, stderr to ``log``, then
    ``nl-rewrite <argv>``, whose exit code becomes the process's."""
    import os
    import sys

    os.environ.clear()
    os.environ.update(env)
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", torch.get_num_threads())))
    err = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    out = os.open(os.devnull, os.O_WRONLY)
    os.dup2(err, 2)
    os.dup2(out, 1)
    from nl_rewrite.cli.main import main

    sys.exit(main(argv))
