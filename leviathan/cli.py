"""`leviathan prepare | train | eval | sample | compare | params | inspect | export | ds-config`."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from leviathan.config import DEFAULT_CONFIG, load_config
from leviathan.errors import ConfigError, Interrupted, LeviathanError
from leviathan.parallel.world import leave_world

if TYPE_CHECKING:
    from leviathan.config import Config
    from leviathan.train.trainer import TrainSummary

T = TypeVar("T")
INTERRUPTED = 130  # the shell's status for a process ended by Ctrl-C (128 + SIGINT)


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
THREADS = bounded(int, 1, "a number of threads >= 1")


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG})"
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. model.n_layer=4")


def cmd_prepare(args: argparse.Namespace) -> None:
    from leviathan.data import prepare

    overrides = list(args.overrides)
    ray_address = args.ray
    if ray_address is not None and "=" in ray_address:  # `--ray KEY=VALUE`: no address given
        overrides.insert(0, ray_address)
        ray_address = "auto"
    if args.inputs:
        overrides.append(f"data.inputs=[{', '.join(repr(i) for i in args.inputs)}]")
    if args.workers is not None:
        overrides.append(f"data.workers={args.workers}")
    cfg = load_config(args.config, overrides)
    index = prepare(cfg.data, rebuild=args.rebuild, ray_address=ray_address)
    for split, stats in index.splits.items():
        print(
            f"{split}: {stats['tokens']:,} tokens, {stats['characters']:,} characters, "
            f"{len(index.shards[split])} shard(s)"
        )
    print(f"prepared {index.dir}")


NO_VAL = "no validation split (data.val_fraction=0): score text with `leviathan eval --data`"


def add_train_args(parser: argparse.ArgumentParser) -> None:
    """The options `leviathan train` and `launch/train.py` share."""
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
    parser.add_argument("--wandb", choices=["auto", "online", "offline", "disabled"])
    add_rebuild_arg(parser)


def train_as_asked(cfg: Config, args: argparse.Namespace) -> TrainSummary:
    """`train(cfg)` with the options of `add_train_args`."""
    from leviathan.train.trainer import train

    return train(
        cfg,
        resume=args.resume,
        resume_from=args.resume_from,
        stop_at=args.stop_at,
        rebuild=args.rebuild,
    )


def cmd_train(args: argparse.Namespace) -> None:
    overrides = list(args.overrides)
    if args.wandb:
        overrides.append(f"run.wandb={args.wandb}")
    if args.peak_flops is not None:
        overrides.append(f"train.peak_flops={args.peak_flops!r}")
    cfg = load_config(args.config, overrides)
    started = time.perf_counter()
    summary = train_as_asked(cfg, args)
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
    print(f"run folder {cfg.run.dir}, wall time {time.perf_counter() - started:.0f} s")


def cmd_eval(args: argparse.Namespace) -> None:
    from leviathan.data import read_documents
    from leviathan.trained import load_run

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    run = load_run(args.run, args.checkpoint)
    if args.data:
        docs = read_documents(args.data, run.config.data.text_field, what="--data")
        result = run.evaluate_documents(docs)
        print(
            f"step {run.step}: loss {result.loss:.4f} nats/token, BPC {result.bpc:.4f} on "
            f"{len(docs):,} document(s) ({result.tokens:,} tokens)"
        )
        return
    splits = ["val"] + (["heldout"] if "heldout" in run.dataset(args.data_dir).splits else [])
    for split in splits:
        result = run.evaluate(data_dir=args.data_dir, split=split)
        print(
            f"step {run.step}: {split} loss {result.loss:.4f} nats/token, "
            f"{split} BPC {result.bpc:.4f} ({result.tokens:,} tokens)"
        )


def cmd_sample(args: argparse.Namespace) -> None:
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


def seeds_arg(text: str) -> int | list[int]:
    """`--seeds`: a count N (seeds 0..N-1), or seeds and inclusive ranges such as 0,2 or
    2-2 (seed 2 alone) or 0-1,4."""
    try:
        if text.isdigit():
            if int(text) < 1:
                raise ValueError
            return int(text)
        seeds = []
        for item in text.split(","):
            first, dash, last = item.partition("-")
            low, high = int(first), int(last) if dash else int(first)
            if low < 0 or high < low:
                raise ValueError
            seeds += range(low, high + 1)
        if len(set(seeds)) != len(seeds):
            raise ValueError
        return seeds
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected a count >= 1, or distinct seeds >= 0 and ranges such as 0,2 or 2-3"
        ) from None


def cmd_compare(args: argparse.Namespace) -> int:
    from leviathan.compare import compare

    configs = [i for i in args.items if "=" not in i or Path(i).is_file()]
    overrides = [i for i in args.items if i not in configs]
    result = compare(
        configs,
        seeds=args.seeds,
        budget=args.budget,
        out=args.out,
        overrides=overrides,
        wandb=args.wandb,
        report_only=args.report_only,
    )
    print(f"wrote {result.out / 'results.md'}, results.json and the val BPC plots")
    for run in result.failed:
        print(f"FAILED {run.name}: {run.error}", file=sys.stderr)
    return 1 if result.failed else 0


def cmd_params(args: argparse.Namespace) -> None:
    from leviathan.sizing import match_size, model_size

    cfg = load_config(args.config, args.overrides)
    size = model_size(cfg)
    print(
        f"{args.config}: {size.total:,} parameters ({size.active:,} active), "
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


def cmd_inspect(args: argparse.Namespace) -> None:
    from leviathan.inspection import inspect_run

    result = inspect_run(args.run, args.against, args.out, args.windows)
    print(f"wrote {result.kernels}, {result.distance} and {result.profiles}")


def cmd_export(args: argparse.Namespace) -> None:
    from leviathan.export import export_run
    from leviathan.trained import run_checkpoint

    run_dir = Path(args.run)
    checkpoint = run_checkpoint(run_dir, args.checkpoint)
    out = export_run(run_dir, checkpoint, Path(args.out) if args.out else None)
    print(f"exported {checkpoint} to {out} ({out.stat().st_size / 2**20:.1f} MiB)")


def cmd_ds_config(args: argparse.Namespace) -> None:
    import json

    from leviathan.parallel.deepspeed.config import deepspeed_config

    print(
        json.dumps(deepspeed_config(load_config(args.config, args.overrides), args.gpu), indent=2)
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leviathan", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "prepare", help="tokenise a corpus into shards (default: bundled Shakespeare)"
    )
    add_config_args(p)
    p.add_argument(
        "--input",
        dest="inputs",
        action="append",
        help="file, folder, glob, .jsonl or .parquet, optionally .gz/.zst (repeatable)",
    )
    p.add_argument(
        "--workers",
        type=bounded(int, 0, "a number of processes >= 0 (0: every core)"),
        help="encoding processes (data.workers; default every core)",
    )
    p.add_argument(
        "--ray",
        nargs="?",
        const="auto",
        metavar="ADDRESS",
        help="encode on a Ray cluster with Ray Data (ADDRESS: host:port, default auto; "
        "local: start one here); the shards are those of the local path",
    )
    add_rebuild_arg(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train a model (default: configs/tiny.yaml)")
    add_config_args(p)
    add_train_args(p)
    p.add_argument(
        "--peak-flops",
        type=float,
        metavar="FLOPS",
        help="peak FLOP/s of one device for MFU (train.peak_flops; default: known GPUs' table)",
    )
    p.set_defaults(func=cmd_train)

    for name, func, text in (
        ("eval", cmd_eval, "val loss and BPC of a run"),
        ("sample", cmd_sample, "continue a prompt"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--run", required=True, help="run folder")
        p.add_argument("--checkpoint", help="a checkpoint folder (default: the run's latest)")
        if name == "eval":
            p.add_argument(
                "--data",
                nargs="+",
                metavar="PATH",
                help="score these files, folders, globs, .jsonl or .parquet, not the val split",
            )
            p.add_argument(
                "--data-dir",
                metavar="DIR",
                help="the run's dataset, where it is now (default: the path the run recorded)",
            )
            p.add_argument("--threads", type=THREADS, help="torch threads (default torch's)")
        if name == "sample":
            p.add_argument("--prompt", default="\n")
            p.add_argument("--max-new-tokens", type=bounded(int, 0, "a count >= 0"), default=200)
            p.add_argument(
                "--temperature",
                type=bounded(float, 0, "a number >= 0 (0: greedy)"),
                default=0.8,
            )
            p.add_argument(
                "--top-k",
                type=bounded(int, 1, "a number of tokens >= 1"),
                default=200,
                help="sample among the K likeliest tokens (default 200)",
            )
            p.add_argument("--seed", type=int, default=0)
            p.add_argument(
                "--context-keep",
                type=bounded(int, 1, "a number of tokens >= 1"),
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
        p.set_defaults(func=func)

    p = sub.add_parser(
        "compare",
        help="train configs x seeds under one budget; results.md, results.json, plots",
        description="Train every CONFIG x seed on the same data under the same budget, each "
        "in OUT/runs/<config stem>-s<seed>, and write OUT/results.md, OUT/results.json and "
        "val BPC plots. The configs must have equal data sections. Finished runs are "
        "reused, interrupted ones resumed; a failed run is reported and the rest go on "
        "(exit status 1). KEY=VALUE items override every config.",
    )
    p.add_argument("items", nargs="+", metavar="CONFIG|KEY=VALUE")
    p.add_argument(
        "--seeds",
        type=seeds_arg,
        default=1,
        help="N: seeds 0..N-1 per config (default 1); or seeds and ranges such as 0,2 or "
        "2-3 (processes that take different seeds can share one comparison's folder)",
    )
    p.add_argument(
        "--budget", required=True, help="steps=K, tokens=K or minutes=K (wall clock) per run"
    )
    p.add_argument("--out", default="runs/compare", help="output folder (default runs/compare)")
    p.add_argument("--wandb", choices=["auto", "online", "offline", "disabled"], default="disabled")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: write the tables and plots from the runs that finished, the "
        "others listed as pending",
    )
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "params",
        help="parameters, active parameters, FLOPs/token; --match sizes one config to another",
        description="Print a config's total and active parameters and forward FLOPs per "
        "token (no data needed: the vocabulary is model.vocab_size, else the tokenizer's). "
        "With --match OTHER, find the value of --vary that makes CONFIG's parameters (or "
        "--active parameters) match OTHER's within --tolerance, and print the override.",
    )
    p.add_argument("config", help="YAML config")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. model.n_layer=4")
    p.add_argument("--match", metavar="OTHER", help="a config to match in size")
    p.add_argument("--active", action="store_true", help="match active parameters (MoE)")
    p.add_argument(
        "--vary",
        default="model.d_model",
        metavar="KEY",
        help="the key to solve for, e.g. model.n_layer, model.ffn.hidden_mult "
        "(default model.d_model)",
    )
    p.add_argument("--tolerance", type=float, default=0.02, help="relative (default 0.02)")
    p.set_defaults(func=cmd_params)

    p = sub.add_parser(
        "inspect",
        help="plot a run's learned lag weights and attention-distance profile",
        description="Write the learned lag weights (token_xcorr kernels or channel_xcorr "
        "weights) and the mean attention weight against distance, per layer, of a run "
        "(beside another run's, e.g. a dot run, with --against) as PNGs and JSON.",
    )
    p.add_argument("--run", required=True, help="run folder (token_xcorr or channel_xcorr)")
    p.add_argument("--against", metavar="RUN", help="a run to compare the profile with")
    p.add_argument("--out", help="output folder (default: the run folder)")
    p.add_argument("--windows", type=int, default=8, help="val windows to average over")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "export", help="write a run's checkpoint as one consolidated model.safetensors"
    )
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--checkpoint", help="a checkpoint folder (default: the run's latest)")
    p.add_argument("--out", help="output file (default RUN/model.safetensors)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("ds-config", help="print the DeepSpeed JSON a config derives")
    p.add_argument("config", help="YAML config")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. parallel.zero_stage=3")
    p.add_argument("--gpu", action="store_true", help="as on GPU (fused Adam)")
    p.set_defaults(func=cmd_ds_config)
    return parser


def add_rebuild_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rebuild",
        action="store_true",
        help="replace a dataset in data.dir that was prepared from other inputs",
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


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, taking KEY=VALUE items wherever they stand (`train --wandb disabled
    model.n_layer=2 --stop-at 4 train.lr=1e-3`); a command without overrides says so."""
    args, rest = parser.parse_known_args(argv)
    items = [i for i in rest if "=" in i and not i.startswith("-")]
    unknown = [i for i in rest if i not in items]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if items:
        target = "overrides" if hasattr(args, "overrides") else "items"
        if not hasattr(args, target):
            parser.error(
                f"{args.command} takes no KEY=VALUE overrides ({' '.join(items)}): they go "
                "after train, prepare, compare, params or ds-config"
            )
        getattr(args, target).extend(items)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
