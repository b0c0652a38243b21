"""The run folder: one training at a time, and never a fresh run over an old one.

A training holds an exclusive `flock` on `run.dir/.lock` from before it reads the folder
until it returns. The kernel drops the lock when the process dies, however it dies
(SIGKILL included), so a crashed run never leaves the folder locked. In a distributed
run rank 0 holds it for every rank; a Ray job's driver holds it for its workers, so a
worker group that Ray restarts is never locked out by its own job.
"""

from __future__ import annotations

import os
from pathlib import Path

from leviathan.data import DataIndex
from leviathan.errors import CheckpointError, ConfigError, RunDirError
from leviathan.train.checkpoint import LATEST, step_folders
from leviathan.train.checkpoint_state import check_same_tokenizer

LOCK_FILE = ".lock"
METRICS_FILE = "metrics.jsonl"


def usable_run_dir(run_dir: Path) -> Path:
    """Create `run_dir` (a folder, not a file) or name why it cannot be."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run.dir: {run_dir} is a file, not a folder; choose another run.dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"run.dir: cannot create {run_dir}: {err.strerror}") from None
    return run_dir


class RunLock:
    """An exclusive lock on a run folder, held until `release()` or the process ends."""

    def __init__(self, run_dir: Path):
        import fcntl

        self.path = usable_run_dir(run_dir) / LOCK_FILE
        try:
            self.file = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 (release())
        except OSError as err:
            raise ConfigError(f"run.dir: cannot write {self.path}: {err.strerror}") from None
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown"
            self.file.close()
            raise RunDirError(
                f"run.dir {run_dir} is in use by another training (process {holder} holds "
                f"{self.path}); wait for it to end, or choose another run.dir"
            ) from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()

    def release(self) -> None:
        """Unlock (closing the file drops the flock)."""
        if not self.file.closed:
            self.file.close()


def check_fresh(run_dir: Path) -> None:
    """Refuse to start a new run in a folder that holds checkpoints or metrics of one."""
    root = run_dir / "checkpoints"
    if step_folders(root) or (root / LATEST).exists():
        raise CheckpointError(
            f"run.dir {run_dir} already holds checkpoints: pass --resume to continue it, "
            "or choose another run.dir"
        )
    metrics = run_dir / METRICS_FILE
    if metrics.is_file() and metrics.stat().st_size > 0:
        raise CheckpointError(
            f"run.dir {run_dir} already holds {METRICS_FILE} of a run with no checkpoint to "
            "resume: delete the folder to start over, or choose another run.dir"
        )


def claim_run_dir(run_dir: Path, index: DataIndex, resuming: bool, claimed: bool) -> RunLock | None:
    """Lock the run folder (unless the caller holds it) and check it suits the run."""
    usable_run_dir(run_dir)
    lock = None if claimed else RunLock(run_dir)
    try:
        if resuming:
            check_same_tokenizer(run_dir, index)
        elif not claimed:
            check_fresh(run_dir)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return lock
