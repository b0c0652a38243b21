"""Files written so that a crash leaves the old version or the new one, never half of
one (write a temporary sibling, fsync, rename, fsync the folder), and the metrics log
read back. Checkpoints, exports, the dataset index and the metrics all go through here."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from leviathan.errors import StorageError


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary sibling, fsync, rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a half-written file would hold the space it took
        raise
    fsync_dir(path.parent)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_records(path: Path, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a torn last line is dropped with a warning, a bad
    line before it is an error naming it."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number < len(lines):
                raise StorageError(f"{path}:{number}: not a JSON record ({err})") from None
            log(
                f"warning: {path}: dropping its torn last line {number} "
                f"({len(line)} characters, a crash or a full disk cut it short)"
            )
    return records
