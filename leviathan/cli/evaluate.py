"""`leviathan eval`: score a trained run on its val (and heldout) split or on given text."""

from __future__ import annotations

import argparse

from leviathan.cli.options import add_run_args
from leviathan.entry import bounded

THREADS = bounded(int, 1, "a number of threads >= 1")


def add_eval_parser(subparsers: argparse._SubParsersAction) -> None:
    """The `eval` command; `--data-dir` finds a dataset that moved since training."""
    p = subparsers.add_parser("eval", help="val loss and BPC of a run")
    add_run_args(p)
    p.add_argument(
        "--data",
        nargs="+",
        metavar="PATH",
        help="score these files, folders, globs, .jsonl or .parquet, not the val split",
    )
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        help="the run's dataset, where it is now (default: the path the run recorded)",
    )
    p.add_argument("--threads", type=THREADS, help="torch threads (default torch's)")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> None:
    """Print loss and BPC of `--data`, else of the run's val and heldout splits."""
    from leviathan.data import read_documents
    from leviathan.trained import load_run

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    run = load_run(args.run, args.checkpoint)
    if args.data:
        docs = read_documents(args.data, run.config.data.text_field, what="--data")
        result = run.evaluate_documents(docs)
        print(
            f"step {run.step}: loss {result.loss:.4f} nats/token, BPC {result.bpc:.4f} on "
            f"{len(docs):,} document(s) ({result.tokens:,} tokens)"
        )
        return
    splits = ["val"] + (["heldout"] if "heldout" in run.dataset(args.data_dir).splits else [])
    for split in splits:
        result = run.evaluate(data_dir=args.data_dir, split=split)
        print(
            f"step {run.step}: {split} loss {result.loss:.4f} nats/token, "
            f"{split} BPC {result.bpc:.4f} ({result.tokens:,} tokens)"
        )
