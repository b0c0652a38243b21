"""Run every config x seed on one dataset under one budget; collect what the runs left.

The rules (one dataset, one budget, reuse, resume, failures) are in `plan`.
"""

from __future__ import annotations

import copy
import json
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from leviathan.compare.plan import (
    MARKER,
    MARKER_IGNORES,
    Budget,
    RunSpec,
    parse_budget,
    plan,
    run_state,
)
from leviathan.compare.results import (
    Comparison,
    ConfigResult,
    RunResult,
    collect,
    cumulative_times,
    read_records,
)
from leviathan.config import Config, resume_config
from leviathan.data import prepare
from leviathan.data.shards import HELDOUT
from leviathan.errors import Interrupted, RunDirError
from leviathan.model import FFNS, MIXERS
from leviathan.sizing import model_size
from leviathan.train.checkpoint import latest_checkpoint
from leviathan.train.run_folder import METRICS_FILE, RunLock

ERROR_FILE = "error.txt"


def execute(
    spec: RunSpec, budget: Budget, log: Callable[[str], None], *, report_only: bool = False
) -> RunResult:
    """Train (or resume, or reuse) one run; an exception makes a failed result, its
    message and traceback kept in `error.txt` until the run is tried again. A run another
    process is training (it holds the folder's lock) is left to it, untouched, and
    reported pending. With `report_only` an unfinished run is reported as it stands:
    failed (with its error) or pending."""
    state = run_state(spec, budget)
    if state == "done":
        log(f"{spec.name}: finished earlier, reused")
        return collect(spec, "reused")
    error_file = spec.dir / ERROR_FILE
    if report_only:
        if error_file.is_file():
            message = error_file.read_text(encoding="utf-8").partition("\n")[0]
            log(f"{spec.name}: FAILED earlier: {message}")
            return collect(spec, "failed", message)
        log(f"{spec.name}: not finished, pending")
        return collect(spec, "pending")
    try:
        lock = RunLock(spec.dir)  # before anything in the folder is touched
    except RunDirError as busy:
        log(f"{spec.name}: pending, left to the process training it ({busy})")
        return collect(spec, "pending")
    try:
        error_file.unlink(missing_ok=True)  # this try's error, if any, replaces it
        (spec.dir / MARKER).write_text(json.dumps(spec.marker(budget), indent=1), "utf-8")
        train_run(spec, budget, state, log)
    except Interrupted:  # Ctrl-C stops the comparison (the run has its checkpoint)
        raise
    except Exception as err:  # a failed run is reported; the others go on
        message = f"{type(err).__name__}: {err}"
        error_file.write_text(f"{message}\n\n{traceback.format_exc()}", encoding="utf-8")
        log(f"{spec.name}: FAILED: {message}")
        return collect(spec, "failed", message)
    finally:
        lock.release()
    return collect(spec, "resumed" if state == "resume" else "trained")


def train_run(spec: RunSpec, budget: Budget, state: str, log: Callable[[str], None]) -> None:
    """Resume the run from its latest checkpoint (a `minutes` run with the time it has
    left), or train it from the start; the caller holds the folder's lock."""
    from leviathan.train.trainer import train

    if state == "resume":
        step = int(latest_checkpoint(spec.dir / "checkpoints").name.removeprefix("step_"))
        left = None
        if budget.seconds is not None:
            used = cumulative_times([r for r in read_records(spec.dir) if r["step"] <= step])
            left = budget.seconds - (used[-1] if used else 0.0)
        log(f"{spec.name}: resuming from step {step}")
        time_up = left is not None and left <= 0  # then it only finishes at its step
        stop = {"stop_at": step} if time_up else {"stop_after_s": left}
        train(resumed_config(spec), resume=True, claimed=True, log=log, **stop)
        return
    log(f"{spec.name}: training ({budget})")
    # this comparison's own run, cut short before its first checkpoint: start over
    (spec.dir / METRICS_FILE).unlink(missing_ok=True)
    cfg = copy.deepcopy(spec.cfg)  # train() fills in model.vocab_size
    train(cfg, stop_after_s=budget.seconds, claimed=True, log=log)


def resumed_config(spec: RunSpec) -> Config:
    """An interrupted run's own config.yaml, as `leviathan train --resume` reads it
    (`resume_config`), with this comparison's values of the keys a rerun may change
    (MARKER_IGNORES: where the run logs, its threads); compare.json vouches for the rest."""
    overrides = [
        f"{section}.{key}={json.dumps(getattr(getattr(spec.cfg, section), key))}"
        for section, keys in MARKER_IGNORES.items()
        for key in keys
    ]
    return resume_config(spec.dir, overrides)


def compare(
    config_paths: list[str],
    *,
    budget: Budget | str,
    seeds: int | list[int] = 1,
    out: str | Path = "runs/compare",
    overrides: Sequence[str] = (),
    wandb: str = "disabled",
    report_only: bool = False,
    log: Callable[[str], None] = print,
) -> Comparison:
    """Train every config x seed under one budget on one dataset, then write
    `OUT/results.md`, `OUT/results.json` and the BPC plots. `seeds` is a count (seeds
    0..n-1) or a list. Returns the comparison; its `failed` lists the runs that raised.
    `report_only` trains nothing: the tables cover the runs that finished, the rest are
    pending (so processes that split one study can write its whole table)."""
    from leviathan.compare.report import write_report

    budget = parse_budget(budget) if isinstance(budget, str) else budget
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    out = Path(out)
    groups = plan(config_paths, seed_list, budget, out, overrides, wandb)
    for group in groups:  # refuse foreign folders before an hour of training, not after
        for spec in group:
            run_state(spec, budget)
    first = groups[0][0].cfg
    index = prepare(first.data, log=log)
    total = sum(len(g) for g in groups)
    results = []
    done = 0
    for group in groups:
        runs = []
        for spec in group:
            done += 1
            log(f"[{done}/{total}] {spec.name}")
            runs.append(execute(spec, budget, log, report_only=report_only))
        cfg = copy.deepcopy(group[0].cfg)
        if cfg.model.vocab_size is None:
            cfg.model.vocab_size = index.vocab_size
        try:
            size = model_size(cfg)
        except Exception:  # the runs' errors say why; the table shows no size
            size = None
        results.append(
            ConfigResult(
                group[0].label,
                group[0].config_path,
                MIXERS[cfg.model.mixer.kind].describe(cfg.model.mixer),
                FFNS[cfg.model.ffn.kind].describe(cfg.model.ffn),
                size,
                runs,
            )
        )
    data = {
        "dir": str(index.dir),
        "vocab_size": index.vocab_size,
        "train_tokens": index.splits["train"]["tokens"],
        "val_tokens": index.splits["val"]["tokens"],
        "val_characters": index.splits["val"]["characters"],
    }
    if HELDOUT in index.splits:
        data["heldout_tokens"] = index.splits[HELDOUT]["tokens"]
        data["heldout_characters"] = index.splits[HELDOUT]["characters"]
        data["heldout_documents"] = index.meta.get("heldout_documents", [])
    comparison = Comparison(out, budget, seed_list, data, results)
    write_report(comparison)
    return comparison
