"""`prepare`: documents -> train/val split -> tokenizer -> token shards + index, streamed,
in parallel, atomically.

Two passes over the inputs, each a stream (memory is bounded by `data.batch_chars` per
batch in flight and the tokenizer's sample, never by the corpus):

1. *Scan*: every document is read once to fingerprint the corpus, count it, decide the
   split and draw the tokenizer's training sample: a seeded uniform sample (reservoir) of
   at most `data.tokenizer.sample_chars` characters of the training text, in chunks of
   about 4096 characters. A training text shorter than that is taken whole, in order.
2. *Encode*: documents go in batches of about `data.batch_chars` characters to
   `data.workers` processes (or to Ray Data workers, which read the files themselves:
   `encode_files`), come back in corpus order and are written to shards. The output does
   not depend on the number of workers, the batch size, or local vs Ray.

Split: each document gives its tail to validation, cut at a line start (see
`documents.split_point`), so no line is in both splits and nothing overlaps. Documents too
short to cut that way stay whole in train. If that leaves validation empty (every document
is a single line, say JSONL records), the split falls back to whole documents: the last
ones in corpus order go to validation until they hold `val_fraction` of the characters.

Exact round trip: `decode(encode(text)) == text` is checked for the first part of every
batch (every part with `check_all=True`, as the tests do).

Atomic and idempotent: the dataset is built in a hidden temporary folder next to
`data.dir` and renamed into place only when complete; a failure removes it and leaves
any previous dataset untouched. A fingerprint of the settings and of the documents'
content is stored in `index.json`: a folder whose fingerprint matches is reused as is, a
different one is rebuilt. Concurrent calls (one per rank) are serialised by a lock file.
"""

from __future__ import annotations

import array
import collections
import contextlib
import fnmatch
import gc
import hashlib
import heapq
import json
import multiprocessing
import os
import random
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm

from leviathan.data.bundled import bundled_documents
from leviathan.data.documents import (
    Document,
    as_inputs,
    empty_corpus,
    file_documents,
    source_files,
    split_point,
)
from leviathan.data.shards import (
    FORMAT,
    HELDOUT,
    INDEX_FILE,
    SPLITS,
    TOKENIZER_FILE,
    DataIndex,
    ShardWriter,
    is_dataset_file,
    load_index,
    token_dtype,
)
from leviathan.data.tokenizer import TRAINER_VERSION, Tokenizer, training_chunks, word_pieces
from leviathan.errors import ConfigError, DataError
from leviathan.storage import atomic_write_text, fsync_dir

BUNDLED = "<bundled>"  # the source name of the bundled corpus
SAMPLE_SEED = 0  # the tokenizer sample's reservoir is drawn with this seed


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
    settings and the texts in order, names excluded), counts, split, the held-out
    documents and the tokenizer's seeded reservoir sample of at most `sample_chars`
    characters of training text."""
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
    chunks = sample.chunks(below=fallback, leave_out=heldout)
    return Scan(h.hexdigest(), files, len(lengths), sum(lengths), fallback, chunks, heldout)


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
    """The plan's tokenizer, loaded once per process."""
    key = hashlib.sha256(plan.model).digest()
    if key not in _TOKENIZERS:
        _TOKENIZERS.clear()
        _TOKENIZERS[key] = Tokenizer(plan.model)
    return _TOKENIZERS[key]


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


def plan_splits(plan: Plan) -> tuple[str, ...]:
    """The splits a dataset of this plan has: train, val, and heldout when asked for."""
    return SPLITS + ((HELDOUT,) if plan.heldout else ())


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


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def prepare(
    cfg: Any,
    *,
    log: Callable[[str], None] = print,
    rebuild: bool = False,
    ray_address: str | None = None,
    check_all: bool = False,
) -> DataIndex:
    """Build (or reuse) the dataset `cfg` (a DataConfig) describes in `cfg.dir`.

    A dataset there prepared from other inputs is replaced only with `rebuild`: a
    forgotten `data.inputs` would otherwise turn someone's corpus into Shakespeare.
    `ray_address` encodes on a Ray cluster (`"auto"`: the one this machine belongs to)
    with Ray Data; `check_all` checks the round trip of every document, not a sample."""
    started = time.perf_counter()
    inputs = as_inputs(cfg.inputs or [])
    tcfg = cfg.tokenizer
    val_fraction = float(cfg.val_fraction)
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction: expected a number in [0, 1), got {val_fraction}")
    target = Path(os.path.abspath(os.path.expanduser(cfg.dir)))
    if target.parent == target:
        raise ConfigError(f"data.dir: {cfg.dir!r} cannot hold a dataset; name a folder")
    from leviathan.config import DataConfig

    default = DataConfig()  # for a `cfg` of an older shape (keys it lacks)
    text_field = getattr(cfg, "text_field", default.text_field)
    shard_tokens = int(getattr(cfg, "shard_tokens", default.shard_tokens))
    batch_chars = int(getattr(cfg, "batch_chars", default.batch_chars))
    sample_chars = int(getattr(tcfg, "sample_chars", default.tokenizer.sample_chars))
    workers = int(getattr(cfg, "workers", default.workers)) or available_cores()
    val_documents = getattr(cfg, "val_documents", default.val_documents)
    for key, value in {
        "data.shard_tokens": shard_tokens,
        "data.batch_chars": batch_chars,
        "data.tokenizer.sample_chars": sample_chars,
        "data.workers": workers,
    }.items():
        if value < 1:
            raise ConfigError(f"{key}: must be positive, got {value}")

    def sources() -> Iterator[tuple[str, Iterable[Document]]]:
        if not inputs:
            yield BUNDLED, bundled_documents()
            return
        for path in source_files(inputs):
            yield path, file_documents(path, text_field)

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
        **({"val_documents": val_documents} if val_documents else {}),
        "text_field": text_field,
        "shard_tokens": shard_tokens,
        "tokenizer": (
            {"model_sha256": hashlib.sha256(model_bytes).hexdigest()}
            if model_bytes is not None
            else {
                "kind": tcfg.kind,
                "vocab_size": int(tcfg.vocab_size),
                "trainer": TRAINER_VERSION,
                "sample_chars": sample_chars,
            }
        ),
    }
    sample = 0 if model_bytes else sample_chars
    corpus = scan(sources(), settings, val_fraction, sample, source, val_documents)

    target.parent.mkdir(parents=True, exist_ok=True)
    with _lock(target, log):
        _remove_leftovers(target)
        try:
            existing = load_index(target)
        except DataError:
            existing = None
        if existing is not None and existing.fingerprint == corpus.fingerprint:
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
        local = ray_address is None or not inputs
        if ray_address is not None and local:
            log("the bundled corpus is encoded here (Ray workers read data.inputs files)")
        one_batch = corpus.characters <= batch_chars
        try:
            with worker_pool(workers if local and not one_batch else 1) as pool:
                tok = _tokenizer(tmp, corpus, tcfg, model_bytes, val_fraction, log)
                plan = Plan(
                    val_fraction,
                    corpus.fallback,
                    tok.model_proto,
                    token_dtype(tok.vocab_size).name,
                    check_all,
                    corpus.heldout,
                )
                if local:
                    docs = (d for _, file_docs in sources() for d in file_docs)
                    encoded = encode_local(docs, plan, pool, batch_chars, 2 * workers)
                else:
                    from leviathan.data.raydata import encode_files

                    log(f"encoding {len(corpus.files)} file(s) with Ray Data at {ray_address}")
                    encoded = encode_files(ray_address, corpus.files, plan, text_field)
                stats, heldout = _write_splits(tmp, encoded, tok, shard_tokens, plan_splits(plan))
            if sum(s["characters"] for s in stats.values()) != corpus.characters:
                raise DataError(f"{source} changed while being prepared; run prepare again")
            meta = _index_meta(tok, stats, corpus)
            if heldout:
                meta["heldout_documents"] = heldout
            meta["config"] = {
                "inputs": inputs,
                "val_fraction": val_fraction,
                "val_documents": val_documents,
                "text_field": text_field,
                "shard_tokens": shard_tokens,
                "tokenizer": {
                    "kind": tcfg.kind,
                    "vocab_size": tcfg.vocab_size,
                    "model": tcfg.model,
                    "sample_chars": sample_chars,
                },
            }
            meta["corpus"]["source"] = source
            atomic_write_text(tmp / INDEX_FILE, json.dumps(meta, indent=2) + "\n")
            load_index(tmp)  # the same checks a reader will make
            _swap_into_place(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        index = load_index(target)
    summary = ", ".join(
        f"{s} {v['tokens']:,} tokens / {v['characters']:,} chars in {len(index.shards[s])} shard(s)"
        for s, v in index.splits.items()
    )
    log(f"prepared {target} in {time.perf_counter() - started:.1f} s: {summary}")
    return index


def _tokenizer(
    tmp: Path,
    corpus: Scan,
    tcfg: Any,
    model_bytes: bytes | None,
    val_fraction: float,
    log: Callable[[str], None],
) -> Tokenizer:
    if corpus.fallback is not None:
        log(
            f"no document has a line start in its last {val_fraction:.0%}: validation takes the "
            f"last {corpus.documents - corpus.fallback} whole document(s) instead"
        )
    model_path = tmp / TOKENIZER_FILE
    if model_bytes is not None:
        tok = Tokenizer(model_bytes, tcfg.model)
        tok.save(model_path)
        log(f"reusing tokenizer {tcfg.model} ({tok.vocab_size} pieces)")
        return tok
    log(
        f"training a {tcfg.kind} tokenizer of {tcfg.vocab_size} pieces on "
        f"{corpus.sample_chars:,} characters of training text"
    )
    return Tokenizer.train(corpus.sample, tcfg.kind, int(tcfg.vocab_size), model_path)


def _write_splits(
    tmp: Path,
    encoded: Iterable[Encoded],
    tok: Tokenizer,
    shard_tokens: int,
    splits: tuple[str, ...],
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Each split's totals and shards, and the names of the held-out documents."""
    dtype = token_dtype(tok.vocab_size)
    writers = {s: ShardWriter(tmp, s, dtype, tok.eos_id, shard_tokens) for s in splits}
    heldout: list[str] = []
    for batch in encoded:
        for split, parts in batch.items():
            for ids, characters, nbytes, name in parts:
                writers[split].add(ids, characters, nbytes)
                heldout += [name] if split == HELDOUT else []
    return {s: w.close() for s, w in writers.items()}, heldout


def _index_meta(tok: Tokenizer, stats: dict[str, Any], corpus: Scan) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "vocab_size": tok.vocab_size,
        "dtype": token_dtype(tok.vocab_size).name,
        "separator": "eos_id before every document",
        "tokenizer": {
            "file": TOKENIZER_FILE,
            "kind": tok.kind,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "sha256": hashlib.sha256(tok.model_proto).hexdigest(),
            "sentencepiece": spm.__version__,
            "trained_on_characters": corpus.sample_chars,
        },
        "splits": stats,
        "split_rule": (
            "whole documents"
            if corpus.fallback is not None
            else "line-aligned tail of each document"
        ),
        "corpus": {"documents": corpus.documents, "characters": corpus.characters},
        "fingerprint": corpus.fingerprint,
    }


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
