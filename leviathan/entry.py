"""How a Leviathan process starts: `leviathan` and the launch scripts (launch/train.py,
launch/train_moe.py) share these options and this runner, so a flag, an `error:` line
and an exit status mean the same whichever way a run was started."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NoReturn, TypeVar

from leviathan.config import (
    DEFAULT_CONFIG,
    RUN_CONFIG,
    asked_run_dir,
    load_config,
    resume_config,
)
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
        "--config", default=DEFAULT_CONFIG, help="YAML config (default %(default)s)"
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
        "--resume",
        action="store_true",
        help="continue the run in run.dir from its latest checkpoint, with its own "
        "config.yaml; KEY=VALUE overrides may change any key but model.* and data.* "
        "(e.g. train.max_steps); --config only names run.dir",
    )
    parser.add_argument(
        "--resume-from",
        type=STEP,
        metavar="STEP",
        help="as --resume, from the checkpoint of STEP (e.g. when the latest one is damaged)",
    )
    parser.add_argument(
        "--stop-at", type=STEP, metavar="STEP", help="checkpoint and stop after STEP"
    )
    add_wandb_arg(parser)
    add_rebuild_arg(parser)


def add_wandb_arg(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """`--wandb MODE`, over run.wandb: for `train`, `compare` and the launch scripts."""
    parser.add_argument(
        "--wandb",
        choices=WANDB_MODES,
        default=default,
        metavar="MODE",
        help="W&B mode, overriding run.wandb: %(choices)s"
        + (" (default %(default)s)" if default else "")
        + ". auto (run.wandb's default) follows W&B: its mode when WANDB_MODE or `wandb "
        "offline`/`wandb disabled` set one, else online when W&B has credentials (`wandb "
        "login`, WANDB_API_KEY), else offline",
    )


def config_as_asked(args: argparse.Namespace, overrides: Sequence[str]) -> Config:
    """The config a training runs: `--config` with the overrides; with `--resume` (or
    `--resume-from`), the run's own config.yaml with the overrides (`resume_config`), in
    the folder the run.dir override names, else the one `--config` names. The settings of
    `--config` are then not read: a note says so when it is not the default."""
    config = args.config
    if not args.resume and getattr(args, "resume_from", None) is None:
        return load_config(config, overrides)
    run_dir = asked_run_dir(config, overrides)
    cfg = resume_config(run_dir, overrides)
    if config != DEFAULT_CONFIG and int(os.environ.get("RANK", "0")) == 0:
        print(
            f"note: --resume continues {run_dir} with its own {RUN_CONFIG} and the overrides "
            f"given; the settings of --config {config} are not read",
            file=sys.stderr,
        )
    return cfg


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


def print_closing(summary: TrainSummary, run_dir: str, wall_s: float) -> None:
    """A run's closing lines: the sample, the final val BPC beside the unigram baseline,
    the held-out BPC, where the run is. One function, so `leviathan train` and the Ray
    job (launch/train_moe.py) end alike."""
    print(f"\nsample:\n{summary.sample}\n")
    if summary.val_bpc is None:
        print(NO_VAL)
    else:
        print(f"final val loss {summary.val_loss:.4f} nats/token")
        print(
            f"final val BPC {summary.val_bpc:.4f} "
            f"(unigram baseline of this tokenizer {summary.unigram_bpc:.4f})"
        )
    if summary.heldout_bpc is not None:
        print(f"final heldout BPC {summary.heldout_bpc:.4f} (whole documents never trained on)")
    print(f"run folder {run_dir}, wall time {wall_s:.0f} s")


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
