"""The Ray job: Ray Train starts N workers, each runs the one loop as a DeepSpeed rank.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python launch/train_moe.py --config configs/moe-8x125m.yaml --workers 16 \\
        --gpus-per-worker 1 run.dir=/shared/runs/moe-8x125m data.dir=/shared/data/moe-bpe32k

It joins the cluster the job runs in (`--address` to name another; none: a local one is
started), prepares the data once if it is missing, and runs a TorchTrainer whose workers
each call `leviathan.train.trainer.train`. Every checkpoint the loop writes is reported to
Ray with the step's metrics; when a worker dies, Ray restarts the group (up to
`--max-failures` times) and every worker resumes from the newest checkpoint: the last one
reported to Ray, or run.dir's own latest when that is newer. The job's log holds each
line of the loop once (Ray Train's own lines, such as each report's metrics, only with
`--ray-log-level INFO`) and ends with the closing lines of `leviathan train` (sample,
final val, unigram and held-out BPC).

Paths: run.dir, data.dir and --storage must be on storage every node sees. The driver makes
every path of the config absolute before a worker sees it (Ray Train runs each worker in a
folder of its own). A relative path resolves against the driver's working directory, as
for `leviathan train`. In a job from `ray job submit` that directory is Ray's temporary copy
of `--working-dir`, not where you submitted from: inputs read from it are fine, but a run
or dataset written there is deleted with the copy and a later job (`--resume`) gets another
copy, so a relative run.dir, data.dir or --storage is refused there; write `$PWD/runs/x`
(your shell resolves it where you submit) or a path on shared storage.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from leviathan.config import Config, config_from_dict  # noqa: E402
from leviathan.entry import (  # noqa: E402
    add_config_args,
    add_wandb_arg,
    config_as_asked,
    print_closing,
    run_script,
)
from leviathan.errors import ConfigError, LeviathanError  # noqa: E402
from leviathan.parallel.hosts import check_ray_address  # noqa: E402
from leviathan.train.checkpoint import checkpoint_step, latest_checkpoint  # noqa: E402
from leviathan.train.run_folder import RunLock, check_fresh  # noqa: E402

WORKER_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",  # a report: ~0.1 s, not ~2 s
    # Ray Train sends a worker's print to its logger (to stderr) and, as a Ray worker's
    # sys.stdout is always a replaced stream, to stdout as well: each line came twice.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}
SUBMITTED_JOB = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job server for a job's driver
RAY_LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]


def build_parser() -> argparse.ArgumentParser:
    """The job's options: a config and its overrides, the Ray cluster and workers."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_args(parser)
    parser.add_argument("--address", help="Ray cluster (http://HEAD:8265 or HEAD:6379)")
    parser.add_argument("--workers", type=int, default=2, help="ranks (default %(default)s)")
    parser.add_argument(
        "--gpus-per-worker",
        type=gpus_per_worker,
        default=0,
        help="0: CPU workers, else at least 1 (default %(default)s)",
    )
    parser.add_argument(
        "--cpus-per-worker", type=float, default=1, help="CPUs of each worker (default %(default)s)"
    )
    parser.add_argument("--storage", help="Ray's storage_path (default: run.dir/ray)")
    parser.add_argument(
        "--max-failures", type=int, default=3, help="group restarts allowed (default %(default)s)"
    )
    parser.add_argument(
        "--ray-log-level",
        choices=RAY_LOG_LEVELS,
        default="WARNING",
        help="Ray Train's own lines (INFO: each report, group starts, restart decisions; "
        "default %(default)s)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue run.dir's run with its own config.yaml (overrides: any key but "
        "model.* and data.*)",
    )
    add_wandb_arg(parser)
    return parser


def gpus_per_worker(text: str) -> float:
    """0 or at least 1: with a fraction, workers share a GPU, their local ranks run past
    the devices each sees, and NCCL refuses two ranks on one GPU anyway."""
    value = float(text)
    if value != 0 and value < 1:
        raise argparse.ArgumentTypeError(f"must be 0 (CPU workers) or at least 1, got {text}")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_intermixed_args(argv)


def worker(job: dict) -> None:
    """One rank: resume from the newest checkpoint there is, train, report to Ray."""
    import ray.train
    import torch

    from leviathan.train.metrics import scalars
    from leviathan.train.trainer import train

    # Ray Train logs each report (a dump of its metrics) through a logger named by its
    # file path, which LoggingConfig's level misses: the root logger's level catches it.
    logging.getLogger().setLevel(job["log_level"])
    cfg = config_from_dict(job["config"])
    if not cfg.train.threads:
        torch.set_num_threads(max(1, int(job["cpus_per_worker"])))
    rank = ray.train.get_context().get_world_rank()

    def on_checkpoint(folder: Path, record: dict) -> None:
        # The folder is on shared storage and holds every rank's shard: rank 0 hands it
        # to Ray whole, the others report the same metrics (report is collective).
        metrics = {"step": record["step"], **scalars(record)}
        if rank == 0:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
        else:
            ray.train.report(metrics)

    reported = ray.train.get_checkpoint()
    with reported.as_directory() if reported else contextlib.nullcontext() as folder:
        source = newest_checkpoint(Path(folder) if folder else None, Path(cfg.run.dir))
        train(  # claimed: the driver holds run.dir's lock for the whole job, restarts included
            cfg,
            resume=source or False,
            claimed=True,
            on_checkpoint=on_checkpoint,
        )


def newest_checkpoint(reported: Path | None, run_dir: Path) -> Path | None:
    """After a restart: Ray's last reported checkpoint or the run folder's own latest
    (newer when a worker died between writing one and reporting it), whichever is newer.
    A fresh job finds neither: `main` refuses a used run.dir without --resume."""
    found = [p for p in (reported, latest_checkpoint(run_dir / "checkpoints")) if p]
    return max(found, key=checkpoint_step, default=None)


def absolute_path(key: str, value: str, written: bool) -> str:
    """`value` made absolute against this directory; a relative path the job writes to is
    refused in a submitted job, whose directory is Ray's temporary copy (module docstring)."""
    path = os.path.expanduser(value)
    if written and not os.path.isabs(path) and SUBMITTED_JOB in os.environ:
        example = f"{key}=$PWD/{value}" if "." in key else f"{key} $PWD/{value}"
        raise ConfigError(
            f"{key}: {value!r} is relative, and this job runs in Ray's temporary copy of its "
            f"working dir, not where it was submitted from: give an absolute path on storage "
            f"every node sees, e.g. {example}"
        )
    return os.path.abspath(path)


def absolute_paths(cfg: Config, args: argparse.Namespace) -> None:
    """Every path of `cfg`, and `--storage` (default run.dir/ray), absolute: the driver and
    each worker name the same files."""
    data = cfg.data
    cfg.run.dir = absolute_path("run.dir", cfg.run.dir, written=True)
    data.dir = absolute_path("data.dir", data.dir, written=True)
    if data.inputs is not None:  # None: the dataset in data.dir as it is
        data.inputs = [absolute_path("data.inputs", p, written=False) for p in data.inputs]
    if data.tokenizer.model:
        data.tokenizer.model = absolute_path(
            "data.tokenizer.model", data.tokenizer.model, written=False
        )
    args.storage = absolute_path("--storage", args.storage or f"{cfg.run.dir}/ray", written=True)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    wandb = [f"run.wandb={args.wandb}"] if args.wandb else []
    cfg = config_as_asked(args, [*args.overrides, *wandb, "parallel.engine=deepspeed"])
    if args.address:
        check_ray_address(args.address)
    if args.workers < 1:
        raise LeviathanError(f"--workers: must be at least 1, got {args.workers}")
    absolute_paths(cfg, args)
    run_dir = Path(cfg.run.dir)
    lock = RunLock(run_dir)  # for the whole job: workers (and their restarts) run under it
    try:
        if not args.resume:
            check_fresh(run_dir)
        run(cfg, args)
    finally:
        lock.release()


def run(cfg: Config, args: argparse.Namespace) -> None:
    import ray
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from leviathan.data import prepare
    from leviathan.train.trainer import TrainSummary

    started = time.perf_counter()
    prepare(cfg.data)  # once, here, before the workers look for it
    use_gpu = args.gpus_per_worker > 0
    env = dict(WORKER_ENV, **({} if use_gpu else {"DS_ACCELERATOR": "cpu"}))
    os.environ.update(env)  # the driver side of Ray Train reads some of them too
    ray.init(address=args.address, runtime_env={"env_vars": env}, log_to_driver=True)
    resources = {"CPU": args.cpus_per_worker} | ({"GPU": args.gpus_per_worker} if use_gpu else {})
    trainer = TorchTrainer(
        worker,
        train_loop_config={
            "config": cfg.to_dict(),
            "cpus_per_worker": args.cpus_per_worker,
            "log_level": args.ray_log_level,
        },
        scaling_config=ScalingConfig(
            num_workers=args.workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=Path(cfg.run.dir).name,
            storage_path=args.storage,
            failure_config=FailureConfig(max_failures=args.max_failures),
            logging_config=LoggingConfig(log_level=args.ray_log_level),
        ),
    )
    trainer.fit()
    summary = json.loads((Path(cfg.run.dir) / "summary.json").read_text(encoding="utf-8"))
    print_closing(TrainSummary(**summary), cfg.run.dir, time.perf_counter() - started)


if __name__ == "__main__":
    run_script(main)
