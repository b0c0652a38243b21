"""`leviathan prepare`: tokenise a corpus into shards."""

from __future__ import annotations

import argparse

from leviathan.config import load_config
from leviathan.entry import add_config_args, add_rebuild_arg, bounded


def add_prepare_parser(subparsers: argparse._SubParsersAction) -> None:
    """The `prepare` command; `--input` and `--workers` are shorthands for data.* keys."""
    p = subparsers.add_parser(
        "prepare", help="tokenise a corpus into shards (default: bundled Shakespeare)"
    )
    add_config_args(p)
    p.add_argument(
        "--input",
        dest="inputs",
        action="append",
        help="file, folder, glob, .jsonl or .parquet, optionally .gz/.zst (repeatable)",
    )
    p.add_argument(
        "--workers",
        type=bounded(int, 0, "a number of processes >= 0 (0: every core)"),
        help="encoding processes (data.workers; default every core)",
    )
    p.add_argument(
        "--ray",
        nargs="?",
        const="auto",
        metavar="ADDRESS",
        help="encode on a Ray cluster with Ray Data (ADDRESS: host:port, default auto; "
        "local: start one here); the shards are those of the local path",
    )
    add_rebuild_arg(p)
    p.set_defaults(func=cmd_prepare)


def cmd_prepare(args: argparse.Namespace) -> None:
    """Build (or reuse) the dataset and say what it holds."""
    from leviathan.data import prepare

    overrides = list(args.overrides)
    ray_address = args.ray
    if ray_address is not None and "=" in ray_address:  # `--ray KEY=VALUE`: no address given
        overrides.insert(0, ray_address)
        ray_address = "auto"
    if args.inputs:
        overrides.append(f"data.inputs=[{', '.join(repr(i) for i in args.inputs)}]")
    if args.workers is not None:
        overrides.append(f"data.workers={args.workers}")
    cfg = load_config(args.config, overrides)
    index = prepare(cfg.data, rebuild=args.rebuild, ray_address=ray_address)
    for split, stats in index.splits.items():
        print(
            f"{split}: {stats['tokens']:,} tokens, {stats['characters']:,} characters, "
            f"{len(index.shards[split])} shard(s)"
        )
    print(f"prepared {index.dir}")
