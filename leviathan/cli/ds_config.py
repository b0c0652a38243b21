"""`leviathan ds-config`: the DeepSpeed JSON a config derives, to read before a launch."""

from __future__ import annotations

import argparse

from leviathan.cli.options import add_config_file_args, config_of
from leviathan.config import load_config


def add_ds_config_parser(subparsers: argparse._SubParsersAction) -> None:
    """The `ds-config` command; `--gpu` shows what a GPU run would get (fused Adam)."""
    p = subparsers.add_parser("ds-config", help="print the DeepSpeed JSON a config derives")
    add_config_file_args(p, "parallel.zero_stage=3")
    p.add_argument("--gpu", action="store_true", help="as on GPU (fused Adam)")
    p.set_defaults(func=cmd_ds_config)


def cmd_ds_config(args: argparse.Namespace) -> None:
    """Print the DeepSpeed config as indented JSON."""
    import json

    from leviathan.parallel.deepspeed.config import deepspeed_config

    print(json.dumps(deepspeed_config(load_config(*config_of(args)), args.gpu), indent=2))
