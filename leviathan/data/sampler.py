"""Batches. A training step's global batch is a pure function of (seed, step).

Each of the `global_batch` rows is a window of `seq_len + 1` tokens whose start is drawn
uniformly from a generator seeded with `SeedSequence([seed, step])`; rank r of w takes the
contiguous block of rows `r*gb/w .. (r+1)*gb/w`. So a resumed run, on any number of ranks,
sees exactly the batches of the uninterrupted run, and the ranks' slices put together are
the one-rank batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from leviathan.errors import DataError


def _as_array(tokens) -> np.ndarray:
    return tokens.numpy() if isinstance(tokens, torch.Tensor) else tokens


def _check_length(n_tokens: int, seq_len: int) -> None:
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len}")
    if n_tokens < seq_len + 1:
        raise DataError(
            f"the token split holds {n_tokens:,} tokens, fewer than seq_len + 1 = {seq_len + 1:,}: "
            "lower train.seq_len or add text"
        )


def global_batch_starts(
    n_tokens: int, seq_len: int, global_batch: int, seed: int, step: int
) -> np.ndarray:
    """The `global_batch` window starts (int64, each in [0, n_tokens - seq_len - 1]) of `step`."""
    _check_length(n_tokens, seq_len)
    if global_batch < 1:
        raise ValueError(f"global_batch must be at least 1, got {global_batch}")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, step])))
    return rng.integers(0, n_tokens - seq_len, size=global_batch, dtype=np.int64)


def get_batch(
    tokens: np.ndarray,
    seq_len: int,
    global_batch: int,
    seed: int,
    step: int,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows of step `step`'s global batch: x, and y = x shifted by one token.

    Both are int64 tensors of shape (global_batch // world_size, seq_len).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in range for world_size {world_size}")
    if global_batch % world_size:
        raise ValueError(
            f"the global batch of {global_batch} rows does not split evenly over {world_size} ranks"
        )
    tokens = _as_array(tokens)
    starts = global_batch_starts(len(tokens), seq_len, global_batch, seed, step)
    per = global_batch // world_size
    rows = starts[rank * per : (rank + 1) * per]
    data = torch.from_numpy(_windows(tokens, rows, seq_len + 1))
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()


def _windows(tokens: np.ndarray, starts, length: int) -> np.ndarray:
    out = np.empty((len(starts), length), dtype=np.int64)
    for i, s in enumerate(starts):
        out[i] = tokens[s : s + length]
    return out


def eval_windows(
    tokens: np.ndarray, seq_len: int, batch_size: int, max_tokens: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Contiguous, non-overlapping windows covering the split, in batches of `batch_size`.

    Every token after the first is a target exactly once (the first is `eos`, so every
    text token is predicted): the sum of the NLL over all targets divided by
    `characters * ln 2` is the split's exact BPC. Full windows come in (b, seq_len)
    batches, then a final (1, r) batch with the remaining r < seq_len targets.
    With `max_tokens`, only the first `max_tokens` targets are scored.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len}")
    tokens = _as_array(tokens)
    targets = max(len(tokens) - 1, 0)
    if max_tokens is not None:
        targets = min(targets, max(int(max_tokens), 0))
    full = targets // seq_len
    for first in range(0, full, batch_size):
        starts = np.arange(first, min(first + batch_size, full), dtype=np.int64) * seq_len
        data = torch.from_numpy(_windows(tokens, starts, seq_len + 1))
        yield data[:, :-1].contiguous(), data[:, 1:].contiguous()
    rest = targets - full * seq_len
    if rest:
        data = torch.from_numpy(_windows(tokens, [full * seq_len], rest + 1))
        yield data[:, :-1].contiguous(), data[:, 1:].contiguous()
