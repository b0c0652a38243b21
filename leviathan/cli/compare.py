"""`leviathan compare`: train configs x seeds under one budget and tabulate them."""

from __future__ import annotations

import argparse
import sys

from leviathan.cli.options import split_items
from leviathan.entry import add_wandb_arg


def seeds_arg(text: str) -> int | list[int]:
    """`--seeds`: a count N (seeds 0..N-1), or seeds and inclusive ranges such as 0,2 or
    2-2 (seed 2 alone) or 0-1,4."""
    try:
        if text.isdigit():
            if int(text) < 1:
                raise ValueError
            return int(text)
        seeds = []
        for item in text.split(","):
            first, dash, last = item.partition("-")
            low, high = int(first), int(last) if dash else int(first)
            if low < 0 or high < low:
                raise ValueError
            seeds += range(low, high + 1)
        if len(set(seeds)) != len(seeds):
            raise ValueError
        return seeds
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected a count >= 1, or distinct seeds >= 0 and ranges such as 0,2 or 2-3"
        ) from None


def add_compare_parser(subparsers: argparse._SubParsersAction) -> None:
    """The `compare` command: configs and overrides mixed in one positional list."""
    p = subparsers.add_parser(
        "compare",
        help="train configs x seeds under one budget; results.md, results.json, plots",
        description="Train every CONFIG x seed on the same data under the same budget, each "
        "in OUT/runs/<config stem>-s<seed>, and write OUT/results.md, OUT/results.json and "
        "val BPC plots. The configs must have equal data sections. Finished runs are "
        "reused, interrupted ones resumed; a failed run is reported and the rest go on "
        "(exit status 1). Processes can share OUT: a run another process is training is "
        "left to it (pending). KEY=VALUE items override every config.",
    )
    p.add_argument(
        "items",
        nargs="+",
        metavar="CONFIG|KEY=VALUE",
        help="YAML configs to compare (the first is the baseline of the paired "
        "differences), then KEY=VALUE overrides applied to every config",
    )
    p.add_argument(
        "--seeds",
        type=seeds_arg,
        default=1,
        help="N: seeds 0..N-1 per config (default %(default)s); or seeds and ranges such as 0,2 or "
        "2-3",
    )
    p.add_argument(
        "--budget", required=True, help="steps=K, tokens=K or minutes=K (wall clock) per run"
    )
    p.add_argument("--out", default="runs/compare", help="output folder (default %(default)s)")
    add_wandb_arg(p, default="disabled")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: write the tables and plots from the runs that finished, the "
        "others listed as pending",
    )
    p.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    """Run the comparison; exit status 1 when any run failed (the others still ran)."""
    from leviathan.compare import compare

    configs, overrides = split_items(args.items)
    result = compare(
        configs,
        seeds=args.seeds,
        budget=args.budget,
        out=args.out,
        overrides=overrides,
        wandb=args.wandb,
        report_only=args.report_only,
    )
    print(f"wrote {result.out / 'results.md'}, results.json and the val BPC plots")
    for run in result.failed:
        print(f"FAILED {run.name}: {run.error}", file=sys.stderr)
    return 1 if result.failed else 0
