"""`leviathan export`: one consolidated model.safetensors from a checkpoint of any layout."""

from __future__ import annotations

import argparse
from pathlib import Path

from leviathan.cli.options import add_run_args


def add_export_parser(subparsers: argparse._SubParsersAction) -> None:
    """The `export` command; `--out` puts the file elsewhere than the run folder."""
    p = subparsers.add_parser(
        "export", help="write a run's checkpoint as one consolidated model.safetensors"
    )
    add_run_args(p)
    p.add_argument("--out", help="output file (default RUN/model.safetensors)")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> None:
    """Export the checkpoint and say where it went and how large it is."""
    from leviathan.export import export_run
    from leviathan.trained import run_checkpoint

    run_dir = Path(args.run)
    checkpoint = run_checkpoint(run_dir, args.checkpoint)
    out = export_run(run_dir, checkpoint, Path(args.out) if args.out else None)
    print(f"exported {checkpoint} to {out} ({out.stat().st_size / 2**20:.1f} MiB)")
