"""Train Leviathan under any launcher; the same loop runs in every case.

    python launch/train.py --config configs/tiny.yaml            # one process, plain engine
    deepspeed --num_gpus 8 launch/train.py --config ...          # DeepSpeed, one box
    deepspeed --hostfile hosts launch/train.py --config ...      # DeepSpeed, many boxes
    torchrun --nproc_per_node 8 launch/train.py --config ...     # DeepSpeed under torchrun
    python launch/train.py --hostfile hosts --config ...         # checks the hosts, then
                                                                 # starts `deepspeed` itself

Under a launcher every rank runs this file; the engine is DeepSpeed (ZeRO stage from
`parallel.zero_stage`). Started plainly it is one process with the plain PyTorch engine
unless `parallel.engine=deepspeed` asks for a one-rank DeepSpeed run.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from leviathan.entry import (  # noqa: E402
    NO_VAL,
    add_config_args,
    add_train_args,
    config_as_asked,
    run_script,
    train_as_asked,
)
from leviathan.parallel.hosts import check_hostfile  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """`leviathan train`'s options, and the two that start `deepspeed` from a plain start."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_args(parser)
    add_train_args(parser)
    parser.add_argument("--hostfile", help="check these hosts, then start `deepspeed` on them")
    parser.add_argument("--num-gpus", type=int, help="start `deepspeed --num_gpus N` on this box")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # set by `deepspeed`
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_intermixed_args(argv)


def relaunch_under_deepspeed(args: argparse.Namespace, argv: list[str]) -> None:
    """`--hostfile` / `--num-gpus` from a plain start: check, then exec the launcher."""
    launcher = ["deepspeed"]
    rest, skip = [], False
    for item in argv:  # drop our launcher flags, keep everything else
        if skip:
            skip = False
            continue
        if item in ("--hostfile", "--num-gpus"):
            skip = True
            continue
        if item.startswith(("--hostfile=", "--num-gpus=")):
            continue
        rest.append(item)
    if args.hostfile:
        check_hostfile(Path(args.hostfile))
        launcher += ["--hostfile", args.hostfile]
    if args.num_gpus:
        launcher += ["--num_gpus", str(args.num_gpus)]
    os.execvp(launcher[0], [*launcher, __file__, *rest])


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if (args.hostfile or args.num_gpus) and "WORLD_SIZE" not in os.environ:
        relaunch_under_deepspeed(args, argv)
    overrides = list(args.overrides) + ([f"run.wandb={args.wandb}"] if args.wandb else [])
    cfg = config_as_asked(args, overrides)
    summary = train_as_asked(cfg, args)
    if summary.parallel["world_size"] == 1 or int(os.environ.get("RANK", "0")) == 0:
        if summary.val_bpc is None:
            print(f"{NO_VAL}; {summary.steps} steps")
        else:
            print(f"final val BPC {summary.val_bpc:.4f} after {summary.steps} steps")


if __name__ == "__main__":
    run_script(main)
