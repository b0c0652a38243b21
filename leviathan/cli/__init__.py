"""`leviathan prepare | train | eval | sample | compare | params | inspect | export | ds-config`."""

from __future__ import annotations

import argparse
from importlib.metadata import PackageNotFoundError, version

from leviathan.cli.compare import add_compare_parser
from leviathan.cli.ds_config import add_ds_config_parser
from leviathan.cli.evaluate import add_eval_parser
from leviathan.cli.export import add_export_parser
from leviathan.cli.inspect_run import add_inspect_parser
from leviathan.cli.params import add_params_parser
from leviathan.cli.prepare import add_prepare_parser
from leviathan.cli.sample import add_sample_parser
from leviathan.cli.train import add_train_parser
from leviathan.entry import run_command

COMMANDS = (  # in the order `leviathan --help` lists them
    add_prepare_parser,
    add_train_parser,
    add_eval_parser,
    add_sample_parser,
    add_compare_parser,
    add_params_parser,
    add_inspect_parser,
    add_export_parser,
    add_ds_config_parser,
)


def build_parser() -> argparse.ArgumentParser:
    """The `leviathan` parser: one subparser per command, each set up beside its code."""
    parser = argparse.ArgumentParser(prog="leviathan", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add_parser in COMMANDS:
        add_parser(subparsers)
    return parser


def package_version() -> str:
    """The installed package's version, as pip and `importlib.metadata` know it."""
    try:
        return version("leviathan")
    except PackageNotFoundError:  # a source checkout run without `pip install -e .`
        return "(not installed: no version)"


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, taking KEY=VALUE items wherever they stand (`train --wandb disabled
    model.n_layer=2 --stop-at 4 train.lr=1e-3`); a command without overrides says so."""
    args, rest = parser.parse_known_args(argv)
    items = [i for i in rest if "=" in i and not i.startswith("-")]
    unknown = [i for i in rest if i not in items]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if items:
        target = "overrides" if hasattr(args, "overrides") else "items"
        if not hasattr(args, target):
            parser.error(
                f"{args.command} takes no KEY=VALUE overrides ({' '.join(items)}): they go "
                "after train, prepare, compare, params or ds-config"
            )
        getattr(args, target).extend(items)
    return args


def main(argv: list[str] | None = None) -> int:
    """`leviathan ...`: parse, run the command, return its exit status."""
    args = parse_args(build_parser(), argv)
    return run_command(args.func, args)
