"""`leviathan train` tokens/s against a bare PyTorch loop training the same model.

    python -m benchmarks.trainer_overhead --configs tiny.yaml tiny-moe.yaml --repeats 5 \
        --out benchmarks/results/trainer_overhead.json      # or: make bench-trainer-overhead

Two sides, each run in a fresh process, alternated A B A B (trainer, bare, trainer, ...)
for `--repeats` rounds per config:

- trainer: the real CLI, ``leviathan train --config C run.dir=<tmp> train.max_steps=N
  train.threads=1 train.compile=false run.wandb=disabled run.sample_tokens=1``, as a user
  starts it with output to a log (stderr is not a terminal: progress as plain lines every
  `train.log_interval` steps). Its tokens/s is read from the run's metrics.jsonl:
  ``elapsed_s`` is stamped once per step, so the difference of two stamps is the whole
  loop between them (batch, engine step, the metrics record, metrics.jsonl, progress),
  not only the engine step that each record's ``tokens_per_s`` times.
- bare: the same model (``leviathan.model.Leviathan`` from the same config and seed),
  AdamW with the same param groups (``leviathan.parallel.optim.build_adamw``), the same
  LR schedule, the balance loss added (MoE), ``clip_grad_norm_`` at ``train.grad_clip``,
  on the same batches (``leviathan.data.get_batch`` at the same seed and steps), eager,
  one thread; ``loss.item()`` and a time stamp after each step. Its losses are compared
  with the trainer's (``same_losses``: bit for bit).

Evaluation and checkpoints: the config's own intervals are kept (200 for tiny and
tiny-moe), as a user has them, but they are work the bare loop does not do, not
overhead: the timed window is steps `--warmup`+1 .. N, whose stamps all come before
the final step's evaluation and checkpoint, and a step that follows an in-loop
evaluation or checkpoint (N > the interval) is left out on both sides. W&B is disabled
(it is a service a user opts into; `auto` means offline logging when no API key is set)
and the final sample is one token (after the window in any case).

Per run: tokens/s = tokens per step x steps in the window / their wall time. The ratio
trainer/bare is paired: the median over rounds of the two sides' figures in the same
round, with the range. Goal: >= 0.97.

``--clock cpu`` times both sides in CPU time instead (``time.process_time``: the trainer's
CLI then runs in-process under ``python -m benchmarks.trainer_overhead --cli-cpu-clock``
with ``time.perf_counter`` replaced, so its elapsed_s stamps are CPU seconds): on a
shared machine, time spent waiting for a core then counts on neither side. It leaves out
time blocked in I/O (none per step here: metrics.jsonl is flushed, not synced).

``--malloc steady`` runs both sides with glibc's mmap off and heap trimming out of reach
(``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=16 GiB``). By default glibc maps tensors
over its mmap threshold (32 MiB at most: tiny's logits) and trims the heap as
activations are freed, so every step faults in again what the last returned (tiny:
15k-47k minor faults, 27-73 ms of system time per step, 4-10%), and how much differs
from process to process with the heap's history. Steady, neither side faults after the
first steps and the ratio shows the loop alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from benchmarks.harness import (
    CONFIGS,
    RESULTS,
    Col,
    LoadMeter,
    Table,
    emit,
    in_fresh_process,
    paired_ratio,
    run_command,
    write_json,
)

GOAL = 0.97
SIDES = ("trainer", "bare")
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CPU_CLOCK_CLI = "--cli-cpu-clock"  # argv[1]: run `leviathan ARGS` here with the CPU clock
MALLOC = {
    "default": {},
    "steady": {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(16 * 2**30)},
}


def environment(malloc: str) -> dict[str, str]:
    return dict(os.environ, **MALLOC[malloc])


def overrides(steps: int, threads: int) -> list[str]:
    """The settings both sides share, as `leviathan train` KEY=VALUE overrides."""
    return [
        f"train.max_steps={steps}",
        f"train.threads={threads}",
        "train.compile=false",
        "run.wandb=disabled",
        "run.sample_tokens=1",
    ]


# --- the two sides ---------------------------------------------------------------------


def run_trainer(config: str, steps: int, threads: int, work: Path, clock: str, malloc: str) -> dict:
    """`leviathan train` in a fresh process; its metrics records."""
    run_dir = Path(tempfile.mkdtemp(prefix="trainer-", dir=work))
    shutil.rmtree(run_dir)  # a fresh run.dir must not exist yet (or be empty)
    if clock == "wall":
        cli = [Path(sys.executable).parent / "leviathan"]
    else:
        cli = [sys.executable, "-m", __spec__.name, CPU_CLOCK_CLI]
    cmd = [*cli, "train", "--config", CONFIGS / config, f"run.dir={run_dir}"]
    try:
        run_command([*cmd, *overrides(steps, threads)], env=environment(malloc))
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    records = [json.loads(line) for line in lines]
    return {
        "elapsed_s": [r["elapsed_s"] for r in records],
        "losses": [r["train_loss"] for r in records],
    }


def run_bare(config: str, steps: int, threads: int, clock: str) -> dict:
    """The bare loop (see the top), in this process: a time stamp and a loss per step."""
    import torch

    from leviathan.config import load_config
    from leviathan.data import get_batch, load_tokens, prepare
    from leviathan.model import Leviathan
    from leviathan.parallel.optim import build_adamw
    from leviathan.train.schedule import lr_at

    cfg = load_config(CONFIGS / config, overrides(steps, threads))
    t = cfg.train
    torch.set_num_threads(t.threads)
    index = prepare(cfg.data, log=lambda _msg: None)
    tokens = load_tokens(index.dir, "train")
    torch.manual_seed(t.seed)
    model = Leviathan(replace(cfg.model, vocab_size=index.vocab_size)).train()
    opt = build_adamw(model, lr=0.0, weight_decay=t.weight_decay, betas=(t.beta1, t.beta2))
    params = list(model.parameters())
    batch = t.micro_batch_size * t.grad_accum
    elapsed, losses = [], []
    now = CLOCKS[clock]
    started = now()
    for step in range(t.max_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, t.lr, t.min_lr, t.warmup_steps, t.max_steps)
        x, y = get_batch(tokens, t.seq_len, batch, t.seed, step)
        _, loss = model(x, y)
        (loss + model.aux_loss()).backward()
        torch.nn.utils.clip_grad_norm_(params, t.grad_clip if t.grad_clip > 0 else float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.after_optimizer_step()
        losses.append(loss.item())
        elapsed.append(now() - started)
    return {"elapsed_s": elapsed, "losses": losses}


def window(config: str, steps: int, warmup: int) -> list[int]:
    """The steps (1-based) whose time counts: after the warm-up, and not right after an
    in-loop evaluation or checkpoint."""
    from leviathan.config import load_config

    t = load_config(CONFIGS / config).train
    busy = {s for s in range(1, steps) if s % t.eval_interval == 0 or s % t.ckpt_interval == 0}
    return [s for s in range(warmup + 1, steps + 1) if s - 1 not in busy]


def tokens_per_s(run: dict, steps: list[int], tokens_per_step: int) -> float:
    """Tokens per second over `steps`, from the per-step stamps (index s-1: step s)."""
    stamps = run["elapsed_s"]
    seconds = sum(stamps[s - 1] - stamps[s - 2] for s in steps)
    return tokens_per_step * len(steps) / seconds


# --- driver ----------------------------------------------------------------------------


def measure(config: str, args, log) -> dict:
    from leviathan.config import load_config

    t = load_config(CONFIGS / config).train
    tokens_per_step = t.micro_batch_size * t.grad_accum * t.seq_len
    counted = window(config, args.steps, args.warmup)
    figures: dict[str, list[float]] = {side: [] for side in SIDES}
    same_losses, max_diff = True, 0.0
    for r in range(args.repeats):
        runs = {}
        for side in SIDES:  # A B A B: the two sides of a round back to back
            if side == "trainer":
                runs[side] = run_trainer(
                    config, args.steps, args.threads, args.work, args.clock, args.malloc
                )
            else:
                flags = ["--bare", config, "--steps", args.steps, "--threads", args.threads]
                flags += ["--clock", args.clock]
                runs[side] = in_fresh_process(__spec__.name, *flags, env=environment(args.malloc))
            figures[side].append(tokens_per_s(runs[side], counted, tokens_per_step))
        pairs = zip(runs["trainer"]["losses"], runs["bare"]["losses"], strict=True)
        diffs = [abs(a - b) for a, b in pairs]
        same_losses &= not any(diffs)
        max_diff = max(max_diff, *diffs)
        log(
            f"  {config} round {r + 1}: trainer {figures['trainer'][-1]:,.0f} tok/s, "
            f"bare {figures['bare'][-1]:,.0f} tok/s"
        )
    ratio = paired_ratio(figures["trainer"], figures["bare"])
    return {
        "config": config,
        "tokens_per_step": tokens_per_step,
        "steps_timed": len(counted),
        "trainer_tokens_per_s": round(statistics.median(figures["trainer"]), 1),
        "bare_tokens_per_s": round(statistics.median(figures["bare"]), 1),
        "trainer_over_bare": ratio["median"],
        "trainer_over_bare_range": ratio["range"],
        "trainer_over_bare_of_medians": ratio["of_medians"],
        "goal_met": ratio["median"] >= GOAL,
        "same_losses": same_losses,
        "max_loss_diff": max_diff,
        "tokens_per_s_all": {side: [round(v, 1) for v in figures[side]] for side in SIDES},
    }


TABLE = Table(
    Col("config", "<14"),
    Col("trainer tok/s", ">14,.0f"),
    Col("bare tok/s", ">11,.0f"),
    Col("trainer/bare", ">13.3f"),
    Col("(range)", ">13"),
    Col(f"goal >={GOAL}", ">10"),
    Col("same losses", ">12"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; ``--bare CONFIG`` (hidden) makes this process one bare run, whose
    caller passes no ``--warmup``, so the warm-up is checked only for a driver."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--configs", nargs="+", default=["tiny.yaml", "tiny-moe.yaml"])
    ap.add_argument("--repeats", type=int, default=5, help="rounds (one run of each side)")
    ap.add_argument("--steps", type=int, default=60, help="training steps per run")
    ap.add_argument("--warmup", type=int, default=10, help="first steps left out of the time")
    ap.add_argument("--threads", type=int, default=1, help="train.threads of both sides")
    ap.add_argument(
        "--clock", choices=list(CLOCKS), default="wall", help="wall time, or CPU time (see top)"
    )
    ap.add_argument(
        "--malloc", choices=list(MALLOC), default="default", help="glibc malloc of both sides"
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "trainer_overhead.json")
    ap.add_argument("--work", type=Path, help="folder for the runs (default: a temporary one)")
    ap.add_argument("--bare", metavar="CONFIG", help=argparse.SUPPRESS)  # a worker: one run
    args = ap.parse_args(argv)
    if not args.bare and not 1 <= args.warmup < args.steps - 1:
        ap.error(f"--warmup: expected 1 .. steps - 2, got {args.warmup} with {args.steps} steps")
    return args


def log(msg: str) -> None:
    """Progress on stderr, so stdout keeps only the table and its summary."""
    print(msg, file=sys.stderr, flush=True)


def measure_all(args: argparse.Namespace) -> tuple[list[dict], dict]:
    """Every config's rounds, and the machine's load over them (with the wall time); the
    runs' folder is removed afterwards unless the user named it with ``--work``."""
    own_work = args.work is None
    args.work = Path(args.work or tempfile.mkdtemp(prefix="trainer-overhead-"))
    args.work.mkdir(parents=True, exist_ok=True)
    meter, started = LoadMeter(), time.perf_counter()
    try:
        results = [measure(config, args, log) for config in args.configs]
    finally:
        if own_work:
            shutil.rmtree(args.work, ignore_errors=True)
    return results, meter.report() | {"wall_s": round(time.perf_counter() - started, 1)}


def print_table(results: list[dict]) -> None:
    """One line per config: the two sides' tokens/s, the paired ratio and the checks."""
    print(TABLE.header())
    for res in results:
        print(
            TABLE.row(
                res["config"],
                res["trainer_tokens_per_s"],
                res["bare_tokens_per_s"],
                res["trainer_over_bare"],
                "{:.3f}-{:.3f}".format(*res["trainer_over_bare_range"]),
                "yes" if res["goal_met"] else "NO",
                "yes" if res["same_losses"] else f"NO ({res['max_loss_diff']:.2g})",
            )
        )


def print_summary(args: argparse.Namespace, load: dict) -> None:
    """The line under the table: how it was run, and how busy the machine was meanwhile
    (the figures mean less when other processes took cores)."""
    print(
        f"\n{args.repeats} rounds, {args.steps} steps per run, steps {args.warmup + 1}.. timed "
        f"({args.clock} clock, {args.malloc} malloc); "
        f"other processes used {load['other_processes_cores']} cores on average "
        f"({load['wall_s']} s)"
    )


def build_report(args: argparse.Namespace, load: dict, results: list[dict]) -> dict:
    """The JSON written: the results with the settings, versions and load that produced
    them, so the file can be read without this source."""
    import torch

    return {
        "benchmark": "leviathan train tokens/s against a bare PyTorch loop, same model and batches",
        "goal": {"trainer_over_bare_at_least": GOAL},
        "settings": {
            "repeats": args.repeats,
            "steps": args.steps,
            "warmup": args.warmup,
            "threads": args.threads,
            "clock": args.clock,
            "malloc": MALLOC[args.malloc] or "glibc's defaults",
            "order": "trainer, bare, trainer, bare, ...; each run a fresh process",
            "trainer": "leviathan train --config C run.dir=<tmp> "
            + " ".join(overrides(args.steps, args.threads)),
            "tokens_per_s": "tokens per step x steps timed / the wall time between the "
            "per-step stamps (metrics.jsonl elapsed_s; the bare loop's own); steps after "
            "--warmup, none right after an in-loop evaluation or checkpoint",
            "ratio": "trainer/bare paired by round: median and range over rounds",
        },
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "machine": load,
        "results": results,
    }


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark (or, with ``--bare``, one bare run), print the table, write the
    JSON; returns the report (empty for a bare run, whose answer goes to its caller)."""
    args = parse_args(argv)
    if args.bare:
        emit(run_bare(args.bare, args.steps, args.threads, args.clock))
        return {}
    results, load = measure_all(args)
    print_table(results)
    print_summary(args, load)
    report = build_report(args, load, results)
    write_json(args.out, report)
    return report


def cli_with_cpu_clock(argv: list[str]) -> int:
    """`leviathan ARGV` in this process, every perf_counter reading CPU time instead."""
    time.perf_counter = time.process_time
    from leviathan.cli import main as leviathan_main

    return leviathan_main(argv)


if __name__ == "__main__":
    if sys.argv[1:2] == [CPU_CLOCK_CLI]:
        sys.exit(cli_with_cpu_clock(sys.argv[2:]))
    main()
