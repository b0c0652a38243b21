"""A prepared dataset on disk, and reading it back.

`<dir>/` holds `tokenizer.model`, `train.bin`, `val.bin` and `index.json`. A `.bin` file is
a flat stream of token ids, raw little-endian uint16 (uint32 when the vocabulary has more
than 65536 pieces), readable with `np.memmap`: every document (part) of the split is
preceded by the end-of-document id, `eos doc1 eos doc2 ...`, so scoring the stream from its
second token predicts every text token exactly once. `index.json` records, per split, the
number of tokens (separators included), characters (`len` of the Python text, separators
excluded), UTF-8 bytes and documents, which makes bits per character exact.
`index.json` is written last; `load_index` checks every file against it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from leviathan.data.tokenizer import Tokenizer
from leviathan.errors import DataError

FORMAT = 1
INDEX_FILE = "index.json"
TOKENIZER_FILE = "tokenizer.model"
SPLITS = ("train", "val")
DATASET_FILES = frozenset({INDEX_FILE, TOKENIZER_FILE} | {f"{s}.bin" for s in SPLITS})
SPLIT_KEYS = ("tokens", "characters", "bytes", "documents")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32).newbyteorder("<")


@dataclass
class DataIndex:
    """What `index.json` says about a prepared dataset folder."""

    dir: Path
    vocab_size: int
    dtype: str  # "uint16" or "uint32"
    splits: dict[str, dict[str, int]]  # split -> tokens, characters, bytes, documents
    eos_id: int = 1
    tokenizer_kind: str = "bpe"
    fingerprint: str = ""
    meta: dict[str, Any] = field(default_factory=dict, repr=False)  # the whole index.json

    @property
    def tokenizer_path(self) -> Path:
        return self.dir / TOKENIZER_FILE

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.tokenizer_path)

    def split_path(self, split: str) -> Path:
        return self.dir / f"{split}.bin"


class ShardWriter:
    """Appends documents, each preceded by `eos_id`, to one split's `.bin` file."""

    def __init__(self, path: Path, dtype: np.dtype, eos_id: int):
        self.path, self.dtype, self.eos_id = path, dtype, eos_id
        self.stats = dict.fromkeys(SPLIT_KEYS, 0)
        self._file = open(path, "wb")  # closed by close()
        self._limit = np.iinfo(dtype).max

    def add(self, ids: list[int], text: str) -> None:
        arr = np.empty(len(ids) + 1, dtype=self.dtype)
        arr[0] = self.eos_id
        if ids:
            if max(ids) > self._limit or min(ids) < 0:
                raise DataError(f"token id out of range for {self.dtype.name} in {self.path}")
            arr[1:] = ids
        self._file.write(arr.tobytes())
        self.stats["tokens"] += len(arr)
        self.stats["characters"] += len(text)
        self.stats["bytes"] += len(text.encode("utf-8"))
        self.stats["documents"] += 1

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


def missing(directory: Path, why: str) -> DataError:
    return DataError(f"{directory}: {why}; run `leviathan prepare` to (re)build the dataset")


def load_index(directory: str | os.PathLike) -> DataIndex:
    """The index of a prepared dataset, after checking its files are all there and whole."""
    directory = Path(directory)
    path = directory / INDEX_FILE
    if not directory.is_dir():
        raise missing(directory, "no prepared dataset (the folder does not exist)")
    if not path.is_file():
        raise missing(directory, f"no prepared dataset (no {INDEX_FILE})")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT:
            got = meta.get("format")
            raise missing(directory, f"{INDEX_FILE} has format {got!r}, not {FORMAT}")
        index = DataIndex(
            dir=directory,
            vocab_size=int(meta["vocab_size"]),
            dtype=str(meta["dtype"]),
            splits={s: {k: int(v[k]) for k in SPLIT_KEYS} for s, v in meta["splits"].items()},
            eos_id=int(meta["tokenizer"]["eos_id"]),
            tokenizer_kind=str(meta["tokenizer"]["kind"]),
            fingerprint=str(meta["fingerprint"]),
            meta=meta,
        )
        itemsize = np.dtype(index.dtype).itemsize
        if set(index.splits) != set(SPLITS):
            raise ValueError(f"splits are {sorted(index.splits)}, not {list(SPLITS)}")
    except DataError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise missing(directory, f"{INDEX_FILE} is corrupt ({type(e).__name__}: {e})") from None
    if not index.tokenizer_path.is_file():
        raise missing(directory, f"{TOKENIZER_FILE} is missing")
    for split, stats in index.splits.items():
        file = index.split_path(split)
        want = stats["tokens"] * itemsize
        have = file.stat().st_size if file.is_file() else None
        if have != want:
            got = "missing" if have is None else f"{have:,} bytes"
            raise missing(directory, f"{file.name} is {got}, {INDEX_FILE} says {want:,} bytes")
    return index


def load_tokens(directory: str | os.PathLike, split: str) -> np.ndarray:
    """The token stream of `split` ("train" or "val") in `directory`, memory-mapped."""
    return _map_tokens(load_index(directory), split)


def _map_tokens(index: DataIndex, split: str) -> np.ndarray:
    if split not in index.splits:
        raise DataError(f"{index.dir} has no split {split!r} (it has {', '.join(index.splits)})")
    n = index.splits[split]["tokens"]
    dtype = np.dtype(index.dtype).newbyteorder("<")
    if n == 0:  # an empty file cannot be mapped
        return np.zeros(0, dtype=dtype)
    return np.memmap(index.split_path(split), dtype=dtype, mode="r", shape=(n,))
