"""Atomic, verifiable checkpoint folders.

A checkpoint is a folder `step_NNNNNNN/` holding whatever the engine and the loop wrote
plus `MANIFEST.json` with the size and SHA-256 of every file. It is written under a
temporary name, fsynced, then renamed into place; the `latest` pointer moves last. A
crash at any moment therefore leaves either the previous checkpoint or the new one,
never a half-written folder that looks valid, and a file truncated or altered later
is caught by the manifest before any tensor is loaded.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from leviathan.errors import CheckpointError, StorageError
from leviathan.storage import atomic_write_text, fsync_dir, fsync_file

MANIFEST = "MANIFEST.json"
LATEST = "latest"
STEP_DIR = re.compile(r"step_(\d+)")
LOW_SPACE = 1 << 20  # bytes free under which a failed write is taken for a full disk


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def quiet(_: str) -> None:
    """A log that drops its message."""


def save_checkpoint(
    root: Path,
    step: int,
    write: Callable[[Path], None],
    keep_last: int,
    rank: int = 0,
    barrier: Callable[[], None] = lambda: None,
) -> Path:
    """Call `write(tmp_dir)`, seal the folder with a manifest, publish it, prune old ones.

    In a multi-rank run every rank calls this: all write their shards into the same
    folder (on storage they share), and rank 0 alone seals and publishes it.
    """
    final = root / step_dir_name(step)
    tmp = root / f".{final.name}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    try:
        write(tmp)
        barrier()
        if rank == 0:
            seal(tmp, step)
            if final.exists():  # re-saving a step (e.g. after resume) replaces it whole
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(root)
            atomic_write_text(root / LATEST, final.name + "\n")
    except (OSError, RuntimeError) as err:
        if not disk_full(err, tmp):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # give the space back at once
        previous = latest_checkpoint(root)
        kept = f"{previous} is intact" if previous else "there is no earlier checkpoint"
        raise StorageError(
            f"no space left on device (ENOSPC) writing checkpoint {final} "
            f"({getattr(err, 'filename', None) or tmp}): {kept}; free space on that disk, "
            "then continue with --resume"
        ) from err
    if rank == 0:
        prune(root, keep_last)
    barrier()
    return final


def disk_full(err: BaseException, directory: Path) -> bool:
    """ENOSPC anywhere in the exception's chain, or a failed write (torch.save reports
    "iostream error", no errno) with the disk left all but full."""
    seen: BaseException | None = err
    while seen is not None:
        if getattr(seen, "errno", None) == errno.ENOSPC:
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        st = os.statvfs(directory if directory.exists() else directory.parent)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < LOW_SPACE


def seal(directory: Path, step: int) -> None:
    """Write the manifest (size and SHA-256 of every file) and fsync everything."""
    manifest = {"step": step, "files": {}}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        manifest["files"][rel] = {"bytes": path.stat().st_size, "sha256": sha256(path)}
        fsync_file(path)
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=1))
    for sub in sorted({p.parent for p in directory.rglob("*")}, key=lambda p: -len(p.parts)):
        fsync_dir(sub)


def latest_checkpoint(root: Path, log: Callable[[str], None] = quiet) -> Path | None:
    """The folder `latest` points to; when the pointer is missing, empty or names no
    folder, the newest step folder that verifies (the pointer moves last, so a crash or
    a hand can leave it behind). None when no checkpoint was ever completed."""
    pointer = root / LATEST
    try:
        named = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        named = None
    if named and STEP_DIR.fullmatch(named) and (root / named).is_dir():
        return root / named
    folders = step_folders(root)
    if not folders:
        if named:
            raise CheckpointError(f"{pointer} points to {named}, which does not exist")
        return None
    problem = (
        "is missing"
        if named is None
        else "is empty"
        if not named
        else f"points to {named}, which does not exist"
    )
    for folder in reversed(folders):
        try:
            verify_checkpoint(folder)
        except CheckpointError as err:
            log(f"warning: skipping {folder.name}: {err}")
            continue
        log(f"warning: {pointer} {problem}: using the newest verified checkpoint, {folder.name}")
        return folder
    raise CheckpointError(
        f"{pointer} {problem}, and no step folder in {root} verifies "
        f"({', '.join(f.name for f in folders)})"
    )


def step_folders(root: Path) -> list[Path]:
    """The `step_NNNNNNN` folders under `root`, oldest first."""
    found = [p for p in root.glob("step_*") if STEP_DIR.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step_")))


def checkpoint_at(root: Path, step: int) -> Path:
    """The checkpoint folder of `step` (`--resume-from STEP`), or an error naming those there."""
    folder = root / step_dir_name(step)
    if not folder.is_dir():
        have = ", ".join(str(int(p.name.removeprefix("step_"))) for p in step_folders(root))
        raise CheckpointError(
            f"--resume-from {step}: no checkpoint of step {step} in {root} "
            f"({'it has steps ' + have if have else 'it has none'})"
        )
    return folder


def offer_previous(
    err: CheckpointError, directory: Path, how: Callable[[Path], str]
) -> CheckpointError:
    """`err` (a damaged checkpoint) with the newest older one that verifies offered, as
    `how(folder)` says to use it (`--resume-from 4`, `--checkpoint DIR`)."""
    match = STEP_DIR.fullmatch(directory.name)
    older = [
        p
        for p in step_folders(directory.parent)
        if match and int(p.name.removeprefix("step_")) < int(match.group(1))
    ]
    for folder in reversed(older):
        try:
            verify_checkpoint(folder)
        except CheckpointError:
            continue
        return CheckpointError(
            f"{err}; the newest verified checkpoint before it is {folder.name}: {how(folder)}"
        )
    return CheckpointError(f"{err}; no older checkpoint verifies")


def checkpoint_step(directory: Path) -> int:
    """The step a sealed checkpoint folder was taken at."""
    try:
        return json.loads((directory / MANIFEST).read_text(encoding="utf-8"))["step"]
    except (OSError, json.JSONDecodeError, KeyError) as err:
        raise CheckpointError(f"checkpoint {directory} has no readable {MANIFEST}: {err}") from err


def verify_checkpoint(directory: Path) -> dict:
    """Check every file against the manifest; return the manifest or raise CheckpointError."""
    manifest_path = directory / MANIFEST
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint not found: {directory}")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint {directory} has no readable {MANIFEST}: {err}") from err
    for rel, meta in manifest["files"].items():
        path = directory / rel
        if not path.is_file():
            raise CheckpointError(f"checkpoint {directory} is missing {rel}")
        size = path.stat().st_size
        if size != meta["bytes"]:
            raise CheckpointError(
                f"checkpoint file {path} is truncated or altered: "
                f"{size} bytes, manifest says {meta['bytes']}"
            )
        if sha256(path) != meta["sha256"]:
            raise CheckpointError(f"checkpoint file {path} is corrupt: SHA-256 mismatch")
    return manifest


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints (never the one `latest` names)."""
    latest = latest_checkpoint(root)
    for old in step_folders(root)[:-keep_last]:
        if old != latest:
            shutil.rmtree(old)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
