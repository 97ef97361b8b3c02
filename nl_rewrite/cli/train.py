"""``nl-rewrite train``: train (or resume) a transcoder or SAE on the corpus train split.

Example: ``nl-rewrite train --model smollm2-135m --layer 15 --kind transcoder --width 4096 --k 32 --tokens 2M``.
Interrupting with Ctrl-C saves the last finished step; the same command resumes it.

Data-parallel on N processes (gloo on CPU; the global batch stays --batch-size tokens, which N must divide, as it
must --buffer-windows): ``torchrun --standalone --nproc_per_node 2 -m nl_rewrite.cli train --model smollm2-135m
--layer 15 --tokens 2M``. Each process runs the model on its share of the train split; only rank 0 writes the
output folder, and the same torchrun command resumes an interrupted run.
"""

from __future__ import annotations

import argparse
import json

from nl_rewrite.cli.parsing import add_command
from nl_rewrite.coders.train import DONE_FILE, TrainConfig, train
from nl_rewrite.placement import Placement


def add_parser(subparsers) -> None:
    parser = add_command(subparsers, "train", "train a sparse coder (transcoder or SAE)", run,
                         {"cfg": TrainConfig, "placement": Placement}, description=__doc__)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    cfg: TrainConfig = args.cfg
    train(cfg, progress=not args.no_progress, placement=args.placement)
    folder = cfg.output_folder()
    summary = json.loads((folder / DONE_FILE).read_text())
    print(json.dumps({"folder": str(folder), "steps": summary["steps"], "tokens": summary["tokens"],
                      "seconds": summary["seconds"], **summary["final_train_metrics_last20"]}))
    return 0
