"""`leviathan inspect`: plot what a run's mixers learned (lag weights, attention distance)."""

from __future__ import annotations

import argparse


def add_inspect_parser(subparsers: argparse._SubParsersAction) -> None:
    """The `inspect` command; `--against` draws a second run's profile beside the first."""
    p = subparsers.add_parser(
        "inspect",
        help="plot a run's learned lag weights and attention-distance profile",
        description="Write the learned lag weights (token_xcorr kernels or channel_xcorr "
        "weights) and the mean attention weight against distance, per layer, of a run "
        "(beside another run's, e.g. a dot run, with --against) as PNGs and JSON.",
    )
    p.add_argument("--run", required=True, help="run folder (token_xcorr or channel_xcorr)")
    p.add_argument("--against", metavar="RUN", help="a run to compare the profile with")
    p.add_argument("--out", help="output folder (default: the run folder)")
    p.add_argument(
        "--windows", type=int, default=8, help="val windows to average over (default %(default)s)"
    )
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args: argparse.Namespace) -> None:
    """Write the plots and JSON and name the files."""
    from leviathan.inspection import inspect_run

    result = inspect_run(args.run, args.against, args.out, args.windows)
    print(f"wrote {result.kernels}, {result.distance} and {result.profiles}")
