"""Validation loss and bits per character.

BPC = total NLL in nats / (characters * ln 2). Scoring a whole split is exact up to its
first token (which has no context); a periodic eval over a prefix of the split
converts its mean NLL per token with the split's own tokens-per-character ratio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from leviathan.data import eval_windows
from leviathan.train.device import autocast


@dataclass
class EvalResult:
    loss: float  # mean NLL per predicted token, nats
    bpc: float  # bits per character of the split's text
    tokens: int  # tokens scored


@torch.no_grad()
def evaluate(
    model: nn.Module,
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    tokens_per_char: float,
    max_tokens: int | None = None,
    precision: str = "fp32",
) -> EvalResult:
    """Score contiguous windows of `tokens` (all of them, or the first `max_tokens`)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for x, y in eval_windows(tokens, seq_len, batch_size, max_tokens=max_tokens):
        x, y = x.to(device), y.to(device)
        with autocast(device, precision):
            logits, _ = model(x)
        nll += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train(was_training)
    loss = nll / count
    return EvalResult(loss=loss, bpc=loss * tokens_per_char / math.log(2), tokens=count)


def unigram_bpc(
    train: np.ndarray, val: np.ndarray, vocab_size: int, tokens_per_char: float
) -> float:
    """BPC of a context-free model: val scored by add-one-smoothed train token frequencies."""
    counts = np.bincount(np.asarray(train, dtype=np.int64), minlength=vocab_size) + 1.0
    log_probs = np.log(counts / counts.sum())
    nll = -log_probs[np.asarray(val, dtype=np.int64)].mean()
    return float(nll * tokens_per_char / math.log(2))
