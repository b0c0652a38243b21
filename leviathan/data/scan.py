"""Pass 1 of `prepare`, the scan: every document is read once, as a stream, to fingerprint
the corpus, count it, decide the split and draw the tokenizer's training sample.

Split: each document gives its tail to validation, cut at a line start (see
`documents.split_point`), so no line is in both splits and nothing overlaps. Documents too
short to cut that way stay whole in train. If that leaves validation empty (every document
is a single line, say JSONL records), the split falls back to whole documents: the last
ones in corpus order go to validation until they hold `val_fraction` of the characters.
Documents named or counted by `data.val_documents` go whole to a third split, `heldout`.

Sample: a seeded uniform sample (reservoir) of at most `data.tokenizer.sample_chars`
characters of the training text, in chunks of about 4096 characters; a training text
shorter than that is taken whole, in order. Memory is bounded by the sample, never by
the corpus.
"""

from __future__ import annotations

import array
import fnmatch
import hashlib
import heapq
import json
import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from leviathan.data.bundled import bundled_documents
from leviathan.data.documents import (
    Document,
    empty_corpus,
    file_documents,
    source_files,
    split_point,
)
from leviathan.data.shards import HELDOUT
from leviathan.data.tokenizer import training_chunks
from leviathan.errors import DataError

BUNDLED = "<bundled>"  # the source name of the bundled corpus
SAMPLE_SEED = 0  # the tokenizer sample's reservoir is drawn with this seed


def corpus_sources(inputs: list[str], text_field: str) -> Iterator[tuple[str, Iterable[Document]]]:
    """(file, its documents) in corpus order: the files of `inputs`, or the bundled corpus
    when there are none. Lazy, so each pass reads the files again rather than holding them."""
    if not inputs:
        yield BUNDLED, bundled_documents()
        return
    for path in source_files(inputs):
        yield path, file_documents(path, text_field)


def describe_inputs(inputs: list[str]) -> str:
    """The inputs as errors and logs name them."""
    return ", ".join(inputs) if inputs else "the bundled Shakespeare corpus"


def fallback_start(lengths: list[int] | array.array, val_fraction: float, first_name: str) -> int:
    """With no document able to give a tail: the index of the first of the last documents
    that go to validation whole (they hold about `val_fraction` of the characters)."""
    if len(lengths) < 2:
        raise DataError(
            f"cannot make a validation split: {first_name} is a single document with no line "
            f"start in its last {val_fraction:.0%}; add line breaks or documents, or set "
            "data.val_fraction=0"
        )
    want = val_fraction * sum(lengths)
    k, held = 0, 0
    while k < len(lengths) - 1 and held < want:
        k += 1
        held += lengths[-k]
    return len(lengths) - k


def document_parts(
    text: str,
    index: int,
    val_fraction: float,
    fallback: int | None,
    heldout: frozenset[int] = frozenset(),
) -> dict[str, str]:
    """The parts of document number `index` by split (empty parts left out): a held-out
    document goes whole to `heldout`, any other gives train its head and val its tail."""
    if index in heldout:
        parts = {HELDOUT: text}
    elif fallback is not None:
        parts = {"val": text} if index >= fallback else {"train": text}
    else:
        cut = split_point(text, val_fraction)
        parts = {"train": text[:cut], "val": text[cut:]}
    return {split: part for split, part in parts.items() if part}


def split_documents(
    docs: list[Document], val_fraction: float
) -> tuple[list[Document], list[Document], bool]:
    """(train parts, val parts, whether the whole-document fallback was used): the split
    `prepare` makes, for documents held in memory. Parts keep their document's name;
    empty parts are left out."""
    fallback = None
    if val_fraction > 0 and all(split_point(d.text, val_fraction) == len(d.text) for d in docs):
        name = docs[0].name if docs else "the corpus"
        fallback = fallback_start([len(d.text) for d in docs], val_fraction, name)
    train: list[Document] = []
    val: list[Document] = []
    for i, doc in enumerate(docs):
        parts = document_parts(doc.text, i, val_fraction, fallback)
        train += [Document(doc.name, parts["train"])] if "train" in parts else []
        val += [Document(doc.name, parts["val"])] if "val" in parts else []
    return train, val, fallback is not None


class CharSample:
    """A seeded uniform sample of chunks holding at most `budget` characters: each chunk
    draws a random key and the chunks of the smallest keys that fit are kept (a max-heap
    on the key). When everything fits, everything is kept, in order."""

    def __init__(self, budget: int, seed: int = SAMPLE_SEED):
        self.budget, self.held, self.count = budget, 0, 0
        self.rng = random.Random(seed)
        self.heap: list[tuple[float, int, int, str]] = []  # (-key, order, document, chunk)

    def add(self, document: int, chunk: str) -> None:
        heapq.heappush(self.heap, (-self.rng.random(), self.count, document, chunk))
        self.count += 1
        self.held += len(chunk)
        while self.held > self.budget:
            self.held -= len(heapq.heappop(self.heap)[3])

    def chunks(
        self, below: int | None = None, leave_out: frozenset[int] = frozenset()
    ) -> list[str]:
        """The sample in corpus order, without the documents numbered `below` and on, nor
        those in `leave_out`."""
        kept = sorted(self.heap, key=lambda item: item[1])
        return [c for _, _, d, c in kept if (below is None or d < below) and d not in leave_out]


@dataclass
class Scan:
    """What the first pass learnt about the corpus."""

    fingerprint: str
    files: list[tuple[str, int]]  # (path, documents) in corpus order
    documents: int
    characters: int
    fallback: int | None  # first document going to validation whole, or None
    sample: list[str] = field(repr=False)  # the tokenizer's training chunks
    heldout: frozenset[int] = frozenset()  # documents held out whole (data.val_documents)

    @property
    def sample_chars(self) -> int:
        return sum(len(c) for c in self.sample)


def scan(
    sources: Iterable[tuple[str, Iterable[Document]]],
    settings: dict[str, Any],
    val_fraction: float,
    sample_chars: int,
    source: str,
    val_documents: int | list[str] = 0,
) -> Scan:
    """Pass 1 over the documents of each (file, documents): fingerprint (sha256 of the
    settings and the texts in order, names excluded, so a moved corpus is still the same
    dataset), counts, split, the held-out documents and the tokenizer's seeded reservoir
    sample of at most `sample_chars` characters of training text."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    lengths, cuts = array.array("q"), array.array("q")
    files: list[tuple[str, int]] = []
    sample = CharSample(sample_chars)
    patterns = val_documents if isinstance(val_documents, list) else []
    named: set[int] = set()  # documents that match a pattern
    matched: set[str] = set()
    first_name = ""
    for path, docs in sources:
        before = len(lengths)
        for doc in docs:
            data = doc.text.encode("utf-8")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
            first_name = first_name or doc.name
            number = len(lengths)
            lengths.append(len(doc.text))
            cuts.append(split_point(doc.text, val_fraction))
            hits = [p for p in patterns if _names_document(p, doc.name)]
            if hits:
                named.add(number)
                matched.update(hits)
            for chunk in training_chunks([doc.text[: cuts[-1]]]) if sample_chars else ():
                sample.add(number, chunk)
        files.append((path, len(lengths) - before))
    if not lengths:
        raise empty_corpus(source)
    if unmatched := [p for p in patterns if p not in matched]:
        raise DataError(f"data.val_documents: no document of {source} is named {unmatched}")
    heldout = frozenset(named if patterns else _spread(int(val_documents), len(lengths), source))
    fallback = _fallback(lengths, cuts, heldout, val_fraction, first_name)
    chunks = sample.chunks(below=fallback, leave_out=heldout)
    return Scan(h.hexdigest(), files, len(lengths), sum(lengths), fallback, chunks, heldout)


def _fallback(
    lengths: array.array,
    cuts: array.array,
    heldout: frozenset[int],
    val_fraction: float,
    first_name: str,
) -> int | None:
    """The first document going to validation whole when no kept document can give a
    tail (else None); refuses a split that leaves nothing to train on."""
    kept = [i for i in range(len(lengths)) if i not in heldout]
    train_parts = sum(cuts[i] > 0 for i in kept)
    fallback = None
    if val_fraction > 0 and all(cuts[i] == lengths[i] for i in kept):
        fallback = fallback_start(lengths, val_fraction, first_name)
        train_parts = sum(i < fallback for i in kept)
    if not train_parts:
        raise DataError(
            "the training split is empty; lower data.val_fraction, hold out fewer "
            "data.val_documents or add text"
        )
    return fallback


def _names_document(pattern: str, name: str) -> bool:
    """A data.val_documents entry names a document by its name, its basename or a glob."""
    base = os.path.basename(name)
    return (
        pattern in (name, base)
        or fnmatch.fnmatchcase(name, pattern)
        or (fnmatch.fnmatchcase(base, pattern))
    )


def _spread(count: int, documents: int, source: str) -> set[int]:
    """`count` document numbers spread evenly over `documents` (the middle of each of
    `count` equal stretches): a held-out set that no corpus order favours."""
    if count and count >= documents:
        raise DataError(
            f"data.val_documents: {count} of the {documents} document(s) of {source} would "
            "leave nothing to train on"
        )
    return {int((i + 0.5) * documents / count) for i in range(count)}
