"""A finished (or running) training run, loaded back for evaluation and sampling."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leviathan.config import Config, config_from_dict
from leviathan.data import DataIndex, Document, Tokenizer, load_tokens, token_dtype
from leviathan.data.shards import run_dataset
from leviathan.errors import CheckpointError, DataError
from leviathan.export import EXPORT, checked_state, read_export
from leviathan.model import Leviathan
from leviathan.train.checkpoint import checkpoint_step, latest_checkpoint
from leviathan.train.evaluate import EvalResult, evaluate
from leviathan.train.sample import sample_text


@dataclass
class Run:
    dir: Path
    config: Config
    model: Leviathan
    tokenizer: Tokenizer
    step: int

    def sample(
        self,
        prompt: str,
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        top_k: int | None = 200,
        seed: int = 0,
        **generate: Any,
    ) -> str:
        """`sample_text` with this run's model; `generate`: `Leviathan.generate` options."""
        return sample_text(
            self.model, self.tokenizer, prompt, max_new_tokens, temperature, top_k, seed, **generate
        )

    def dataset(self, data_dir: str | Path | None = None) -> DataIndex:
        """The dataset the run was trained on (see `run_dataset`), from any directory."""
        return run_dataset(self.dir, self.config.data.dir, data_dir)

    def evaluate(
        self, batch_size: int = 16, data_dir: str | Path | None = None, split: str = "val"
    ) -> EvalResult:
        """Loss and BPC on a whole split of the dataset the run was trained against: "val"
        (the documents' tails) or "heldout" (data.val_documents); `data_dir`: that dataset
        moved elsewhere."""
        index = self.dataset(data_dir)
        stats = index.splits.get(split)
        if stats is None or stats["tokens"] < 2:
            what = (
                "validation split (data.val_fraction=0)"
                if split == "val"
                else f"{split} split (no data.val_documents)"
            )
            raise DataError(
                f"{index.dir} has no {what}: score text with `leviathan eval --data PATH`"
            )
        tokens = load_tokens(index.dir, split)
        seq_len = self.config.train.seq_len
        return evaluate(self.model, tokens, seq_len, batch_size, stats["characters"])

    def evaluate_documents(self, docs: list[Document], batch_size: int = 16) -> EvalResult:
        """Loss and exact BPC on any documents (see `read_documents`), tokenised with the
        run's tokenizer and joined as the shards are (`eos doc eos doc ...`), so the
        documents of the run's own val split give the same BPC as `evaluate()`."""
        tokens, characters = encode_documents(self.tokenizer, docs)
        seq_len = self.config.train.seq_len
        return evaluate(self.model, tokens, seq_len, batch_size, characters)


def encode_documents(tokenizer: Tokenizer, docs: list[Document]) -> tuple[np.ndarray, int]:
    """The token stream of `docs` as `prepare` writes a split (every document preceded by
    the end-of-document id) and its character count (`len` of the texts)."""
    ids = tokenizer.encode_batch([d.text for d in docs])
    stream = np.empty(sum(len(i) + 1 for i in ids), dtype=token_dtype(tokenizer.vocab_size))
    at = 0
    for piece in ids:
        stream[at] = tokenizer.eos_id
        stream[at + 1 : at + 1 + len(piece)] = piece
        at += len(piece) + 1
    return stream, sum(len(d.text) for d in docs)


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None) -> Run:
    """A run's model: from `checkpoint` when given, else its export (`leviathan export`)
    when that is as recent as the latest checkpoint, else the latest checkpoint, whichever
    engine and number of ranks wrote it."""
    run_dir = Path(run_dir)
    exported = run_dir / EXPORT
    if checkpoint is None and exported.is_file():
        latest = latest_checkpoint(run_dir / "checkpoints")
        state, raw, step = read_export(exported)
        if latest is None or step >= checkpoint_step(latest):
            return build_run(run_dir, config_from_dict(raw), state, step)
    directory = run_checkpoint(run_dir, checkpoint)
    state = checked_state(directory)
    config = config_from_dict(json.loads((directory / "config.json").read_text(encoding="utf-8")))
    return build_run(run_dir, config, state, checkpoint_step(directory))


def run_checkpoint(run_dir: Path, checkpoint: str | Path | None) -> Path:
    """`--checkpoint` when given, else the run's latest: the folder eval, sample and export read."""
    directory = Path(checkpoint) if checkpoint else latest_checkpoint(run_dir / "checkpoints")
    if directory is None:
        raise CheckpointError(f"{run_dir} has no checkpoint (is it a run folder?)")
    return directory


def build_run(run_dir: Path, config: Config, state: dict[str, torch.Tensor], step: int) -> Run:
    model = Leviathan(config.model)
    model.load_state_dict(state)
    model.eval()
    return Run(run_dir, config, model, Tokenizer.load(run_dir / "tokenizer.model"), step)
