"""Atomic, verifiable checkpoint folders.

A checkpoint is a folder `step_NNNNNNN/` holding whatever the engine and the loop wrote
plus `MANIFEST.json` with the size and SHA-256 of every file. It is written under a
temporary name, fsynced, then renamed into place; the `latest` pointer moves last. A
crash at any moment therefore leaves either the previous checkpoint or the new one,
never a half-written folder that looks valid, and a file truncated or altered later
is caught by the manifest before any tensor is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from leviathan.errors import CheckpointError

MANIFEST = "MANIFEST.json"
LATEST = "latest"


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


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
    write(tmp)
    barrier()
    if rank == 0:
        seal(tmp, step)
        if final.exists():  # re-saving a step (e.g. after resume) replaces it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        atomic_write_text(root / LATEST, final.name + "\n")
        prune(root, keep_last)
    barrier()
    return final


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


def latest_checkpoint(root: Path) -> Path | None:
    """The folder `latest` points to, or None when no checkpoint was ever completed."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    target = root / pointer.read_text(encoding="utf-8").strip()
    if not target.is_dir():
        raise CheckpointError(f"{pointer} points to {target.name}, which does not exist")
    return target


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
    done = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in done[:-keep_last]:
        if old != latest:
            shutil.rmtree(old)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary sibling, fsync, rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
