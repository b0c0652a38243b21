"""Pass 2 of `prepare`, the encode: documents go in batches of about `data.batch_chars`
characters to `data.workers` processes (or to Ray Data workers, which read the files
themselves and call the same `encode_batch`: see raydata.py), and come back in corpus
order. Memory is bounded by the batches in flight. The output does not depend on the
number of workers, the batch size, or local vs Ray.

Exact round trip: `decode(encode(text)) == text` is checked for the first part of every
batch (every part with `check_all=True`, as the tests do).
"""

from __future__ import annotations

import collections
import contextlib
import gc
import hashlib
import multiprocessing
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from leviathan.data.documents import Document
from leviathan.data.scan import document_parts
from leviathan.data.shards import HELDOUT, SPLITS
from leviathan.data.tokenizer import Tokenizer, word_pieces
from leviathan.errors import DataError


@dataclass(frozen=True)
class Plan:
    """What an encoding worker needs, picklable: the split rule and the tokenizer."""

    val_fraction: float
    fallback: int | None
    model: bytes
    dtype: str
    check_all: bool = False
    heldout: frozenset[int] = frozenset()  # documents going whole to the heldout split


# split -> (ids, characters, bytes, document name) of each part, in corpus order
Encoded = dict[str, list[tuple[np.ndarray, int, int, str]]]
_TOKENIZERS: dict[bytes, Tokenizer] = {}


def plan_tokenizer(plan: Plan) -> Tokenizer:
    """The plan's tokenizer, loaded once per process (not once per batch)."""
    key = hashlib.sha256(plan.model).digest()
    if key not in _TOKENIZERS:
        _TOKENIZERS.clear()
        _TOKENIZERS[key] = Tokenizer(plan.model)
    return _TOKENIZERS[key]


def plan_splits(plan: Plan) -> tuple[str, ...]:
    """The splits a dataset of this plan has: train, val, and heldout when asked for."""
    return SPLITS + ((HELDOUT,) if plan.heldout else ())


def encode_batch(plan: Plan, first: int, docs: list[Document], num_threads: int = 1) -> Encoded:
    """Split and encode documents number `first`, `first + 1`, ... (the unit of work)."""
    tok = plan_tokenizer(plan)
    names, texts, splits = [], [], []
    for i, doc in enumerate(docs):
        parts = document_parts(doc.text, first + i, plan.val_fraction, plan.fallback, plan.heldout)
        for split, part in parts.items():
            names.append(doc.name)
            texts.append(part)
            splits.append(split)
    ids = tok.encode_arrays(texts, np.dtype(plan.dtype), num_threads)
    out: Encoded = {s: [] for s in plan_splits(plan)}
    for k, (name, text, split) in enumerate(zip(names, texts, splits, strict=True)):
        if plan.check_all:
            exact = tok.decode(ids[k]) == text
        else:  # the batch's first word-aligned piece: its ids lead the part's
            exact = k > 0 or _piece_round_trips(tok, text, ids[k])
        if not exact:
            raise DataError(
                f"the tokenizer does not reproduce {name} exactly (decode(encode(text)) "
                "differs); use a model trained by `leviathan prepare`"
            )
        out[split].append((ids[k], len(text), len(text.encode("utf-8")), name))
    return out


def _piece_round_trips(tok: Tokenizer, text: str, ids: np.ndarray) -> bool:
    piece = next(word_pieces(text))
    return tok.decode(ids[: len(tok.encode(piece))]) == piece


def _encode_job(job: tuple[Plan, int, list[Document]]) -> Encoded:
    return encode_batch(*job)


def document_batches(
    docs: Iterable[Document], batch_chars: int
) -> Iterator[tuple[int, list[Document]]]:
    """(number of the first document, documents) of about `batch_chars` characters each."""
    batch: list[Document] = []
    first, size = 0, 0
    for doc in docs:
        batch.append(doc)
        size += len(doc.text)
        if size >= batch_chars:
            yield first, batch
            first, batch, size = first + len(batch), [], 0
    if batch:
        yield first, batch


def available_cores() -> int:
    """The cores this process may run on (`data.workers: 0` means all of them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@contextlib.contextmanager
def worker_pool(workers: int) -> Iterator[Any]:
    """`workers` encoding processes, or None for one. Started before the tokenizer trains,
    while this process is small: forked workers inherit (and count) its memory."""
    if workers <= 1:
        yield None
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    gc.freeze()  # the collector would touch, so copy, every inherited object in each worker
    try:
        with context.Pool(workers) as pool:
            yield pool
    finally:
        gc.unfreeze()


def encode_local(
    docs: Iterable[Document], plan: Plan, pool: Any, batch_chars: int, in_flight: int
) -> Iterator[Encoded]:
    """Encoded batches in corpus order, from the processes of `pool` (in this one when
    it is None); at most `in_flight` batches out at once, so memory stays bounded."""
    batches = document_batches(docs, batch_chars)
    if pool is None:
        for first, batch in batches:
            yield encode_batch(plan, first, batch)
        return
    pending: collections.deque = collections.deque()
    for first, batch in batches:
        pending.append(pool.apply_async(_encode_job, ((plan, first, batch),)))
        if len(pending) >= in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()
