"""Peak resident memory of building and stepping a model, whole or built sharded (ZeRO-3).

    python -m benchmarks.zero3_memory --config C --out DIR parallel.engine=torch train.grad_accum=2
    deepspeed --num_gpus 2 benchmarks/zero3_memory.py --config C --out DIR parallel.zero_stage=3

Every rank builds the model the way the training loop does (`lay_out`: under ZeRO-3
inside `deepspeed.zero.Init`), takes `--steps` steps of the loop's batches with the
loop's engine, and writes DIR/rank<R>.json: its peak resident set (VmHWM of
/proc/self/status) after the build and after the steps, and the losses. No data
preparation, evaluation or checkpoint inflates the figures: only build and steps.

Launchers (and tests/test_distributed.py) start it by its path, so it imports nothing from
``benchmarks`` (the path puts this folder, not the repository root, first on sys.path): it
needs the installed ``leviathan`` only.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
from pathlib import Path

import torch

from leviathan.config import load_config
from leviathan.data import get_batch, load_tokens, prepare
from leviathan.parallel.engines import ENGINES
from leviathan.parallel.layout import lay_out
from leviathan.parallel.world import init_world, leave_world
from leviathan.train.checkpoint import quiet
from leviathan.train.schedule import lr_at
from leviathan.train.trainer import model_config_for

M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def return_large_frees() -> None:
    """Serve every allocation over 128 KiB by mmap, so freeing it returns it to the OS: by
    default glibc raises that threshold as big blocks are freed and then keeps them in
    its heap, and the figures would show what the heap retains, not what the run uses."""
    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 128 * 1024)


def peak_rss_mib() -> float:
    """This process's high-water resident set so far (VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # set by `deepspeed`
    args, overrides = parser.parse_known_args(argv)
    return_large_frees()
    cfg = load_config(Path(args.config), overrides)
    t = cfg.train
    torch.set_num_threads(t.threads or 1)
    world = init_world(cfg)
    index = prepare(cfg.data, log=quiet)
    model_cfg = model_config_for(cfg, index)
    torch.manual_seed(t.seed)
    before = peak_rss_mib()
    laid = lay_out(cfg, model_cfg, world)
    model = laid.model
    built = peak_rss_mib()
    engine = ENGINES[world.engine](model, cfg, world)
    tokens = load_tokens(index.dir, "train")
    global_batch = t.micro_batch_size * t.grad_accum * world.world_size
    losses = []
    for step in range(args.steps):
        rank, ranks = world.rank, world.world_size
        x, y = get_batch(tokens, t.seq_len, global_batch, t.seed, step, rank, ranks)
        micro = list(zip(x.split(t.micro_batch_size), y.split(t.micro_batch_size), strict=True))
        lr = lr_at(step, t.lr, t.min_lr, t.warmup_steps, t.max_steps)
        losses.append(engine.train_step(micro, lr).loss)
    record = {
        "rank": world.rank,
        "world_size": world.world_size,
        "engine": world.engine,
        "params": laid.whole.num_params(),
        "rss_start_mib": before,
        "peak_build_mib": built,
        "peak_mib": peak_rss_mib(),
        "losses": losses,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{world.rank}.json").write_text(json.dumps(record, indent=1))
    if world.engine == "deepspeed":
        leave_world()


if __name__ == "__main__":
    main(sys.argv[1:])
