"""Raw text in: files, folders, glob patterns and JSONL, read into an ordered list of documents.

Order is deterministic: inputs in the order given; the files of a folder or a glob sorted by
path; the records of a JSONL file in line order. A file reached twice (say through a folder
and a glob) is read once, where it first appears. Documents that are empty or whitespace
only are dropped; a corpus with nothing left is an error.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from leviathan.errors import DataError

GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class Document:
    """One unit of text: a file, or one record of a JSONL file (named `path:line`)."""

    name: str
    text: str


def read_documents(inputs: Iterable[str | os.PathLike]) -> list[Document]:
    """The documents of `inputs` (files, folders, globs, `.jsonl` files), in a fixed order.

    Folders are walked recursively (hidden files and folders skipped) and every regular file
    in them is read; `.jsonl` files hold one JSON object with a string "text" per line.
    Raises DataError naming the culprit for a missing path, a glob matching nothing, a file
    that is not UTF-8 (with the byte offset), a bad JSONL line, or an empty corpus.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = [os.fspath(i) for i in inputs]
    if not inputs:
        raise DataError("data.inputs is empty: give at least one file, folder or glob")
    seen: set[str] = set()
    docs: list[Document] = []
    for path in _expand(inputs):
        key = os.path.realpath(path)
        if key in seen:
            continue
        seen.add(key)
        docs.extend(_read_file(path))
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise DataError(
            f"empty corpus: {', '.join(inputs)} hold no text (every document is empty or "
            "whitespace only)"
        )
    return docs


def _expand(inputs: list[str]) -> Iterator[str]:
    """Each input as the regular files it stands for, in order."""
    for raw in inputs:
        path = os.path.expanduser(raw)
        if os.path.isdir(path):
            yield from _walk(path)
        elif os.path.isfile(path):
            yield path
        elif GLOB_CHARS & set(path):
            matches = sorted(glob.glob(path, recursive=True))
            if not matches:
                raise DataError(f"data.inputs: glob pattern {raw!r} matches no file")
            for match in matches:
                if os.path.isdir(match):
                    yield from _walk(match)
                elif os.path.isfile(match):
                    yield match
        elif os.path.exists(path):
            raise DataError(f"data.inputs: {raw!r} is neither a regular file nor a folder")
        else:
            raise DataError(f"data.inputs: {raw!r} does not exist")


def _walk(folder: str) -> Iterator[str]:
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files.extend(os.path.join(root, n) for n in names if not n.startswith("."))
    found = False
    for path in sorted(files):
        if os.path.isfile(path):
            found = True
            yield path
    if not found:
        raise DataError(f"data.inputs: folder {folder!r} holds no file")


def decode_utf8(data: bytes, name: str) -> str:
    """`data` as text; a leading byte-order mark is dropped. DataError names `name`."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{name} is not UTF-8 text: byte {e.start} (0x{data[e.start]:02x}) cannot be "
            "decoded; convert the file to UTF-8 or remove it from data.inputs"
        ) from None
    return text[1:] if text.startswith("\ufeff") else text


def _read_file(path: str) -> list[Document]:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    text = decode_utf8(data, path)
    if path.endswith(".jsonl"):
        return list(_jsonl_documents(path, text))
    return [Document(path, text)]


def _jsonl_documents(path: str, text: str) -> Iterator[Document]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict) or "text" not in record:
            raise DataError(f'{where}: expected a JSON object with a "text" field')
        if not isinstance(record["text"], str):
            kind = type(record["text"]).__name__
            raise DataError(f'{where}: "text" must be a string, not {kind}')
        yield Document(where, record["text"])


def split_point(text: str, val_fraction: float) -> int:
    """Where `text` splits into train `text[:i]` and validation `text[i:]`.

    The validation part is a fixed tail: it starts at the first line start at or after
    `len(text) - round(val_fraction * len(text))`, so it holds at most that fraction and
    no line is in both parts. A document whose tail holds no line start followed by
    non-blank text (a short document, or one whose last line is longer than the tail) goes
    to train whole: `len(text)` is returned.
    """
    n = len(text)
    want = round(val_fraction * n)
    if want <= 0:
        return n
    start = max(n - want, 1)
    i = text.find("\n", start - 1)
    if i == -1 or not text[i + 1 :].strip():
        return n
    return i + 1
