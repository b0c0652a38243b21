"""The Ray job: Ray Train starts N workers, each runs the one loop as a DeepSpeed rank.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python launch/train_moe.py --config configs/moe-8x125m.yaml --workers 16 --gpus-per-worker 1

It joins the cluster the job runs in (`--address` to name another; none: a local one is
started), prepares the data once if it is missing, and runs a TorchTrainer whose workers
each call `leviathan.train.trainer.train`. Every checkpoint the loop writes is reported to
Ray with the step's metrics; when a worker dies, Ray restarts the group (up to
`--max-failures` times) and every worker resumes from the newest checkpoint: the last one
reported to Ray, or run.dir's own latest when that is newer.
run.dir and data.dir must be on storage every node sees (the job's working directory is
a temporary copy): give absolute paths on a cluster.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from leviathan.config import Config, config_from_dict, load_config  # noqa: E402
from leviathan.entry import add_config_args, run_script  # noqa: E402
from leviathan.errors import LeviathanError  # noqa: E402
from leviathan.parallel.hosts import check_ray_address  # noqa: E402
from leviathan.train.checkpoint import checkpoint_step, latest_checkpoint  # noqa: E402
from leviathan.train.run_folder import RunLock, check_fresh  # noqa: E402

WORKER_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}  # a report: ~0.1 s, not ~2 s


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_args(parser)
    parser.add_argument("--address", help="Ray cluster (http://HEAD:8265 or HEAD:6379)")
    parser.add_argument("--workers", type=int, default=2, help="ranks (default 2)")
    parser.add_argument("--gpus-per-worker", type=float, default=0, help="0: CPU workers")
    parser.add_argument("--cpus-per-worker", type=float, default=1)
    parser.add_argument("--storage", help="Ray's storage_path (default: run.dir/ray)")
    parser.add_argument("--max-failures", type=int, default=3, help="group restarts allowed")
    parser.add_argument("--resume", action="store_true", help="continue run.dir's checkpoint")
    return parser.parse_intermixed_args(argv)


def worker(job: dict) -> None:
    """One rank: resume from the newest checkpoint there is, train, report to Ray."""
    import ray.train
    import torch

    from leviathan.train.metrics import scalars
    from leviathan.train.trainer import train

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


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    cfg = load_config(args.config, [*args.overrides, "parallel.engine=deepspeed"])
    if args.address:
        check_ray_address(args.address)
    if args.workers < 1:
        raise LeviathanError(f"--workers: must be at least 1, got {args.workers}")
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
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from leviathan.data import prepare

    prepare(cfg.data)  # once, here, before the workers look for it
    use_gpu = args.gpus_per_worker > 0
    env = dict(WORKER_ENV, **({} if use_gpu else {"DS_ACCELERATOR": "cpu"}))
    os.environ.update(env)  # the driver side of Ray Train reads some of them too
    ray.init(address=args.address, runtime_env={"env_vars": env}, log_to_driver=True)
    resources = {"CPU": args.cpus_per_worker} | ({"GPU": args.gpus_per_worker} if use_gpu else {})
    storage = Path(args.storage or Path(cfg.run.dir) / "ray").resolve()
    trainer = TorchTrainer(
        worker,
        train_loop_config={"config": cfg.to_dict(), "cpus_per_worker": args.cpus_per_worker},
        scaling_config=ScalingConfig(
            num_workers=args.workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=Path(cfg.run.dir).name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=args.max_failures),
        ),
    )
    result = trainer.fit()
    print(f"finished: step {result.metrics.get('step')}, metrics {result.metrics}")
    print(f"last checkpoint {result.checkpoint.path if result.checkpoint else None}")


if __name__ == "__main__":
    run_script(main)
