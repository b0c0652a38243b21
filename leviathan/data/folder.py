"""The dataset folder `data.dir`, kept whole: a dataset is built in a hidden temporary
folder next to it and renamed into place only when complete, so a failure leaves any
previous dataset untouched. A dataset whose fingerprint matches is reused as is, a
different one is replaced, but never a folder holding other files, nor (unless asked) one
prepared from other inputs. With data.inputs not given, the dataset there is taken as it
is (`as_it_is`). Concurrent `prepare` calls (one per rank) are serialised by a lock file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from leviathan.config import DataConfig, differences
from leviathan.data.shards import DataIndex, is_dataset_file, load_index
from leviathan.errors import DataError
from leviathan.storage import fsync_dir

NOT_SETTINGS = ("format", "tokenizer.trainer")  # recorded beside the settings, not chosen


@contextlib.contextmanager
def lock(target: Path, log: Callable[[str], None]) -> Iterator[None]:
    """Hold `.<name>.lock` next to `target` (no-op where fcntl is unavailable)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(target.with_name(f".{target.name}.lock"), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            log(f"waiting for another process preparing {target}")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def reusable(
    target: Path,
    fingerprint: str,
    inputs: list[str],
    source: str,
    rebuild: bool,
    log: Callable[[str], None],
) -> DataIndex | None:
    """The dataset in `target` if it has `fingerprint`; else None, once `target` is known
    to be replaceable. Call with the lock held."""
    _remove_leftovers(target)
    try:
        existing = load_index(target)
    except DataError:
        existing = None
    if existing is not None and existing.fingerprint == fingerprint:
        log(f"reusing the dataset in {target} (same corpus and settings)")
        return existing
    if target.exists():
        _check_replaceable(target)
        if existing is not None:
            _check_same_inputs(existing, inputs, source, rebuild)
            log(f"rebuilding {target}: its corpus or settings differ from data.*")
        elif any(target.iterdir()):
            log(f"rebuilding {target}: the dataset there is incomplete or corrupt")
    return None


def as_it_is(
    target: Path, settings: dict[str, Any], rebuild: bool, log: Callable[[str], None]
) -> DataIndex | None:
    """With data.inputs not given: the dataset in `target` as it was prepared (its index
    records its inputs and settings; nothing is read again), or None when there is none
    (no folder, or an empty one: the bundled corpus is prepared there)."""
    if not target.is_dir() or not any(target.iterdir()):
        return None
    with lock(target, log):
        try:
            index = load_index(target)
        except DataError as err:
            raise DataError(
                f"{err} with data.inputs naming its corpus (data.inputs=[] for the bundled one)"
            ) from None
    if rebuild:
        raise DataError(
            f"--rebuild: data.inputs is not given, so nothing would replace the dataset in "
            f"data.dir {target}; give data.inputs (data.inputs=[] for the bundled corpus)"
        )
    differ = [
        f"data.{key}: {old!r}, not {new!r}"
        for key, (old, new) in differences(index.meta.get("config", {}), settings).items()
        if old is not None and new is not None and key not in NOT_SETTINGS
    ]
    note = (
        f"; its settings are not the config's ({'; '.join(differ)}), which would apply to a "
        "new dataset: give data.inputs to prepare it again"
        if differ
        else ""
    )
    log(f"using the dataset in {target} as prepared from {source_of(index)}{note}")
    return index


@contextlib.contextmanager
def staging(target: Path) -> Iterator[Path]:
    """A new hidden folder next to `target` to build in: it replaces `target` when the
    block completes, and is removed if the block fails."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()  # (not mkdtemp: the dataset gets the umask's permissions, not 0700)
    try:
        yield tmp
        _swap_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_replaceable(target: Path) -> None:
    if not target.is_dir():
        raise DataError(f"data.dir {target} exists and is not a folder; refusing to replace it")
    foreign = sorted(p.name for p in target.iterdir() if not is_dataset_file(p.name))
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise DataError(
            f"data.dir {target} holds files a dataset does not ({shown}); refusing to replace "
            "it: choose an empty or new folder"
        )


def _check_same_inputs(existing: DataIndex, inputs: list[str], source: str, rebuild: bool) -> None:
    """Refuse to replace a dataset of other inputs unless asked (`--rebuild`): a forgotten
    `data.inputs` would otherwise turn someone's corpus into Shakespeare."""
    built_from = existing.meta.get("config", {}).get("inputs")
    if rebuild or built_from == inputs:
        return
    raise DataError(
        f"data.dir {existing.dir} holds a dataset prepared from {source_of(existing)}, but "
        f"data.inputs asks for {source}: pass --rebuild to replace it, or choose another "
        "data.dir (or leave data.inputs out to train on it as it is)"
    )


def recorded_inputs(cfg: DataConfig) -> list[str]:
    """The inputs `cfg` stands for: data.inputs when given, else those the dataset in
    data.dir records (`prepare` takes it as it is), else [] (the bundled corpus, which
    `prepare` puts there)."""
    if cfg.inputs is not None:
        return list(cfg.inputs)
    try:
        index = load_index(os.path.abspath(os.path.expanduser(cfg.dir)))
    except DataError:
        return []
    return list(index.meta.get("config", {}).get("inputs") or [])


def source_of(index: DataIndex) -> str:
    """What the dataset was prepared from, as its index records it."""
    built_from = index.meta.get("config", {}).get("inputs")
    return index.meta.get("corpus", {}).get("source") or ", ".join(built_from or [])


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Rename `tmp` to `target`; an old `target` is moved aside first, then deleted."""
    with contextlib.suppress(OSError):  # a folder some filesystems cannot fsync
        fsync_dir(tmp)
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)
    with contextlib.suppress(OSError):
        fsync_dir(target.parent)


def _remove_leftovers(target: Path) -> None:
    """Temporary folders of an interrupted prepare (we hold the lock, so none is live)."""
    for pattern in (f".{target.name}.tmp-*", f".{target.name}.old-*"):
        for path in target.parent.glob(pattern):
            shutil.rmtree(path, ignore_errors=True)
