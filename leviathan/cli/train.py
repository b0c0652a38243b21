"""`leviathan train`: train a model in this process (plain engine, or a one-rank DeepSpeed
run); launch/train.py is the same training under a launcher."""

from __future__ import annotations

import argparse
import time

from leviathan.entry import (
    add_config_args,
    add_train_args,
    config_as_asked,
    print_closing,
    train_as_asked,
)


def add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    """The `train` command: the shared train options, plus `--peak-flops` for MFU."""
    p = subparsers.add_parser("train", help="train a model (default: configs/tiny.yaml)")
    add_config_args(p)
    add_train_args(p)
    p.add_argument(
        "--peak-flops",
        type=float,
        metavar="FLOPS",
        help="peak FLOP/s of one device for MFU (train.peak_flops; default: known GPUs' table)",
    )
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> None:
    """Train, then print a sample and the final val (and heldout) scores."""
    overrides = list(args.overrides)
    if args.wandb:
        overrides.append(f"run.wandb={args.wandb}")
    if args.peak_flops is not None:
        overrides.append(f"train.peak_flops={args.peak_flops!r}")
    cfg = config_as_asked(args, overrides)
    started = time.perf_counter()
    summary = train_as_asked(cfg, args)
    print_closing(summary, cfg.run.dir, time.perf_counter() - started)
