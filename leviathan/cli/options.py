"""Options more than one `leviathan` command takes, written once so they read the same."""

from __future__ import annotations

import argparse


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """`--run` and `--checkpoint`: the commands that read a trained run's weights."""
    parser.add_argument("--run", required=True, help="run folder")
    parser.add_argument("--checkpoint", help="a checkpoint folder (default: the run's latest)")


def add_config_file_args(parser: argparse.ArgumentParser, example: str) -> None:
    """A YAML config as a positional, then its KEY=VALUE overrides (`example` one of them):
    for the commands that only read a config."""
    parser.add_argument("config", help="YAML config")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=f"e.g. {example}")
