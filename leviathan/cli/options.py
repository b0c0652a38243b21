"""Options more than one `leviathan` command takes, written once so they read the same."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from leviathan.config import DEFAULT_CONFIG
from leviathan.errors import ConfigError


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """`--run` and `--checkpoint`: the commands that read a trained run's weights."""
    parser.add_argument("--run", required=True, help="run folder")
    parser.add_argument("--checkpoint", help="a checkpoint folder (default: the run's latest)")


def add_config_file_args(parser: argparse.ArgumentParser, example: str) -> None:
    """`--config` and KEY=VALUE overrides (`example` one of them), as `train` takes them,
    for the commands that only read a config. `config_of` reads them back, and still takes
    the config as the first positional, the older form, with a note."""
    parser.add_argument("--config", help=f"YAML config (default {DEFAULT_CONFIG})")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=f"e.g. {example}")


def split_items(items: list[str]) -> tuple[list[str], list[str]]:
    """Positional items as (config files, KEY=VALUE overrides): an item is a config when
    it has no `=` or names an existing file."""
    configs = [i for i in items if "=" not in i or Path(i).is_file()]
    return configs, [i for i in items if i not in configs]


def config_of(args: argparse.Namespace) -> tuple[str, list[str]]:
    """The config and overrides of `add_config_file_args`' options; a config given as a
    positional is taken with a note on stderr, and two configs are a ConfigError."""
    configs, overrides = split_items(args.overrides)
    given = ([args.config] if args.config else []) + configs
    if len(given) > 1:
        raise ConfigError(
            f"{args.command}: one config, got {' and '.join(given)}: give it as --config "
            "CONFIG; the other items must be KEY=VALUE overrides"
        )
    if configs:
        print(
            f"note: `leviathan {args.command} CONFIG` is deprecated: use "
            f"`leviathan {args.command} --config {configs[0]}`",
            file=sys.stderr,
        )
    return (given[0] if given else DEFAULT_CONFIG), overrides
