"""Raw text in: files, folders, globs, JSONL and Parquet, optionally gzip/zstd-compressed,
read as a stream of documents.

Order is deterministic: inputs in the order given; the files of a folder or a glob sorted by
path; the records of a JSONL or Parquet file in their order. A file reached twice (say
through a folder and a glob) is read once, where it first appears. Documents that are empty
or whitespace only are dropped; a corpus with nothing left is an error.

Kinds, by name: `.jsonl` (one JSON object per line, the text in `text_field`), `.parquet`
(a string column `text_field`, read a record batch at a time through pyarrow), anything
else one plain-text document; a `.gz`, `.zst` or `.zstd` suffix on top decompresses it
(`notes.txt.gz`, `dump.jsonl.zst`). Only a plain-text document is ever held whole.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import io
import json
import os
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO

from leviathan.errors import DataError

GLOB_CHARS = frozenset("*?[")
COMPRESSED = (".gz", ".zst", ".zstd")
PARQUET_BATCH_ROWS = 1024  # rows read from a Parquet file at a time


@dataclass(frozen=True)
class Document:
    """One unit of text: a file, or one record of a JSONL/Parquet file (`path:record`)."""

    name: str
    text: str


def as_inputs(inputs: Iterable[str | os.PathLike] | str | os.PathLike) -> list[str]:
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    return [os.fspath(i) for i in inputs]


def source_files(
    inputs: Iterable[str | os.PathLike] | str | os.PathLike, what: str = "data.inputs"
) -> list[str]:
    """The regular files `inputs` stand for, in reading order, each once. `what` names the
    setting or argument the inputs came from in errors."""
    inputs = as_inputs(inputs)
    if not inputs:
        raise DataError(f"{what} is empty: give at least one file, folder or glob")
    seen: set[str] = set()
    files = []
    for path in _expand(inputs, what):
        key = os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            files.append(path)
    return files


def iter_documents(
    inputs: Iterable[str | os.PathLike] | str | os.PathLike,
    text_field: str = "text",
    what: str = "data.inputs",
) -> Iterator[Document]:
    """The non-blank documents of `inputs`, streamed in a fixed order (see the module
    docstring). DataError names the culprit: a missing path, a glob matching nothing, a
    file that is not UTF-8, a bad JSONL line, a Parquet file without the column, a corrupt
    compressed file, or a corpus with no text at all."""
    inputs = as_inputs(inputs)
    found = False
    for path in source_files(inputs, what):
        for doc in file_documents(path, text_field):
            found = True
            yield doc
    if not found:
        raise empty_corpus(", ".join(inputs))


def empty_corpus(source: str) -> DataError:
    """The error for inputs (`source`, as the user named them) with no text at all."""
    return DataError(
        f"empty corpus: {source} hold no text (every document is empty or whitespace only)"
    )


def read_documents(
    inputs: Iterable[str | os.PathLike] | str | os.PathLike,
    text_field: str = "text",
    what: str = "data.inputs",
) -> list[Document]:
    """`iter_documents` as a list: for text small enough to hold (`eval --data`)."""
    return list(iter_documents(inputs, text_field, what))


def _expand(inputs: list[str], what: str) -> Iterator[str]:
    """Each input as the regular files it stands for, in order."""
    for raw in inputs:
        path = os.path.expanduser(raw)
        if os.path.isdir(path):
            yield from _walk(path, what)
        elif os.path.isfile(path):
            yield path
        elif GLOB_CHARS & set(path):
            matches = sorted(glob.glob(path, recursive=True))
            if not matches:
                raise DataError(f"{what}: glob pattern {raw!r} matches no file")
            for match in matches:
                if os.path.isdir(match):
                    yield from _walk(match, what)
                elif os.path.isfile(match):
                    yield match
        elif os.path.exists(path):
            raise DataError(f"{what}: {raw!r} is neither a regular file nor a folder")
        else:
            raise DataError(f"{what}: {raw!r} does not exist")


def _walk(folder: str, what: str) -> Iterator[str]:
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
        raise DataError(f"{what}: folder {folder!r} holds no file")


def decode_utf8(data: bytes, name: str) -> str:
    """`data` as text; a leading byte-order mark is dropped. DataError names `name`."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{name} is not UTF-8 text: byte {e.start} (0x{data[e.start]:02x}) cannot be "
            "decoded; convert the file to UTF-8 or remove it from the inputs"
        ) from None
    return text[1:] if text.startswith("\ufeff") else text


def file_documents(path: str, text_field: str = "text") -> Iterator[Document]:
    """The non-blank documents of one file, streamed (see the module docstring)."""
    inner = _strip_compression(path)
    try:
        if inner.endswith(".parquet"):
            docs = _parquet_documents(path, text_field)
        elif inner.endswith(".jsonl"):
            docs = _jsonl_documents(path, text_field)
        else:
            docs = _text_document(path)
        for doc in docs:
            if doc.text.strip():
                yield doc
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"{path} is corrupt or truncated ({e}); re-create or remove it") from None
    except Exception as e:
        if type(e).__name__ == "ZstdError":
            raise DataError(
                f"{path} is not valid zstd data ({e}); re-create or remove it"
            ) from None
        if isinstance(e, OSError):
            raise DataError(f"cannot read {path}: {e.strerror or e}") from None
        raise


def _strip_compression(path: str) -> str:
    for suffix in COMPRESSED:
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path


@contextlib.contextmanager
def open_binary(path: str) -> Iterator[IO[bytes]]:
    """`path` opened for reading bytes, decompressed by its suffix."""
    if path.endswith(".gz"):
        with gzip.open(path, "rb") as f:
            yield f
    elif path.endswith((".zst", ".zstd")):
        import zstandard

        with open(path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as f:
            yield io.BufferedReader(f)
    else:
        with open(path, "rb") as f:
            yield f


def _text_document(path: str) -> Iterator[Document]:
    with open_binary(path) as f:
        data = f.read()
    yield Document(path, decode_utf8(data, path))


def _jsonl_documents(path: str, text_field: str) -> Iterator[Document]:
    with open_binary(path) as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            line = decode_utf8(raw, where)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise DataError(
                    f'{where}: expected a JSON object with a "{text_field}" field'
                    + ("" if text_field != "text" else " (another name: set data.text_field)")
                )
            if not isinstance(record[text_field], str):
                kind = type(record[text_field]).__name__
                raise DataError(f'{where}: "{text_field}" must be a string, not {kind}')
            yield Document(where, record[text_field])


def _parquet_documents(path: str, text_field: str) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with open_binary(path) as raw:
            source = raw if path.endswith(".parquet") else pa.BufferReader(raw.read())
            table = pq.ParquetFile(source)
            names = table.schema_arrow.names
            if text_field not in names:
                raise DataError(
                    f'{path}: no column "{text_field}" (it has {", ".join(names) or "none"}); '
                    "set data.text_field to the column that holds the text"
                )
            kind = table.schema_arrow.field(text_field).type
            if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
                raise DataError(f'{path}: column "{text_field}" holds {kind}, not strings')
            row = 0
            for batch in table.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
                for text in batch.column(0).to_pylist():
                    row += 1
                    if text is not None:
                        yield Document(f"{path}:{row}", text)
    except pa.ArrowException as e:
        raise DataError(f"{path} is not a readable Parquet file ({e})") from None


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
