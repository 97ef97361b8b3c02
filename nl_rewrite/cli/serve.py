"""``nl-rewrite serve``: the embedded model behind OpenAI's HTTP schema (/v1/models, /v1/completions with
echo+logprobs, /v1/chat/completions), so the OpenAI backend and other tools can use it."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

from nl_rewrite.placement import Placement
from nl_rewrite.cli.parsing import add_command
from nl_rewrite.model.loading import DEFAULT_MODEL

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig(Placement):
    """The model served, where it runs (--device, --dtype) and the address it listens on."""

    model: str = DEFAULT_MODEL
    """embedded model name, HF folder or .gguf path"""
    host: str = "127.0.0.1"
    """address to bind (0.0.0.0 exposes it to the network)"""
    port: int = 8000
    """TCP port (0 picks a free one)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")


def run(args: argparse.Namespace) -> int:
    from nl_rewrite.llm.embedded import EmbeddedBackend
    from nl_rewrite.llm.server import make_server
    from nl_rewrite.model.loading import check_model_name

    cfg: ServeConfig = args.cfg
    check_model_name(cfg.model)
    server = make_server(EmbeddedBackend(cfg.model, placement=cfg.placement), cfg.host, cfg.port)
    host, port = server.server_address[:2]
    print(f"serving {cfg.model} at http://{host}:{port}/v1 (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


def add_parser(subparsers) -> None:
    add_command(subparsers, "serve", "serve the embedded model with OpenAI's HTTP schema", run,
                {"cfg": ServeConfig}, description=__doc__)
