"""``nl-rewrite train-simulator``: train the single-pass simulator on a run's explain split.

It uses the run options that define the data (--model, --layer, --coder, --coder-checkpoint, --explain-windows,
--window, --seed, --out: the explain split's latent cache goes to <out>/latents, shared with ``nl-rewrite run
--out`` the same folder) and the training options under --trained.* (layers kept, head, steps, ...). The checkpoint
goes to --save-to, by default the user cache, where ``nl-rewrite run --trained-simulator default`` finds it (not
with --llm-explanations, which key it apart: pass its folder to ``run --trained-simulator FOLDER``). Ctrl-C saves
the last finished step; the same command resumes it. See docs/trained_simulator.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(subparsers) -> None:
    from nl_rewrite.cli.run import add_run_config

    parser = add_run_config(subparsers, "train-simulator", help="train the single-pass simulator (explain split only)",
                            description=__doc__)
    parser.add_argument("--save-to", default="", help="checkpoint folder (default: the user cache, keyed by options "
                                                       "and data)")
    parser.add_argument("--llm-explanations", default="", metavar="FILE.jsonl",
                        help="LLM explanations (nl-rewrite explain, or a run's explanations.jsonl) added as training "
                             "items of kind 'llm' for the training latents they cover")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nl_rewrite.pipeline.experiment import check_before_loading
    from nl_rewrite.pipeline.run_context import explain_cache
    from nl_rewrite.pipeline.trained_arm import default_folder
    from nl_rewrite.trained.training import LOG_FILE, train_simulator

    cfg = args.cfg.resolved()
    check_before_loading(cfg)
    cache, doc_ids = explain_cache(cfg)
    llm = {}
    if args.llm_explanations:
        from nl_rewrite.interp.explain import load_explanations

        llm = {r.latent: r.text for r in load_explanations(args.llm_explanations) if r.ok}
    folder = Path(args.save_to) if args.save_to else default_folder(cfg.trained, cache, doc_ids, llm)
    simulator = train_simulator(cfg.trained, cache, doc_ids, folder, llm_explanations=llm or None,
                                device=str(cfg.torch_device), progress=not args.no_progress)
    log_lines = (folder / LOG_FILE).read_text().strip().splitlines() if (folder / LOG_FILE).is_file() else []
    last = json.loads(log_lines[-1]) if log_lines else {}  # empty when Ctrl-C hit the last validation
    print(json.dumps({"folder": str(folder), "identity": simulator.identity, **last}))
    return 0
