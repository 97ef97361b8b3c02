"""Start llama.cpp's OpenAI-compatible server (llama-cpp-python) on a GGUF, for the OpenAI backend.

Optional: ``pip install -c constraints.txt "nl_rewrite[llamacpp]"`` compiles llama.cpp (about 10-15 minutes on
2 cores; pip caches the wheel). On CPUs that report AMX or AVX-512 to a VM that does not enable them, a native
build crashes on the first request (general protection fault in libggml-cpu); build without native flags:
``CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"``.

The server names the model by the GGUF's path, so ``OpenAIBackend(url, model=<that path>)`` finds the model's
chat template in the same file. Scoring needs ``--logits_all true``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

from nl_rewrite.errors import LLMError


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None and importlib.util.find_spec("uvicorn") is not None


@contextlib.contextmanager
def llamacpp_server(gguf: Path | str, *, threads: int = 2, logits_all: bool = True, startup_timeout: float = 120,
                    log_path: Path | str | None = None) -> Iterator[str]:
    """A llama.cpp server on a free 127.0.0.1 port for the life of the block; yields its ``/v1`` URL."""
    if not available():
        raise LLMError('llama.cpp\'s server is not installed: pip install -c constraints.txt "nl_rewrite[llamacpp]"')
    port = _free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
               "--port", str(port), "--n_threads", str(threads), "--logits_all", str(logits_all).lower()]
    with open(log_path, "w") if log_path else contextlib.nullcontext(subprocess.DEVNULL) as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}/v1"
            _wait_until_up(url, process, startup_timeout)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


def _wait_until_up(url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise LLMError(f"llama.cpp's server exited with code {process.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=2) as response:
                json.load(response)
                return
        except OSError:
            time.sleep(0.5)
    raise LLMError(f"llama.cpp's server did not answer {url}/models within {timeout:.0f} s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
