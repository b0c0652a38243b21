"""What `prepare` works from: a checked, typed DataConfig, and the one list of the settings
that decide a dataset's content (hashed into its fingerprint and recorded in index.json,
both from `dataset_settings`, so the two cannot disagree)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from leviathan.config import DataConfig, TokenizerConfig, check_data
from leviathan.data.documents import as_inputs
from leviathan.data.shards import FORMAT
from leviathan.data.tokenizer import TRAINER_VERSION, Tokenizer
from leviathan.errors import DataError


def data_config(cfg: Any) -> DataConfig:
    """A checked copy of `cfg` with DataConfig's types. `cfg` may be any object with its
    keys (tests and older callers pass their own): keys it lacks take their defaults."""
    default = DataConfig()

    def get(node: Any, key: str, fallback: Any) -> Any:
        return getattr(node, key, getattr(fallback, key))

    tok = cfg.tokenizer
    typed = DataConfig(
        inputs=None if cfg.inputs is None else as_inputs(cfg.inputs),  # None: not given
        dir=cfg.dir,
        val_fraction=float(cfg.val_fraction),
        val_documents=get(cfg, "val_documents", default),
        tokenizer=TokenizerConfig(
            kind=tok.kind,
            vocab_size=int(tok.vocab_size),
            model=tok.model,
            sample_chars=int(get(tok, "sample_chars", default.tokenizer)),
        ),
        text_field=get(cfg, "text_field", default),
        workers=int(get(cfg, "workers", default)),
        batch_chars=int(get(cfg, "batch_chars", default)),
        shard_tokens=int(get(cfg, "shard_tokens", default)),
    )
    check_data(typed)
    return typed


def read_model(tcfg: TokenizerConfig) -> bytes | None:
    """The bytes of `data.tokenizer.model`, or None when a tokenizer is to be trained; a
    file that is no SentencePiece model fails here, before the long scan."""
    if not tcfg.model:
        return None
    try:
        model = Path(tcfg.model).expanduser().read_bytes()
    except OSError as e:
        raise DataError(f"data.tokenizer.model: cannot read {tcfg.model}: {e.strerror}") from None
    Tokenizer(model, tcfg.model)
    return model


def dataset_settings(cfg: DataConfig, model: bytes | None) -> dict[str, Any]:
    """The settings that decide a dataset's content, nothing else (not the workers or the
    batch size, which do not change it). Every existing fingerprint hashes this dict: a new
    key must be left out at its old behaviour's value (as `val_documents` is at 0), or
    every dataset is rebuilt."""
    tok = cfg.tokenizer
    return {
        "format": FORMAT,
        "val_fraction": cfg.val_fraction,
        **({"val_documents": cfg.val_documents} if cfg.val_documents else {}),
        "text_field": cfg.text_field,
        "shard_tokens": cfg.shard_tokens,
        "tokenizer": (
            {"model_sha256": hashlib.sha256(model).hexdigest()}
            if model is not None
            else {
                "kind": tok.kind,
                "vocab_size": tok.vocab_size,
                "trainer": TRAINER_VERSION,
                "sample_chars": tok.sample_chars,
            }
        ),
    }
