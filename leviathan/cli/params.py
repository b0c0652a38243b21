"""`leviathan params`: a config's size and cost, and the override that matches another's."""

from __future__ import annotations

import argparse

from leviathan.cli.options import add_config_file_args, config_of
from leviathan.config import load_config


def add_params_parser(subparsers: argparse._SubParsersAction) -> None:
    """The `params` command; `--match` with `--vary` solves one key for equal size."""
    p = subparsers.add_parser(
        "params",
        help="parameters, active parameters, FLOPs/token; --match sizes one config to another",
        description="Print a config's total and active parameters and forward FLOPs per "
        "token (no data needed: the vocabulary is model.vocab_size, else the tokenizer's). "
        "With --match OTHER, find the value of --vary that makes CONFIG's parameters (or "
        "--active parameters) match OTHER's within --tolerance, and print the override.",
    )
    add_config_file_args(p, "model.n_layer=4")
    p.add_argument("--match", metavar="OTHER", help="a config to match in size")
    p.add_argument("--active", action="store_true", help="match active parameters (MoE)")
    p.add_argument(
        "--vary",
        default="model.d_model",
        metavar="KEY",
        help="the key to solve for, e.g. model.n_layer, model.ffn.hidden_mult "
        "(default %(default)s)",
    )
    p.add_argument("--tolerance", type=float, default=0.02, help="relative (default %(default)s)")
    p.set_defaults(func=cmd_params)


def cmd_params(args: argparse.Namespace) -> None:
    """Print the sizes, and with `--match` the matching override and what it gives."""
    from leviathan.sizing import match_size, model_size

    path, overrides = config_of(args)
    cfg = load_config(path, overrides)
    size = model_size(cfg)
    print(
        f"{path}: {size.total:,} parameters ({size.active:,} active), "
        f"{size.flops_per_token / 1e6:.2f} MFLOPs/token forward at seq_len {size.seq_len} "
        f"(vocab {size.vocab_size:,})"
    )
    if not args.match:
        return
    target = model_size(load_config(args.match))
    kind = "active parameters" if args.active else "parameters"
    print(f"{args.match}: {target.total:,} parameters ({target.active:,} active)")
    found = match_size(cfg, target, args.vary, active=args.active, tolerance=args.tolerance)
    print(
        f"match {kind}: {found.override} gives {found.size.count(args.active):,} "
        f"({found.relative_error:+.2%}; {found.size.total:,} parameters, "
        f"{found.size.active:,} active, {found.size.flops_per_token / 1e6:.2f} MFLOPs/token)"
    )
    print(f"override: {found.override}")
