"""The process world a run lives in: one plain process, or one rank of many.

A distributed launcher (`deepspeed`, `torchrun`, Ray Train) starts every rank with
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR in the environment, or has already
initialised torch.distributed; a plain `python` start has neither and stays one process.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from leviathan.config import Config
from leviathan.errors import ConfigError, LeviathanError

T = TypeVar("T")


@dataclass
class World:
    engine: str  # "torch" or "deepspeed"
    rank: int
    world_size: int
    device: torch.device
    ep_group: object | None = None  # the expert-parallel group (parallel.ep_size > 1)


def launched_distributed() -> bool:
    import torch.distributed as dist

    return "WORLD_SIZE" in os.environ or (dist.is_available() and dist.is_initialized())


def engine_kind(cfg: Config) -> str:
    """`parallel.engine`, with `auto` resolved: DeepSpeed when launched as ranks."""
    if cfg.parallel.engine != "auto":
        return cfg.parallel.engine
    return "deepspeed" if launched_distributed() else "torch"


def check_parallel(cfg: Config, engine: str, world_size: int) -> None:
    """Refuse layouts that cannot run, naming the key: before any rank builds a model."""
    ep, stage = cfg.parallel.ep_size, cfg.parallel.zero_stage
    if engine == "torch" and ep > 1:
        raise ConfigError(
            f"parallel.ep_size: {ep} splits experts over ranks, which needs a distributed "
            "launch (deepspeed / torchrun / Ray); a plain process has one"
        )
    if engine == "torch" and stage > 0:
        raise ConfigError(
            f"parallel.zero_stage: {stage} needs the DeepSpeed engine "
            "(parallel.engine=deepspeed or a distributed launcher)"
        )
    if world_size % ep:
        raise ConfigError(
            f"parallel.ep_size: {ep} does not divide the world size {world_size}: "
            "every expert-parallel group needs ep_size ranks"
        )
    if ep > 1 and stage == 3:
        raise ConfigError(
            f"parallel.ep_size: {ep} with parallel.zero_stage 3 is not supported: ZeRO-3 "
            "would shard each rank's own experts over ranks that do not hold them; use "
            "zero_stage 1 or 2 with expert parallelism, or ep_size 1 with ZeRO-3"
        )


def resolve_device(name: str) -> torch.device:
    """`auto` is the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"train.device: {name!r} is not a device ({err})") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name!r} requested but CUDA is not available")
    return device


def init_world(cfg: Config) -> World:
    """Resolve the engine, join the process group when there is one, make the EP groups."""
    engine = engine_kind(cfg)
    if engine == "torch":
        check_parallel(cfg, engine, 1)
        return World("torch", 0, 1, resolve_device(cfg.train.device))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "WORLD_SIZE" not in os.environ and not torch.distributed.is_initialized():
        # one DeepSpeed rank started as a plain process: no MPI discovery needed
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    import deepspeed
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    check_parallel(cfg, engine, world_size)
    if torch.cuda.is_available():
        device = cuda_device(int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    ep_group = None
    ep = cfg.parallel.ep_size
    if ep > 1:
        from deepspeed.utils import groups

        groups._create_expert_and_data_parallel(ep)
        ep_group = groups._get_expert_parallel_group(f"ep_size_{ep}")
    return World("deepspeed", rank, world_size, device, ep_group)


def cuda_device(local_rank: int, visible: int) -> torch.device:
    """This rank's GPU, refused when the local rank is past the GPUs it sees (ranks
    sharing a GPU: NCCL would fail later, and less clearly)."""
    if not 0 <= local_rank < visible:
        raise ConfigError(
            f"LOCAL_RANK {local_rank}: this process sees {visible} GPU(s); give each rank "
            "a GPU of its own (launch/train_moe.py: --gpus-per-worker 0 or at least 1)"
        )
    return torch.device("cuda", local_rank)


def leave_world(wait: bool = True) -> None:
    """End of a process that joined a process group: wait for every rank (unless it is
    failing), then destroy the group while Python is still alive. A gloo group left to
    interpreter shutdown can abort a rank that finished cleanly ("terminate called without
    an active exception": its worker threads still hold tensors at teardown)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        import deepspeed.comm  # joined through it (init_world): it drops its cached groups too

        if wait:
            dist.barrier()
        deepspeed.comm.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_rank0(world: World, action: Callable[[], T]) -> T | None:
    """Run `action` on rank 0 alone; what it raises is raised on every rank (the others
    would otherwise wait for rank 0 in their next collective forever)."""
    result, failure = None, None
    if world.rank == 0:
        try:
            result = action()
        except Exception as err:  # any failure: the other ranks must not wait for rank 0
            failure = err
    if world.world_size > 1:
        import torch.distributed as dist

        box = [None if failure is None else (type(failure), str(failure))]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None and failure is None:
            kind, message = box[0]
            failure = (
                kind(message)
                if issubclass(kind, LeviathanError)
                else RuntimeError(f"rank 0: {kind.__name__}: {message}")
            )
    if failure is not None:
        raise failure
    return result
