"""``nl-rewrite train``: train (or resume) a transcoder or SAE on the corpus train split.

Example: ``nl-rewrite train --model smollm2-135m --layer 15 --kind transcoder --width 4096 --k 32 --tokens 2M``.
Interrupting with Ctrl-C saves the last finished step; the same command resumes it.
"""

from __future__ import annotations

import argparse
import json

from nl_rewrite.coders.train import DONE_FILE, TrainConfig, train


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train a sparse coder (transcoder or SAE) on CPU",
                                   description=__doc__)
    parser.add_arguments(TrainConfig, dest="cfg")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg: TrainConfig = args.cfg
    train(cfg, progress=not args.no_progress)
    folder = cfg.output_folder()
    summary = json.loads((folder / DONE_FILE).read_text())
    print(json.dumps({"folder": str(folder), "steps": summary["steps"], "tokens": summary["tokens"],
                      "seconds": summary["seconds"], **summary["final_train_metrics_last20"]}))
    return 0
