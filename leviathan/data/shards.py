"""A prepared dataset on disk, and reading it back.

`<dir>/` holds `tokenizer.model`, `index.json` and, per split, shards `train-00000.bin`,
`train-00001.bin`, ..., `val-00000.bin`, ...: flat streams of token ids, raw little-endian
uint16 (uint32 when the vocabulary has more than 65536 pieces), readable with `np.memmap`.
Every document (part) of a split is preceded by the end-of-document id,
`eos doc1 eos doc2 ...`, and a shard holds whole documents: a new one starts before the
document that would take it past `data.shard_tokens` (a single longer document gets a shard
of its own). The split is the shards end to end, so scoring it from its second token
predicts every text token exactly once. `index.json` records, per split and per shard, the
tokens (separators included), characters (`len` of the Python text, separators excluded),
UTF-8 bytes and documents, which makes bits per character exact. It is written last;
`load_index` checks every shard against it.

Format 1 (before shards: one `train.bin` / `val.bin`) still loads, as one shard per split.
"""

from __future__ import annotations

import bisect
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from leviathan.data.tokenizer import Tokenizer
from leviathan.errors import DataError

FORMAT = 2
READABLE_FORMATS = (1, 2)
INDEX_FILE = "index.json"
TOKENIZER_FILE = "tokenizer.model"
DATASET_RECORD = "dataset.json"  # in a run folder: the dataset it was trained on
SPLITS = ("train", "val")
HELDOUT = "heldout"  # the whole documents of data.val_documents, when there are any
SPLIT_KEYS = ("tokens", "characters", "bytes", "documents")
SHARD_NAME = re.compile(r"(train|val|heldout)(-\d{5})?\.bin")
PROMPT_CHARS = 40  # the default sample prompt's length at most (`opening_line`)


def is_dataset_file(name: str) -> bool:
    """Whether `name` is a file `prepare` writes into a dataset folder."""
    return name in (INDEX_FILE, TOKENIZER_FILE) or SHARD_NAME.fullmatch(name) is not None


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:05d}.bin"


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
    shards: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # split -> file, counts
    eos_id: int = 1
    tokenizer_kind: str = "bpe"
    fingerprint: str = ""
    meta: dict[str, Any] = field(default_factory=dict, repr=False)  # the whole index.json

    @property
    def tokenizer_path(self) -> Path:
        return self.dir / TOKENIZER_FILE

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.tokenizer_path)


class ShardWriter:
    """Appends documents, each preceded by `eos_id`, to one split's shards, starting a new
    shard before a document that would take the current one past `shard_tokens`."""

    def __init__(
        self, directory: Path, split: str, dtype: np.dtype, eos_id: int, shard_tokens: int
    ):
        self.directory, self.split, self.dtype, self.eos_id = directory, split, dtype, eos_id
        self.shard_tokens = shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._file = None
        self._limit = np.iinfo(dtype).max

    def add(self, ids: np.ndarray, characters: int, nbytes: int) -> None:
        """One document part: its ids (no separator), `len` of its text and UTF-8 bytes."""
        if len(ids) and (int(ids.max()) > self._limit or int(ids.min()) < 0):
            raise DataError(f"token id out of range for {self.dtype.name} in {self.split}")
        n = len(ids) + 1
        shard = self.shards[-1] if self.shards else None
        if shard is None or (shard["tokens"] and shard["tokens"] + n > self.shard_tokens):
            shard = self._next_shard()
        self._file.write(np.array([self.eos_id], dtype=self.dtype).tobytes())
        self._file.write(np.asarray(ids, dtype=self.dtype).tobytes())
        shard["tokens"] += n
        shard["characters"] += characters
        shard["bytes"] += nbytes
        shard["documents"] += 1

    def _next_shard(self) -> dict[str, Any]:
        self._close_file()
        name = shard_name(self.split, len(self.shards))
        self._file = open(self.directory / name, "wb")  # closed by close()
        self.shards.append({"file": name, **dict.fromkeys(SPLIT_KEYS, 0)})
        return self.shards[-1]

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def close(self) -> dict[str, Any]:
        """Finish the last shard; the split's totals and shards for `index.json`."""
        if not self.shards:
            self._next_shard()  # an empty split still has its (empty) shard
        self._close_file()
        totals = {k: sum(s[k] for s in self.shards) for k in SPLIT_KEYS}
        return {**totals, "shards": self.shards}


def missing(directory: Path, why: str) -> DataError:
    return DataError(f"{directory}: {why}; run `leviathan prepare` to (re)build the dataset")


def load_index(directory: str | os.PathLike) -> DataIndex:
    """The index of a prepared dataset, after checking its shards are all there and whole."""
    directory = Path(directory)
    path = directory / INDEX_FILE
    if not directory.is_dir():
        raise missing(directory, "no prepared dataset (the folder does not exist)")
    if not path.is_file():
        raise missing(directory, f"no prepared dataset (no {INDEX_FILE})")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        if meta.get("format") not in READABLE_FORMATS:
            got = meta.get("format")
            raise missing(directory, f"{INDEX_FILE} has format {got!r}, not {FORMAT}")
        splits = {s: {k: int(v[k]) for k in SPLIT_KEYS} for s, v in meta["splits"].items()}
        if set(splits) - {HELDOUT} != set(SPLITS):
            raise ValueError(f"splits are {sorted(splits)}, not {list(SPLITS)} (+ {HELDOUT})")
        shards = {
            s: [
                {"file": str(x["file"]), **{k: int(x[k]) for k in SPLIT_KEYS}}
                for x in v.get("shards", [{"file": f"{s}.bin", **v}])  # format 1: one file
            ]
            for s, v in meta["splits"].items()
        }
        index = DataIndex(
            dir=directory,
            vocab_size=int(meta["vocab_size"]),
            dtype=str(meta["dtype"]),
            splits=splits,
            shards=shards,
            eos_id=int(meta["tokenizer"]["eos_id"]),
            tokenizer_kind=str(meta["tokenizer"]["kind"]),
            fingerprint=str(meta["fingerprint"]),
            meta=meta,
        )
        itemsize = np.dtype(index.dtype).itemsize
        for split, stats in splits.items():
            for key in SPLIT_KEYS:
                if stats[key] != sum(s[key] for s in shards[split]):
                    raise ValueError(f"{split} {key} is not the sum of its shards'")
    except DataError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise missing(directory, f"{INDEX_FILE} is corrupt ({type(e).__name__}: {e})") from None
    if not index.tokenizer_path.is_file():
        raise missing(directory, f"{TOKENIZER_FILE} is missing")
    for split in shards:
        for shard in shards[split]:
            file = directory / shard["file"]
            want = shard["tokens"] * itemsize
            have = file.stat().st_size if file.is_file() else None
            if have != want:
                got = "missing" if have is None else f"{have:,} bytes"
                raise missing(directory, f"{file.name} is {got}, {INDEX_FILE} says {want:,} bytes")
    return index


class TokenStream:
    """A split's shards end to end, memory-mapped: `len`, slicing (`stream[a:b]`, a
    window may span shards) and `blocks()`; nothing is read until sliced."""

    def __init__(self, parts: list[np.ndarray], dtype: np.dtype):
        self.parts = [p for p in parts if len(p)]
        self.dtype = dtype
        self.starts = np.cumsum([0] + [len(p) for p in self.parts]).tolist()

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, item: slice) -> np.ndarray:
        if not isinstance(item, slice) or item.step not in (None, 1):
            raise TypeError("a TokenStream takes contiguous slices only: stream[a:b]")
        start, stop, _ = item.indices(len(self))
        if stop <= start:
            return np.zeros(0, dtype=self.dtype)
        first = bisect.bisect_right(self.starts, start) - 1
        pieces = []
        while start < stop:
            base = self.starts[first]
            end = min(stop, self.starts[first + 1])
            pieces.append(self.parts[first][start - base : end - base])
            start, first = end, first + 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def blocks(self, size: int = 1 << 24) -> Iterator[np.ndarray]:
        """The stream in order, at most `size` tokens at a time."""
        for part in self.parts:
            for at in range(0, len(part), size):
                yield part[at : at + size]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """The whole split in memory: for small splits and tests only."""
        whole = np.concatenate(self.parts) if self.parts else np.zeros(0, dtype=self.dtype)
        return whole if dtype is None else whole.astype(dtype)


def load_tokens(directory: str | os.PathLike, split: str) -> TokenStream:
    """The token stream of `split` ("train" or "val") in `directory`, memory-mapped."""
    return map_tokens(load_index(directory), split)


def map_tokens(index: DataIndex, split: str) -> TokenStream:
    if split not in index.splits:
        raise DataError(f"{index.dir} has no split {split!r} (it has {', '.join(index.splits)})")
    dtype = np.dtype(index.dtype).newbyteorder("<")
    parts = [
        np.memmap(index.dir / s["file"], dtype=dtype, mode="r", shape=(s["tokens"],))
        for s in index.shards[split]
        if s["tokens"]  # an empty file cannot be mapped
    ]
    return TokenStream(parts, dtype)


def opening_line(index: DataIndex, max_chars: int = PROMPT_CHARS) -> str:
    """The first line of the dataset's first validation document (training document when
    there is no validation split), at most `max_chars` characters: the default sample
    prompt, text of the corpus's own kind (code for code, verse for verse)."""
    split = "val" if index.splits["val"]["tokens"] > 1 else "train"
    head = map_tokens(index, split)[1 : 1 + 4 * max_chars]  # after the leading separator
    ends = np.flatnonzero(head == index.eos_id)
    text = index.tokenizer().decode(head[: ends[0]] if len(ends) else head)
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return line[:max_chars] or "\n"


def record_dataset(run_dir: Path, index: DataIndex) -> None:
    """Write `run_dir/dataset.json`: the dataset's absolute path and fingerprint, so the
    run evaluates from any working directory, and a moved dataset is recognised."""
    record = {"dir": str(index.dir.resolve()), "fingerprint": index.fingerprint}
    (run_dir / DATASET_RECORD).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def run_dataset(run_dir: Path, configured: str, data_dir: str | os.PathLike | None) -> DataIndex:
    """The dataset a run was trained on: `data_dir` when given (`--data-dir`), else the
    absolute path its `dataset.json` records, else (older runs) its config's `data.dir`
    from the working directory. A dataset whose fingerprint is not the recorded one is
    refused: the run would be scored on other text or other ids."""
    path = run_dir / DATASET_RECORD
    record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    if data_dir is not None:
        index = load_index(Path(data_dir).expanduser())
    elif record is not None:
        try:
            index = load_index(record["dir"])
        except DataError as err:
            raise DataError(
                f"{err} (the dataset {path} records for this run); if it moved, pass "
                "--data-dir with its new place"
            ) from None
    else:
        try:
            index = load_index(configured)
        except DataError as err:
            raise DataError(
                f"{err} (data.dir of {run_dir}, from {Path.cwd()}); pass --data-dir"
            ) from None
    if record is not None and index.fingerprint != record["fingerprint"]:
        raise DataError(
            f"--data-dir {index.dir} holds another dataset than {run_dir} was trained on "
            f"(fingerprint {index.fingerprint[:12]}, the run's {record['fingerprint'][:12]})"
        )
    return index
