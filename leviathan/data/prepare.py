"""`prepare`: documents -> train/val split -> tokenizer -> token shards + index, streamed,
in parallel, atomically.

Two passes over the inputs, each a stream: the scan (scan.py: fingerprint, split,
tokenizer sample) and the encode (encode.py locally, raydata.py on a Ray cluster), with
the tokenizer trained in between. The dataset folder is replaced whole or not at all and
reused when its fingerprint matches (folder.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import sentencepiece as spm

from leviathan.config import DataConfig, TokenizerConfig
from leviathan.data.encode import (
    Encoded,
    Plan,
    available_cores,
    encode_local,
    plan_splits,
    worker_pool,
)
from leviathan.data.folder import as_it_is, lock, reusable, staging
from leviathan.data.raydata import encode_files
from leviathan.data.scan import Scan, corpus_sources, describe_inputs, scan
from leviathan.data.settings import data_config, dataset_settings, read_model
from leviathan.data.shards import (
    FORMAT,
    HELDOUT,
    INDEX_FILE,
    TOKENIZER_FILE,
    DataIndex,
    ShardWriter,
    load_index,
    token_dtype,
)
from leviathan.data.tokenizer import Tokenizer
from leviathan.errors import DataError
from leviathan.storage import atomic_write_text


def prepare(
    cfg: DataConfig,
    *,
    log: Callable[[str], None] = print,
    rebuild: bool = False,
    ray_address: str | None = None,
    check_all: bool = False,
) -> DataIndex:
    """Build (or reuse) the dataset `cfg` describes in `cfg.dir`.

    With `cfg.inputs` None (not given) the dataset in `cfg.dir` is taken as it is, without
    reading its corpus again; the bundled corpus is prepared there when it holds none.
    A dataset there prepared from other inputs is replaced only with `rebuild`.
    `ray_address` encodes on a Ray cluster (`"auto"`: the one this machine belongs to)
    with Ray Data; `check_all` checks the round trip of every document, not a sample."""
    started = time.perf_counter()
    cfg = data_config(cfg)
    target = Path(os.path.abspath(os.path.expanduser(cfg.dir)))
    model = read_model(cfg.tokenizer)
    settings = dataset_settings(cfg, model)
    if cfg.inputs is None:  # not given: the dataset there as it is, else the bundled corpus
        existing = as_it_is(target, settings, rebuild, log)
        if existing is not None:
            return existing
        log(f"no dataset in {target}: preparing the bundled corpus there (data.inputs not given)")
        cfg = dataclasses.replace(cfg, inputs=[])
    source = describe_inputs(cfg.inputs)
    sample_chars = 0 if model else cfg.tokenizer.sample_chars
    sources = corpus_sources(cfg.inputs, cfg.text_field)
    corpus = scan(sources, settings, cfg.val_fraction, sample_chars, source, cfg.val_documents)
    target.parent.mkdir(parents=True, exist_ok=True)
    with lock(target, log):
        existing = reusable(target, corpus.fingerprint, cfg.inputs, source, rebuild, log)
        if existing is not None:
            return existing
        with staging(target) as tmp:
            tok, stats, heldout = _encode(tmp, cfg, corpus, model, ray_address, check_all, log)
            _write_index(tmp, cfg, settings, corpus, tok, stats, heldout)
        index = load_index(target)
    log(f"prepared {target} in {time.perf_counter() - started:.1f} s: {_summary(index)}")
    return index


def _encode(
    tmp: Path,
    cfg: DataConfig,
    corpus: Scan,
    model: bytes | None,
    ray_address: str | None,
    check_all: bool,
    log: Callable[[str], None],
) -> tuple[Tokenizer, dict[str, dict[str, Any]], list[str]]:
    """The tokenizer and the shards, in `tmp`: (tokenizer, each split's totals and shards,
    the names of the held-out documents)."""
    if corpus.fallback is not None:
        log(
            f"no document has a line start in its last {cfg.val_fraction:.0%}: validation "
            f"takes the last {corpus.documents - corpus.fallback} whole document(s) instead"
        )
    local = ray_address is None or not cfg.inputs
    if ray_address is not None and local:
        log("the bundled corpus is encoded here (Ray workers read data.inputs files)")
    workers = cfg.workers or available_cores()
    one_batch = corpus.characters <= cfg.batch_chars
    with worker_pool(workers if local and not one_batch else 1) as pool:
        tok = _tokenizer(tmp, corpus, cfg.tokenizer, model, log)
        dtype = token_dtype(tok.vocab_size).name
        plan = Plan(
            cfg.val_fraction, corpus.fallback, tok.model_proto, dtype, check_all, corpus.heldout
        )
        if local:
            docs = (
                d for _, file_docs in corpus_sources(cfg.inputs, cfg.text_field) for d in file_docs
            )
            encoded = encode_local(docs, plan, pool, cfg.batch_chars, 2 * workers)
        else:
            log(f"encoding {len(corpus.files)} file(s) with Ray Data at {ray_address}")
            encoded = encode_files(ray_address, corpus.files, plan, cfg.text_field)
        stats, heldout = _write_splits(tmp, encoded, tok, cfg.shard_tokens, plan_splits(plan))
    return tok, stats, heldout


def _tokenizer(
    tmp: Path,
    corpus: Scan,
    tcfg: TokenizerConfig,
    model: bytes | None,
    log: Callable[[str], None],
) -> Tokenizer:
    """The given tokenizer, or one trained on the scan's sample; saved into `tmp`."""
    model_path = tmp / TOKENIZER_FILE
    if model is not None:
        tok = Tokenizer(model, tcfg.model)
        tok.save(model_path)
        log(f"reusing tokenizer {tcfg.model} ({tok.vocab_size} pieces)")
        return tok
    log(
        f"training a {tcfg.kind} tokenizer of {tcfg.vocab_size} pieces on "
        f"{corpus.sample_chars:,} characters of training text"
    )
    return Tokenizer.train(corpus.sample, tcfg.kind, tcfg.vocab_size, model_path)


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


def _write_index(
    tmp: Path,
    cfg: DataConfig,
    settings: dict[str, Any],
    corpus: Scan,
    tok: Tokenizer,
    stats: dict[str, dict[str, Any]],
    heldout: list[str],
) -> None:
    """index.json, written last: a folder without it is no dataset."""
    source = describe_inputs(cfg.inputs)
    if sum(s["characters"] for s in stats.values()) != corpus.characters:
        raise DataError(f"{source} changed while being prepared; run prepare again")
    meta = {
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
        "corpus": {
            "documents": corpus.documents,
            "characters": corpus.characters,
            "source": source,
        },
        "fingerprint": corpus.fingerprint,
        **({"heldout_documents": heldout} if heldout else {}),
        "config": {"inputs": cfg.inputs, **settings},  # inputs: for the rebuild guard
    }
    atomic_write_text(tmp / INDEX_FILE, json.dumps(meta, indent=2) + "\n")
    load_index(tmp)  # the same checks a reader will make


def _summary(index: DataIndex) -> str:
    return ", ".join(
        f"{s} {v['tokens']:,} tokens / {v['characters']:,} chars in {len(index.shards[s])} shard(s)"
        for s, v in index.splits.items()
    )
