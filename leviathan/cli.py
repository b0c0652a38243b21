"""`leviathan prepare | train | eval | sample`."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import TypeVar

from leviathan.config import DEFAULT_CONFIG, load_config
from leviathan.errors import LeviathanError

T = TypeVar("T")


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG})"
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. model.n_layer=4")


def cmd_prepare(args: argparse.Namespace) -> None:
    from leviathan.data import prepare

    overrides = list(args.overrides)
    if args.inputs:
        overrides.append(f"data.inputs=[{', '.join(repr(i) for i in args.inputs)}]")
    cfg = load_config(args.config, overrides)
    index = prepare(cfg.data)
    for split, stats in index.splits.items():
        print(f"{split}: {stats['tokens']:,} tokens, {stats['characters']:,} characters")
    print(f"prepared {index.dir}")


def cmd_train(args: argparse.Namespace) -> None:
    from leviathan.train.loop import train

    overrides = list(args.overrides)
    if args.wandb:
        overrides.append(f"run.wandb={args.wandb}")
    cfg = load_config(args.config, overrides)
    started = time.perf_counter()
    summary = train(cfg, resume=args.resume, stop_at=args.stop_at)
    print(f"\nsample:\n{summary.sample}\n")
    print(f"final val loss {summary.val_loss:.4f} nats/token")
    print(
        f"final val BPC {summary.val_bpc:.4f} "
        f"(unigram baseline of this tokenizer {summary.unigram_bpc:.4f})"
    )
    print(f"run folder {cfg.run.dir}, wall time {time.perf_counter() - started:.0f} s")


def cmd_eval(args: argparse.Namespace) -> None:
    from leviathan.run import load_run

    run = load_run(args.run, args.checkpoint)
    result = run.evaluate()
    print(
        f"step {run.step}: val loss {result.loss:.4f} nats/token, "
        f"val BPC {result.bpc:.4f} ({result.tokens:,} tokens)"
    )


def cmd_sample(args: argparse.Namespace) -> None:
    from leviathan.run import load_run

    run = load_run(args.run, args.checkpoint)
    print(run.sample(args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leviathan", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "prepare", help="tokenise a corpus into shards (default: bundled Shakespeare)"
    )
    add_config_args(p)
    p.add_argument(
        "--input", dest="inputs", action="append", help="file, folder, glob or .jsonl (repeatable)"
    )
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train a model (default: configs/tiny.yaml)")
    add_config_args(p)
    p.add_argument(
        "--resume", action="store_true", help="continue from the run's latest checkpoint"
    )
    p.add_argument("--wandb", choices=["auto", "online", "offline", "disabled"])
    p.add_argument("--stop-at", type=int, metavar="STEP", help="checkpoint and stop after STEP")
    p.set_defaults(func=cmd_train)

    for name, func, text in (
        ("eval", cmd_eval, "val loss and BPC of a run"),
        ("sample", cmd_sample, "continue a prompt"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--run", required=True, help="run folder")
        p.add_argument("--checkpoint", help="a checkpoint folder (default: the run's latest)")
        if name == "sample":
            p.add_argument("--prompt", default="\n")
            p.add_argument("--max-new-tokens", type=int, default=200)
            p.add_argument("--temperature", type=float, default=0.8)
            p.add_argument("--top-k", type=int, default=200)
            p.add_argument("--seed", type=int, default=0)
        p.set_defaults(func=func)
    return parser


def run_command(func: Callable[[T], None], arg: T) -> int:
    """Run a command: a Leviathan error is one `error: ...` line and exit status 2."""
    try:
        func(arg)
    except LeviathanError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
