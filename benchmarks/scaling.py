"""Training throughput of one process against two, at ZeRO 0, 2 and 3, through the real
launchers: the same numbers a user sees in metrics.jsonl.

    python -m benchmarks.scaling --steps 30 --out benchmarks/results/scaling.json

For each model (configs/tiny.yaml dense, configs/tiny-moe.yaml) it trains `--steps` steps
with the same global batch (micro-batch x ranks constant) under each setting:

- ``torch 1p``      ``python launch/train.py`` : the plain engine, one process, all cores;
- ``ds 1p z0``      the same under DeepSpeed (one rank, ZeRO-0): the engine's own cost;
- ``ds 2p zN``      ``deepspeed --num_gpus 2 launch/train.py``, ZeRO-0/2/3, cores split.

On a CUDA machine the settings are single-GPU instead (torch, DeepSpeed ZeRO-0/2/3 on one
rank, bf16). Tokens/s: the median over the steps after `--warmup` of the loop's own
per-step figure (global tokens / step wall time); step time likewise. Ratios are against
``torch 1p`` of the same model, measured in the same invocation.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.harness import (
    RESULTS,
    ROOT,
    Col,
    LoadMeter,
    Table,
    WorkerFailed,
    free_port,
    run_command,
    write_json,
)

MODELS = {"dense": "configs/tiny.yaml", "moe": "configs/tiny-moe.yaml"}


def settings(on_gpu: bool, cores: int) -> list[dict]:
    if on_gpu:
        single = {"ranks": 1, "threads": cores, "precision": "bf16"}
        return [
            {"name": "torch 1gpu", "engine": "torch", "zero": 0, **single},
            *(
                {"name": f"ds 1gpu z{z}", "engine": "deepspeed", "zero": z, **single}
                for z in (0, 2, 3)
            ),
        ]
    half = max(1, cores // 2)
    return [
        {"name": "torch 1p", "engine": "torch", "zero": 0, "ranks": 1, "threads": cores},
        {"name": "ds 1p z0", "engine": "deepspeed", "zero": 0, "ranks": 1, "threads": cores},
        *(
            {"name": f"ds 2p z{z}", "engine": "deepspeed", "zero": z, "ranks": 2, "threads": half}
            for z in (0, 2, 3)
        ),
    ]


def run(model: str, setting: dict, steps: int, global_micro: int, out: Path) -> list[dict]:
    """Train `steps` steps under `setting`; return the metrics records."""
    run_dir = out / f"{model}-{setting['name'].replace(' ', '-')}"
    shutil.rmtree(run_dir, ignore_errors=True)
    ranks = setting["ranks"]
    overrides = [
        f"run.dir={run_dir}",
        f"train.max_steps={steps}",
        f"train.micro_batch_size={global_micro // ranks}",
        f"train.threads={setting['threads']}",
        f"train.eval_interval={steps}",
        "train.eval_tokens=4096",
        f"train.ckpt_interval={steps}",
        f"parallel.engine={setting['engine']}",
        f"parallel.zero_stage={setting['zero']}",
        "run.wandb=disabled",
        "run.sample_tokens=1",
    ]
    if "precision" in setting:
        overrides.append(f"train.precision={setting['precision']}")
    script = [str(ROOT / "launch/train.py"), "--config", str(ROOT / MODELS[model]), *overrides]
    if ranks == 1:
        cmd = [sys.executable, *script]
    else:
        launcher = Path(sys.executable).parent / "deepspeed"
        port = str(free_port())
        cmd = [str(launcher), "--num_gpus", str(ranks), "--master_port", port, *script]
    env = dict(os.environ, OMP_NUM_THREADS=str(setting["threads"]), DS_ACCELERATOR="cpu")
    if torch.cuda.is_available():
        env.pop("DS_ACCELERATOR")
    try:
        run_command(cmd, env=env)
    except WorkerFailed as failed:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{failed.output[-4000:]}") from None
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the median")
    parser.add_argument("--global-micro", type=int, default=32, help="rows per step, all ranks")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--out", type=Path, default=RESULTS / "scaling.json")
    parser.add_argument("--work", type=Path, default=ROOT / "runs/bench-scaling")
    args = parser.parse_args()
    on_gpu = torch.cuda.is_available()
    cores = os.cpu_count() or 1
    device = torch.cuda.get_device_name(0) if on_gpu else f"{platform.processor() or 'cpu'}"
    rows = []
    table = Table(
        Col("model", "<6"),
        Col("setting", "<11"),
        Col("ranks", ">5"),
        Col("tok/s", ">9.0f"),
        Col("step ms", ">8.1f"),
        Col("x torch 1p", ">10.2f"),
    )
    print(f"device: {device}, {cores} cores; steps {args.steps} (median after {args.warmup})")
    print(table.header(), flush=True)
    meter = LoadMeter()
    started = time.time()
    for model in args.models:
        baseline = None
        for setting in settings(on_gpu, cores):
            records = run(model, setting, args.steps, args.global_micro, args.work)
            timed = records[args.warmup :]
            tok_s = statistics.median(r["tokens_per_s"] for r in timed)
            step_ms = statistics.median(
                1000 * (b["elapsed_s"] - a["elapsed_s"]) for a, b in itertools.pairwise(timed)
            )
            baseline = baseline or tok_s
            row = {
                "model": model,
                **setting,
                "tokens_per_s": tok_s,
                "step_ms": step_ms,
                "ratio_vs_first": tok_s / baseline,
                "per_step_tokens_per_s": [r["tokens_per_s"] for r in records],
                "final_train_loss": records[-1]["train_loss"],
            }
            rows.append(row)
            cells = (
                model,
                setting["name"],
                setting["ranks"],
                tok_s,
                step_ms,
                row["ratio_vs_first"],
            )
            print(table.row(*cells), flush=True)
    load = meter.report()
    meta = {
        "device": device,
        "cores": cores,
        "steps": args.steps,
        "warmup": args.warmup,
        "global_micro_batch": args.global_micro,
        "torch": torch.__version__,
        "load_avg_before": load["loadavg_before"],
        "load_avg_after": load["loadavg_after"],
        "other_processes_cores": load["other_processes_cores"],
        "wall_s": time.time() - started,
    }
    write_json(args.out, {"settings": meta, "results": rows})


if __name__ == "__main__":
    main()
