"""`prepare`: documents -> train/val split -> tokenizer -> token shards + index, atomically.

Split: each document gives its tail to validation, cut at a line start (see
`documents.split_point`), so no line is in both splits and nothing overlaps. Documents too
short to cut that way stay whole in train. If that leaves validation empty (every document
is a single line, say JSONL records), the split falls back to whole documents: the last
ones in corpus order go to validation until they hold `val_fraction` of the characters.

The tokenizer is trained on the training text only (or `tokenizer.model` is reused).

Atomic and idempotent: the dataset is built in a hidden temporary folder next to
`data.dir` and renamed into place only when complete; a failure removes it and leaves
any previous dataset untouched. A fingerprint of the settings and of the documents'
content is stored in `index.json`: a folder whose fingerprint matches is reused as is, a
different one is rebuilt. Concurrent calls (one per rank) are serialised by a lock file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import sentencepiece as spm

from leviathan.data.bundled import bundled_documents
from leviathan.data.documents import Document, read_documents, split_point
from leviathan.data.shards import (
    DATASET_FILES,
    FORMAT,
    INDEX_FILE,
    SPLITS,
    TOKENIZER_FILE,
    DataIndex,
    ShardWriter,
    load_index,
    token_dtype,
)
from leviathan.data.tokenizer import TRAINER_VERSION, Tokenizer
from leviathan.errors import ConfigError, DataError

ENCODE_BATCH_CHARS = 4_000_000  # characters encoded per batch (bounds memory on big corpora)


def split_documents(
    docs: list[Document], val_fraction: float
) -> tuple[list[Document], list[Document], bool]:
    """(train parts, val parts, whether the whole-document fallback was used).

    Parts keep their document's name; empty parts are left out.
    """
    train: list[Document] = []
    val: list[Document] = []
    for doc in docs:
        cut = split_point(doc.text, val_fraction)
        if cut > 0:
            train.append(Document(doc.name, doc.text[:cut]))
        if cut < len(doc.text):
            val.append(Document(doc.name, doc.text[cut:]))
    if val or val_fraction <= 0:
        return train, val, False
    if len(docs) < 2:
        name = docs[0].name if docs else "the corpus"
        raise DataError(
            f"cannot make a validation split: {name} is a single document with no line start "
            f"in its last {val_fraction:.0%}; add line breaks or documents, or set "
            "data.val_fraction=0"
        )
    want = val_fraction * sum(len(d.text) for d in docs)
    k, held = 0, 0
    while k < len(docs) - 1 and held < want:
        k += 1
        held += len(docs[-k].text)
    return list(docs[:-k]), list(docs[-k:]), True


def fingerprint(settings: dict[str, Any], docs: list[Document]) -> str:
    """sha256 of the settings and of the documents' texts, in order (names excluded)."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for doc in docs:
        data = doc.text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def prepare(cfg: Any, *, log: Callable[[str], None] = print, rebuild: bool = False) -> DataIndex:
    """Build (or reuse) the dataset `cfg` (a DataConfig) describes in `cfg.dir`.

    A dataset there prepared from other inputs is replaced only with `rebuild`: a
    forgotten `data.inputs` would otherwise turn someone's corpus into Shakespeare."""
    started = time.perf_counter()
    raw = cfg.inputs or []
    inputs = [os.fspath(i) for i in ([raw] if isinstance(raw, (str, os.PathLike)) else raw)]
    tcfg = cfg.tokenizer
    val_fraction = float(cfg.val_fraction)
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction: expected a number in [0, 1), got {val_fraction}")
    target = Path(os.path.abspath(os.path.expanduser(cfg.dir)))
    if target.parent == target:
        raise ConfigError(f"data.dir: {cfg.dir!r} cannot hold a dataset; name a folder")

    docs = read_documents(inputs) if inputs else bundled_documents()
    source = ", ".join(inputs) if inputs else "the bundled Shakespeare corpus"
    model_bytes = None
    if tcfg.model:
        try:
            model_bytes = Path(tcfg.model).expanduser().read_bytes()
        except OSError as e:
            raise DataError(
                f"data.tokenizer.model: cannot read {tcfg.model}: {e.strerror}"
            ) from None
        Tokenizer(model_bytes, tcfg.model)  # fail early on a file that is no model
    settings = {
        "format": FORMAT,
        "val_fraction": val_fraction,
        "tokenizer": (
            {"model_sha256": hashlib.sha256(model_bytes).hexdigest()}
            if model_bytes is not None
            else {"kind": tcfg.kind, "vocab_size": int(tcfg.vocab_size), "trainer": TRAINER_VERSION}
        ),
    }
    fp = fingerprint(settings, docs)

    target.parent.mkdir(parents=True, exist_ok=True)
    with _lock(target, log):
        _remove_leftovers(target)
        try:
            existing = load_index(target)
        except DataError:
            existing = None
        if existing is not None and existing.fingerprint == fp:
            log(f"reusing the dataset in {target} (same corpus and settings)")
            return existing
        if target.exists():
            _check_replaceable(target)
            if existing is not None:
                _check_same_inputs(existing, inputs, source, rebuild)
                log(f"rebuilding {target}: its corpus or settings differ from data.*")
            elif any(target.iterdir()):
                log(f"rebuilding {target}: the dataset there is incomplete or corrupt")
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.mkdir()  # (not mkdtemp: the dataset gets the umask's permissions, not 0700)
        try:
            meta = _build(tmp, docs, val_fraction, tcfg, model_bytes, log)
            meta["fingerprint"] = fp
            meta["config"] = {
                "inputs": inputs,
                "val_fraction": val_fraction,
                "tokenizer": {
                    "kind": tcfg.kind,
                    "vocab_size": tcfg.vocab_size,
                    "model": tcfg.model,
                },
            }
            meta["corpus"]["source"] = source
            _write_json(tmp / INDEX_FILE, meta)
            load_index(tmp)  # the same checks a reader will make
            _swap_into_place(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        index = load_index(target)
    summary = ", ".join(
        f"{s} {v['tokens']:,} tokens / {v['characters']:,} chars" for s, v in index.splits.items()
    )
    log(f"prepared {target} in {time.perf_counter() - started:.1f} s: {summary}")
    return index


def _build(
    tmp: Path,
    docs: list[Document],
    val_fraction: float,
    tcfg: Any,
    model_bytes: bytes | None,
    log: Callable[[str], None],
) -> dict[str, Any]:
    train, val, fallback = split_documents(docs, val_fraction)
    if fallback:
        log(
            f"no document has a line start in its last {val_fraction:.0%}: validation takes the "
            f"last {len(val)} whole document(s) instead"
        )
    if not train:
        raise DataError("the training split is empty; lower data.val_fraction or add text")
    model_path = tmp / TOKENIZER_FILE
    if model_bytes is not None:
        tok = Tokenizer(model_bytes, tcfg.model)
        tok.save(model_path)
        log(f"reusing tokenizer {tcfg.model} ({tok.vocab_size} pieces)")
    else:
        chars = sum(len(d.text) for d in train)
        log(f"training a {tcfg.kind} tokenizer of {tcfg.vocab_size} pieces on {chars:,} characters")
        tok = Tokenizer.train((d.text for d in train), tcfg.kind, int(tcfg.vocab_size), model_path)
    dtype = token_dtype(tok.vocab_size)
    stats = {}
    for split, parts in zip(SPLITS, (train, val), strict=True):
        writer = ShardWriter(tmp / f"{split}.bin", dtype, tok.eos_id)
        try:
            for batch in _batches(parts):
                for doc, ids in zip(batch, tok.encode_batch([d.text for d in batch]), strict=True):
                    if tok.decode(ids) != doc.text:
                        raise DataError(
                            f"the tokenizer does not reproduce {doc.name} exactly (decode(encode"
                            "(text)) differs); use a model trained by `leviathan prepare`"
                        )
                    writer.add(ids, doc.text)
        finally:
            writer.close()
        stats[split] = {"file": f"{split}.bin", **writer.stats}
    return {
        "format": FORMAT,
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        "separator": "eos_id before every document",
        "tokenizer": {
            "file": TOKENIZER_FILE,
            "kind": tok.kind,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "sha256": hashlib.sha256(tok.model_proto).hexdigest(),
            "sentencepiece": spm.__version__,
        },
        "splits": stats,
        "split_rule": "whole documents" if fallback else "line-aligned tail of each document",
        "corpus": {
            "documents": len(docs),
            "characters": sum(len(d.text) for d in docs),
        },
    }


def _batches(parts: list[Document]) -> Iterator[list[Document]]:
    batch, size = [], 0
    for part in parts:
        batch.append(part)
        size += len(part.text)
        if size >= ENCODE_BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _check_replaceable(target: Path) -> None:
    if not target.is_dir():
        raise DataError(f"data.dir {target} exists and is not a folder; refusing to replace it")
    foreign = sorted(p.name for p in target.iterdir() if p.name not in DATASET_FILES)
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise DataError(
            f"data.dir {target} holds files a dataset does not ({shown}); refusing to replace "
            "it: choose an empty or new folder"
        )


def _check_same_inputs(existing: DataIndex, inputs: list[str], source: str, rebuild: bool) -> None:
    """Refuse to replace a dataset of other inputs unless asked (`--rebuild`)."""
    built_from = existing.meta.get("config", {}).get("inputs")
    if rebuild or built_from == inputs:
        return
    before = existing.meta.get("corpus", {}).get("source") or ", ".join(built_from or [])
    raise DataError(
        f"data.dir {existing.dir} holds a dataset prepared from {before}, but data.inputs "
        f"asks for {source}: pass --rebuild to replace it, or choose another data.dir"
        + ("" if inputs else " (or set data.inputs to its inputs)")
    )


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Rename `tmp` to `target`; an old `target` is moved aside first, then deleted."""
    _fsync_dir(tmp)
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)
    _fsync_dir(target.parent)


def _remove_leftovers(target: Path) -> None:
    """Temporary folders of an interrupted prepare (we hold the lock, so none is live)."""
    for pattern in (f".{target.name}.tmp-*", f".{target.name}.old-*"):
        for path in target.parent.glob(pattern):
            shutil.rmtree(path, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _lock(target: Path, log: Callable[[str], None]) -> Iterator[None]:
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
