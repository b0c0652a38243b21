"""One training step (forward + backward + AdamW) of the tiny model, eager and compiled.

    python -m benchmarks.train_step --threads 1 --out benchmarks/results/train_step.json

For each config (default: tiny.yaml, token_xcorr, and tiny-dot.yaml) the model is built
twice from the same seed, once eager and once with `apply_compile` (what
`train.compile: true` does), and both train on the same random tokens at the config's
seq_len and micro-batch, side by side in this process. Reported: the time of the first
compiled step (compilation; seconds when inductor's on-disk cache is warm, 30-40 s
cold), then the median of `--steps` steps after `--warmup`
warm-up steps, compiled / eager, and the compiled step's TFLOP/s and MFU (against the
device's peak at `--precision`; none on a CPU). This table is the measurement behind
`train.compile: auto` (leviathan/parallel/torch_compile.py). On a GPU (benchmarks/gpu_check.sh):

    python -m benchmarks.train_step --device cuda --precision bf16 --configs small.yaml
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.harness import CONFIGS, Col, Table, write_json
from leviathan.config import load_config
from leviathan.model import Leviathan
from leviathan.parallel.optim import build_adamw
from leviathan.parallel.precision import autocast
from leviathan.parallel.torch_compile import apply_compile
from leviathan.train import mfu


class Run:
    """One model and optimizer training on fixed random tokens, timed per step."""

    def __init__(self, config: str, compiled: bool, device: str, precision: str):
        cfg = load_config(CONFIGS / config)
        vocab = cfg.model.vocab_size or cfg.data.tokenizer.vocab_size
        self.cfg = replace(cfg.model, vocab_size=vocab)
        self.B, self.T, self.device = cfg.train.micro_batch_size, cfg.train.seq_len, device
        self.precision = precision
        torch.manual_seed(0)
        self.model = Leviathan(self.cfg).to(device).train()
        if compiled:
            apply_compile(self.model, self.T)
        self.opt = build_adamw(self.model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
        gen = torch.Generator().manual_seed(0)
        self.idx = torch.randint(0, vocab, (self.B, self.T + 1), generator=gen).to(device)
        self.times: list[float] = []

    def step(self) -> None:
        tick = time.perf_counter()
        with autocast(torch.device(self.device), self.precision):
            _, loss = self.model(self.idx[:, :-1], self.idx[:, 1:])
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - tick)


def measure(config: str, device: str, precision: str, warmup: int, steps: int) -> dict:
    """Eager and compiled steps alternated, so load from elsewhere hits both alike."""
    eager, fast = Run(config, False, device, precision), Run(config, True, device, precision)
    for _ in range(warmup + steps):
        eager.step()
        fast.step()
    eager_ms = 1e3 * statistics.median(eager.times[warmup:])
    compiled_ms = 1e3 * statistics.median(fast.times[warmup:])
    tokens_per_s = eager.B * eager.T / (compiled_ms / 1e3)
    flops = mfu.throughput(
        tokens_per_s,
        fast.model.flops_per_token(fast.T),
        mfu.peak_flops(device, precision),
    )
    return {
        "config": config,
        "mixer": eager.cfg.mixer.kind,
        "batch": eager.B,
        "seq_len": eager.T,
        "eager_ms": round(eager_ms, 1),
        "compiled_ms": round(compiled_ms, 1),
        "compiled_over_eager": round(compiled_ms / eager_ms, 3),
        "first_compiled_step_s": round(fast.times[0], 1),
        "compiled_tokens_per_s": round(tokens_per_s),
        "compiled_tflops": round(flops["flops_per_s"] / 1e12, 3),
        "compiled_mfu": round(flops["mfu"], 4) if "mfu" in flops else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=["tiny.yaml", "tiny-dot.yaml"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    table = Table(
        Col("config", "<20"),
        Col("mixer", "<13"),
        Col("eager ms", ">10.1f"),
        Col("compiled ms", ">13.1f"),
        Col("ratio", ">7.3f"),
        Col("compile s", ">11.1f"),
        Col("TFLOP/s", ">9.3f"),
        Col("MFU", ">7"),
        sep="",
    )
    print(table.header())
    for config in args.configs:
        row = measure(config, args.device, args.precision, args.warmup, args.steps)
        mfu_text = "-" if row["compiled_mfu"] is None else f"{100 * row['compiled_mfu']:.1f}%"
        rows.append(row)
        keys = ("mixer", "eager_ms", "compiled_ms", "compiled_over_eager")
        keys += ("first_compiled_step_s", "compiled_tflops")
        print(table.row(config, *(row[k] for k in keys), mfu_text))
    if args.out:
        meta = {
            "torch": torch.__version__,
            "device": args.device,
            "device_name": mfu.device_name(args.device),
            "precision": args.precision,
            "mfu": "of the compiled step: 3 x forward FLOPs/token x tokens/s over the device's "
            "peak at this precision (leviathan/train/mfu.py)",
            "threads": args.threads,
            "cpu": platform.processor() or platform.machine(),
            "warmup": args.warmup,
            "steps": args.steps,
            "statistic": "median step time after warm-up",
            "first_compiled_step_s": "includes compilation, from inductor's on-disk cache "
            "when warm (seconds); cold, 30-40 s per model on this CPU",
        }
        write_json(args.out, {"meta": meta, "rows": rows}, indent=1)


if __name__ == "__main__":
    main()
