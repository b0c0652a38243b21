"""How a Leviathan process starts: `leviathan` and the launch scripts (launch/train.py,
launch/train_moe.py) share these options and this runner, so a flag, an `error:` line
and an exit status mean the same whichever way a run was started."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn, TypeVar

from leviathan.config import DEFAULT_CONFIG
from leviathan.errors import Interrupted, LeviathanError
from leviathan.parallel.world import leave_world

if TYPE_CHECKING:
    from leviathan.config import Config
    from leviathan.train.trainer import TrainSummary

T = TypeVar("T")
INTERRUPTED = 130  # the shell's status for a process ended by Ctrl-C (128 + SIGINT)
WANDB_MODES = ["auto", "online", "offline", "disabled"]
NO_VAL = "no validation split (data.val_fraction=0): score text with `leviathan eval --data`"


def bounded(kind: type, low: float, what: str) -> Callable[[str], int | float]:
    """An argparse type: a `kind` number >= `low` (finite), else a message naming `what`."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not low <= value < float("inf"):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    return parse


STEP = bounded(int, 1, "a step number >= 1")


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """`--config` and the KEY=VALUE overrides every config-driven command takes."""
    parser.add_argument(
        "--config", default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG})"
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. model.n_layer=4")


def add_rebuild_arg(parser: argparse.ArgumentParser) -> None:
    """`--rebuild`, for the commands that may prepare a dataset (prepare, train)."""
    parser.add_argument(
        "--rebuild",
        action="store_true",
        help="replace a dataset in data.dir that was prepared from other inputs",
    )


def add_train_args(parser: argparse.ArgumentParser) -> None:
    """The options `leviathan train` and `launch/train.py` share; `train_as_asked` reads
    them."""
    parser.add_argument(
        "--resume", action="store_true", help="continue from the run's latest checkpoint"
    )
    parser.add_argument(
        "--resume-from",
        type=STEP,
        metavar="STEP",
        help="continue from the checkpoint of STEP (e.g. when the latest one is damaged)",
    )
    parser.add_argument(
        "--stop-at", type=STEP, metavar="STEP", help="checkpoint and stop after STEP"
    )
    parser.add_argument("--wandb", choices=WANDB_MODES)
    add_rebuild_arg(parser)


def train_as_asked(cfg: Config, args: argparse.Namespace) -> TrainSummary:
    """`train(cfg)` with the options of `add_train_args` (`--wandb` is an override: the
    caller folds it into `cfg`)."""
    from leviathan.train.trainer import train

    return train(
        cfg,
        resume=args.resume,
        resume_from=args.resume_from,
        stop_at=args.stop_at,
        rebuild=args.rebuild,
    )


def run_command(func: Callable[[T], int | None], arg: T) -> int:
    """Run a command: a Leviathan error is one `error: ...` line and exit status 2, Ctrl-C
    one line and 130. A process group the command joined (a DeepSpeed rank) is left
    before the exit."""
    try:
        status = func(arg) or 0
    except Interrupted as err:
        print(f"\n{err}", file=sys.stderr)
        leave_world(wait=False)
        return INTERRUPTED
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        leave_world(wait=False)
        return INTERRUPTED
    except LeviathanError as err:
        print(f"error: {err}", file=sys.stderr)
        leave_world(wait=False)
        return 2
    leave_world()
    return status


def run_script(main: Callable[[list[str]], int | None]) -> NoReturn:
    """A launch script's closing line: `main(sys.argv[1:])` under `run_command`, whose
    status is the process's exit status."""
    sys.exit(run_command(main, sys.argv[1:]))
