"""`leviathan export`: a checkpoint of any layout as one consolidated model.safetensors
(`Leviathan.from_export` loads it), or as a Hugging Face folder (`--format hf`) that
transformers and lm-evaluation-harness load without this package (docs/export.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from leviathan.cli.options import add_run_args


def add_export_parser(subparsers: argparse._SubParsersAction) -> None:
    """The `export` command; `--out` puts the file or folder elsewhere than the run folder."""
    p = subparsers.add_parser(
        "export", help="write a run's checkpoint as one model.safetensors, or a Hugging Face folder"
    )
    add_run_args(p)
    p.add_argument(
        "--format",
        choices=("safetensors", "hf"),
        default="safetensors",
        help="safetensors: one file (default RUN/model.safetensors); hf: a transformers "
        "folder (default RUN/hf; needs the `hf` extra)",
    )
    p.add_argument("--out", help="output file, or folder with --format hf")
    p.add_argument("--force", action="store_true", help="replace an existing --format hf folder")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> None:
    """Export the checkpoint and say where it went and how large it is."""
    from leviathan.export import export_hf, export_run
    from leviathan.trained import run_checkpoint

    run_dir = Path(args.run)
    checkpoint = run_checkpoint(run_dir, args.checkpoint)
    out = Path(args.out) if args.out else None
    if args.format == "hf":
        out = export_hf(run_dir, checkpoint, out, force=args.force)
        size = sum(p.stat().st_size for p in out.iterdir())
    else:
        out = export_run(run_dir, checkpoint, out)
        size = out.stat().st_size
    print(f"exported {checkpoint} to {out} ({size / 2**20:.1f} MiB)")
