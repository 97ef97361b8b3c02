"""``nl-rewrite train``: train (or resume) a transcoder or SAE on the corpus train split.

Example: ``nl-rewrite train --model smollm2-135m --layer 15 --kind transcoder --width 4096 --k 32 --tokens 2M``.
Interrupting with Ctrl-C saves the last finished step; the same command resumes it.
"""

from __future__ import annotations

import argparse
import json

from nl_rewrite.cli.config import add_dataclass_args, dataclass_from_args
from nl_rewrite.coders.train import DONE_FILE, TrainConfig, parse_tokens, train


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train a sparse coder (transcoder or SAE) on CPU",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, TrainConfig, skip=("tokens",))
    parser.add_argument("--tokens", type=parse_tokens, default=TrainConfig.tokens,
                        help=f"training tokens, e.g. 2M or 500k (default: {TrainConfig.tokens})")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = dataclass_from_args(TrainConfig, args)
    train(cfg, progress=not args.no_progress)
    folder = cfg.output_folder()
    summary = json.loads((folder / DONE_FILE).read_text())
    print(json.dumps({"folder": str(folder), "steps": summary["steps"], "tokens": summary["tokens"],
                      "seconds": summary["seconds"], **summary["final_train_metrics_last20"]}))
    return 0
