"""Validation loss and bits per character.

BPC = total NLL in nats / (characters * ln 2). A split's token stream starts with the
document separator, so scoring the whole split predicts every text token exactly once
and the BPC is exact. A periodic eval over a prefix of the split converts its mean NLL
per token with the split's own tokens-per-character ratio: an estimate, labelled so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from leviathan.data import eval_windows
from leviathan.parallel.precision import autocast


@dataclass
class EvalResult:
    loss: float  # mean NLL per predicted token, nats
    bpc: float  # bits per character of the split's text
    tokens: int  # tokens scored
    exact: bool  # the whole split was scored; otherwise BPC is extrapolated from a prefix


@torch.no_grad()
def evaluate(
    model: nn.Module,
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    characters: int,
    max_tokens: int | None = None,
    precision: str = "fp32",
) -> EvalResult:
    """Score contiguous windows of `tokens` (all of them, or the first `max_tokens`);
    `characters` is the length of the split's text."""
    was_training = model.training
    model.eval()
    weights = next(model.parameters())
    device = weights.device
    # a DeepSpeed bf16/fp16 model already holds half-precision weights: no autocast then
    precision = precision if weights.dtype == torch.float32 else "fp32"
    nll, count = 0.0, 0
    for x, y in eval_windows(tokens, seq_len, batch_size, max_tokens=max_tokens):
        x, y = x.to(device), y.to(device)
        with autocast(device, precision):
            logits, _ = model(x)
        nll += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train(was_training)
    exact = count == len(tokens) - 1
    if exact:
        bpc = nll / (characters * math.log(2))
    else:
        bpc = nll / count * len(tokens) / (characters * math.log(2))
    return EvalResult(loss=nll / count, bpc=bpc, tokens=count, exact=exact)


def unigram_bpc(train, val, vocab_size: int, characters: int) -> float:
    """BPC of a context-free model: val scored by add-one-smoothed train token frequencies
    (every val token after the first, as the model is scored). Counted a block at a
    time, so sharded splits (`TokenStream`) are never loaded whole."""
    counts = _token_counts(train, vocab_size) + 1.0
    log_probs = np.log(counts / counts.sum())
    val_counts = _token_counts(val, vocab_size)
    if len(val):
        val_counts[int(val[0:1][0])] -= 1  # the first token is not predicted
    nll = -(log_probs * val_counts).sum()
    return float(nll / (characters * math.log(2)))


def _token_counts(tokens, vocab_size: int, size: int = 1 << 24) -> np.ndarray:
    """How often each id occurs in `tokens` (an array or a `TokenStream`), `size` at a time."""
    if hasattr(tokens, "blocks"):
        blocks = tokens.blocks(size)
    else:
        blocks = (tokens[at : at + size] for at in range(0, len(tokens), size))
    counts = np.zeros(vocab_size, dtype=np.float64)
    for block in blocks:
        counts += np.bincount(np.asarray(block, dtype=np.int64), minlength=vocab_size)
    return counts
