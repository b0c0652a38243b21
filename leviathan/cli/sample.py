"""`leviathan sample`: continue a prompt with a trained run."""

from __future__ import annotations

import argparse

from leviathan.cli.options import add_run_args
from leviathan.entry import bounded
from leviathan.errors import ConfigError

TOKENS = bounded(int, 1, "a number of tokens >= 1")


def add_sample_parser(subparsers: argparse._SubParsersAction) -> None:
    """The `sample` command; `--context-keep` and `--compile` trade speed for long outputs."""
    p = subparsers.add_parser("sample", help="continue a prompt")
    add_run_args(p)
    p.add_argument("--prompt", default="\n", help="text to continue (default %(default)r)")
    p.add_argument(
        "--max-new-tokens",
        type=bounded(int, 0, "a count >= 0"),
        default=200,
        help="tokens to generate (default %(default)s)",
    )
    p.add_argument(
        "--temperature",
        type=bounded(float, 0, "a number >= 0 (0: greedy)"),
        default=0.8,
        help="softmax temperature; 0 takes the likeliest token (default %(default)s)",
    )
    p.add_argument(
        "--top-k",
        type=TOKENS,
        default=200,
        help="sample among the K likeliest tokens (default %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default %(default)s)")
    p.add_argument(
        "--context-keep",
        type=TOKENS,
        help="past block_size, cut the context to its last N tokens (default "
        "block_size: a sliding window, which refills the cache at every token; "
        "block_size/2 refills it once per block_size/2 tokens)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile the cached one-token step (torch.compile; pays for long "
        "generations: the first compile takes tens of seconds on a CPU)",
    )
    p.set_defaults(func=cmd_sample)


def cmd_sample(args: argparse.Namespace) -> None:
    """Print the continuation; a `--context-keep` past the model's window is refused."""
    from leviathan.trained import load_run

    run = load_run(args.run, args.checkpoint)
    keep, block = args.context_keep, run.model.cfg.block_size
    if keep is not None and keep > block:
        raise ConfigError(f"--context-keep: at most the model's block_size={block}, got {keep}")
    generate = {"context_keep": keep, "compiled": args.compile}
    print(
        run.sample(
            args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed, **generate
        )
    )
