"""Memory kept for backward with and without `train.activation_checkpointing`.

    python -m benchmarks.activation_checkpointing --threads 1 \
        --configs tiny.yaml tiny-moe.yaml small.yaml:2 \
        --out benchmarks/results/activation_checkpointing.json

One training forward + backward (fp32, train mode) of each config's model at its
sequence length and micro-batch (`small.yaml:2`: micro-batch 2), random weights and
tokens, on CPU or `--device cuda`. Each case runs in a fresh process, so peaks do not mix:

- `saved_mib`: the tensors autograd keeps for backward at the end of the forward (unique
  storages, parameters left out; counted with saved-tensor hooks, the block inputs a
  checkpoint keeps added);
- `held_mib`: resident memory (CPU: RSS; CUDA: allocated) the forward added, i.e. what
  the graph holds when backward starts;
- `peak_mib`: the peak over forward + backward above the memory before the forward
  (CPU: ru_maxrss; CUDA: max_memory_allocated), after a warm-up step of one
  sequence that set up the kernels and the gradient tensors;
- `step_s`: the wall time of that forward + backward (one step, no repeats: indicative).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.harness import CONFIGS, emit, in_fresh_process, returning_frees, write_json
from leviathan.config import load_config
from leviathan.model import Leviathan
from leviathan.parallel.activation_checkpointing import apply_activation_checkpointing

MIB = 2**20
# glibc: every allocation over 128 KiB its own mapping, returned when freed, so RSS follows
# the live tensors (by default freed memory stays in the heap and RSS only grows)
MMAP_THRESHOLD = 128 * 1024


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(config: str, batch: int | None, checkpointed: bool, device: str) -> dict:
    cfg = load_config(CONFIGS / config)
    model_cfg = replace(cfg.model, vocab_size=cfg.model.vocab_size or cfg.data.tokenizer.vocab_size)
    B, T = batch or cfg.train.micro_batch_size, cfg.train.seq_len
    torch.manual_seed(0)
    model = Leviathan(model_cfg).to(device).train()
    if checkpointed:
        apply_activation_checkpointing(model)
    idx = torch.randint(0, model_cfg.vocab_size, (B, T + 1), device=device)
    x, y = idx[:, :-1], idx[:, 1:]
    model(x[:1], y[:1])[1].backward()  # one-time costs (kernel set-up) off the measurement
    model.zero_grad(set_to_none=False)  # the gradients exist before, as in training
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(t: torch.Tensor) -> None:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()

    def pack(t: torch.Tensor) -> torch.Tensor:
        keep(t)
        return t

    for block in model.blocks:
        block.register_forward_pre_hook(lambda _m, args: keep(args[0]))
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = rss()
    started = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(x, y)
    held = (torch.cuda.memory_allocated() if device == "cuda" else rss()) - before
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {
        "config": config,
        "batch": B,
        "seq_len": T,
        "params": model.num_params(),
        "checkpointed": checkpointed,
        "saved_mib": round(sum(saved.values()) / MIB, 1),
        "held_mib": round(held / MIB, 1),
        "peak_mib": round(peak / MIB, 1),
        "step_s": round(time.perf_counter() - started, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--configs", nargs="+", default=["tiny.yaml", "tiny-moe.yaml"], help="NAME[:BATCH]"
    )
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--one", nargs=2, metavar=("CONFIG", "CKPT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:  # a child: one case, printed as JSON
        config, ckpt = args.one
        emit(measure(config, args.batch, ckpt == "1", args.device))
        return
    rows = []
    for entry in args.configs:
        config, _, batch = entry.partition(":")
        for ckpt in ("0", "1"):
            flags = ["--one", config, ckpt, "--device", args.device, "--threads", args.threads]
            if batch:
                flags += ["--batch", batch]
            env = returning_frees(MMAP_THRESHOLD)
            rows.append(in_fresh_process(__spec__.name, *flags, env=env))
            print(json.dumps(rows[-1]), flush=True)
    result = {
        "torch": torch.__version__,
        "machine": platform.machine(),
        "device": args.device,
        "threads": args.threads,
        "rows": rows,
    }
    if args.out:
        write_json(args.out, result, indent=1)


if __name__ == "__main__":
    main()
